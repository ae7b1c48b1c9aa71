"""The ledger admin job through the UI's API: a real `dagster dev` serving the example project,
runs launched over GraphQL as the Launchpad launches them, the real default ledger file under
the temp DAGSTER_HOME.

The story: a claim is stuck under a run this deployment does not know (its host was lost), so
the key's runs skip; the admin job refuses to reset it (it is in flight), a dry run of the
release changes nothing, the release frees it and names its run in the ledger's event log, and
the next run of the key does the work.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from dagster_server import DagsterServer

from rocky_dagster.ledger import EventKind, Ledger, State, open_ledger

pytestmark = pytest.mark.e2e

ADMIN_JOB = "rocky_ledger_admin"
ADMIN_OP = "ledger_admin"
KEY_TAG = "rocky/idempotency_key"
BASE = "e2e-admin-stuck"
KEY = f"{BASE}/hold_claim"
LOST_RUN = "run-on-a-lost-host"

STEP_EVENTS_QUERY = """
query AdminRunEvents($id: ID!, $cursor: String) { logsForRun(runId: $id, afterCursor: $cursor) {
  __typename
  ... on EventConnection { cursor hasMore events { __typename
    ... on ExecutionStepFailureEvent { stepKey error { message }
      failureMetadata { metadataEntries { label } } }
    ... on ExecutionStepOutputEvent { stepKey metadataEntries { __typename label
      ... on IntMetadataEntry { intValue }
      ... on BoolMetadataEntry { boolValue }
      ... on TextMetadataEntry { text }
      ... on MarkdownMetadataEntry { mdStr }
      ... on JsonMetadataEntry { jsonString } } } } }
  ... on Error { message } } }
"""

OP_CONFIG_QUERY = """
query OpConfig($s: PipelineSelector!) { pipelineOrError(params: $s) { __typename
  ... on Pipeline { solidHandles { handleID solid { definition { __typename
    ... on SolidDefinition { configField { configType { __typename
      ... on CompositeConfigType { fields { name description defaultValueAsJson } } } } } } } } }
  ... on Error { message } } }
"""


def test_documents_are_valid_against_the_installed_schema() -> None:
    """Cheap (no server): a schema change fails here, not as a timeout below."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    schema = create_schema().graphql_schema
    for document in (STEP_EVENTS_QUERY, OP_CONFIG_QUERY):
        assert not validate(schema, parse(document))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServer]:
    root = tmp_path_factory.mktemp("e2e_admin")
    dagster = DagsterServer(
        home=root / "dagster_home", env={"ROCKY_EXAMPLE_DATA_DIR": str(root / "data")}
    )
    dagster.start()
    try:
        yield dagster
        dagster.terminate_unfinished()
    finally:
        dagster.stop()
    assert not dagster.leftovers, f"processes left after SIGINT (SIGKILLed): {dagster.leftovers}"


def ledger(server: DagsterServer) -> Ledger:
    return open_ledger(server.ledger_path)


def step_events(server: DagsterServer, run_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        conn = server.graphql(STEP_EVENTS_QUERY, {"id": run_id, "cursor": cursor})["logsForRun"]
        assert conn["__typename"] == "EventConnection", conn
        events.extend(e for e in conn["events"] if e.get("stepKey") == ADMIN_OP)
        cursor = conn["cursor"]
        if not conn["hasMore"]:
            return events


def launch_admin(server: DagsterServer, **config: Any) -> tuple[str, dict[str, Any]]:
    """Launch the admin job as the Launchpad does; wait for it; (status, its step events)."""
    run_id = server.launch_run(ADMIN_JOB, run_config={"ops": {ADMIN_OP: {"config": config}}})
    status = server.wait_for_run(run_id)["status"]
    events = step_events(server, run_id)
    return status, {"run_id": run_id, "events": events}


def output_metadata(events: list[dict[str, Any]]) -> dict[str, Any]:
    [output] = [e for e in events if e["__typename"] == "ExecutionStepOutputEvent"]
    values: dict[str, Any] = {}
    for entry in output["metadataEntries"]:
        kind = entry["__typename"]
        value = {
            "IntMetadataEntry": lambda e: e["intValue"],
            "BoolMetadataEntry": lambda e: e["boolValue"],
            "TextMetadataEntry": lambda e: e["text"],
            "MarkdownMetadataEntry": lambda e: e["mdStr"],
            "JsonMetadataEntry": lambda e: json.loads(e["jsonString"]),
        }.get(kind, lambda e: None)(entry)
        values[entry["label"]] = value
    return values


def hold(server: DagsterServer, seconds: float) -> str:
    """slow_job (one guarded op) under the stuck key; waited for."""
    run_id = server.launch_run(
        "slow_job",
        tags={KEY_TAG: BASE},
        run_config={"ops": {"hold_claim": {"config": {"seconds": seconds}}}},
    )
    run = server.wait_for_run(run_id)
    assert run["status"] == "SUCCESS", (run, server.log_tail())
    return run_id


def snapshot(server: DagsterServer) -> tuple[Any, list[Any]]:
    with ledger(server) as opened:
        entry = opened.get(KEY)
        return (None if entry is None else entry.model_dump()), [
            e.model_dump() for e in opened.history(KEY)
        ]


def test_launchpad_shows_every_config_field_documented(server: DagsterServer) -> None:
    data = server.graphql(
        OP_CONFIG_QUERY,
        {
            "s": {
                "repositoryLocationName": server.location,
                "repositoryName": server.repository,
                "pipelineName": ADMIN_JOB,
            }
        },
    )
    job = data["pipelineOrError"]
    assert job["__typename"] == "Pipeline", job
    [handle] = job["solidHandles"]
    config = handle["solid"]["definition"]["configField"]["configType"]
    fields = {f["name"]: f for f in config["fields"]}
    assert {"action", "key", "prefix", "dry_run", "reason"} <= set(fields), fields
    assert all(f["description"] for f in fields.values()), fields
    assert fields["dry_run"]["defaultValueAsJson"] == "true"


def test_admin_job_releases_a_stuck_key_and_refuses_to_reset_it(server: DagsterServer) -> None:
    with open_ledger(server.ledger_path, {"lease_seconds": 3600}) as stuck_ledger:
        assert stuck_ledger.claim(KEY, LOST_RUN).should_run  # the lost host's claim

    # stuck: the key's run skips, the claim stays with the lost run
    skipped = hold(server, 0.5)
    with ledger(server) as opened:
        entry = opened.get(KEY)
        assert entry is not None and (entry.state, entry.run_id) == (State.IN_FLIGHT, LOST_RUN)
        assert [e.run_id for e in opened.history(KEY) if e.kind == EventKind.SKIPPED_IN_FLIGHT] == [
            skipped
        ]
    before = snapshot(server)

    # reset refused (in flight): the run fails naming the key and the fix; nothing changed
    status, run = launch_admin(server, action="reset", key=KEY, dry_run=False)
    assert status == "FAILURE"
    [failure] = [e for e in run["events"] if e["__typename"] == "ExecutionStepFailureEvent"]
    message = failure["error"]["message"]
    assert f"key '{KEY}' is in flight (run {LOST_RUN})" in message, message
    assert "action: release" in message, message
    assert snapshot(server) == before

    # the default is a dry run: it lists what would change and changes nothing
    status, run = launch_admin(server, action="release", key=KEY)
    assert status == "SUCCESS"
    meta = output_metadata(run["events"])
    assert meta["dry_run"] is True and meta["would_change"] == 1
    assert "would release" in meta["keys"]
    assert snapshot(server) == before

    # the release: the event log names the admin run, the metadata what changed
    status, run = launch_admin(
        server, action="release", key=KEY, dry_run=False, reason="its host was lost"
    )
    assert status == "SUCCESS"
    meta = output_metadata(run["events"])
    assert meta["changed"] == 1
    [row] = meta["keys_json"]
    assert (row["key"], row["result"], row["run_id"]) == (KEY, "released", LOST_RUN)
    with ledger(server) as opened:
        assert opened.get(KEY).released
        released = opened.history(KEY)[-1]
    assert released.kind == EventKind.RELEASED and released.run_id == LOST_RUN
    assert released.detail == (
        f"released by Dagster run {run['run_id']} (job {ADMIN_JOB}): its host was lost"
    )

    # the next run of the key does the work
    again = hold(server, 0.5)
    with ledger(server) as opened:
        entry = opened.get(KEY)
        assert entry is not None and (entry.state, entry.run_id) == (State.SUCCEEDED, again)
        assert entry.result == {"held_seconds": 0.5}
