"""The ledger admin job on a real DagsterInstance and a real SQLite ledger.

Every action is launched as an operator would (run config, dry run by default); the ledger is
read back through its own API, and "changes nothing" means every entry, every event and the
fence high-water mark are exactly what they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRunStatus, Definitions, ExecuteInProcessResult
from dagster_layer_jobs import fail_config, work_job, work_log

from rocky_dagster import IdempotencyLedger
from rocky_dagster.ledger import EventKind, Ledger, Outcome, State, open_ledger
from rocky_dagster.operations.admin_job import (
    LedgerAdminConfig,
    ledger_admin_job,
    ledger_definitions,
)
from rocky_dagster.step.keys import KEY_TAG

ADMIN = "rocky_ledger_admin"


@pytest.fixture
def admin(instance: DagsterInstance, ledger_url: str):
    """Launch the admin job (as shipped by ledger_definitions) with this config; returns the result."""
    defs = ledger_definitions(ledger=IdempotencyLedger(url=ledger_url))
    admin_job = defs.get_job_def(ADMIN)

    def launch(**config: Any) -> ExecuteInProcessResult:
        return admin_job.execute_in_process(
            instance=instance,
            run_config={"ops": {"ledger_admin": {"config": config}}},
            raise_on_error=False,
        )

    return launch


def snapshot(ledger: Ledger) -> tuple[list[dict], list[dict], Any]:
    """Everything an admin action could change: every entry, every event, the stats."""
    entries = sorted((e.model_dump() for e in ledger.entries(limit=10_000)), key=lambda e: e["key"])
    events = [ev.model_dump() for e in entries for ev in ledger.history(e["key"])]
    return entries, events, ledger.stats()


def in_flight(ledger: Ledger, key: str, run_id: str = "run-on-a-lost-host") -> int:
    claim = ledger.claim(key, run_id)
    assert claim.fence is not None
    return claim.fence


def finished(ledger: Ledger, key: str, outcome: Outcome, run_id: str = "an-earlier-run") -> None:
    fence = in_flight(ledger, key, run_id)
    assert ledger.finalize(key, fence, outcome, result={"rows": 7}).applied


def output_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in event.event_specific_data.metadata.items()}


def failure(result: ExecuteInProcessResult) -> tuple[str, dict[str, Any]]:
    """The step failure's message and metadata."""
    assert not result.success
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = event.event_specific_data.user_failure_data
    return data.description, {k: v.value for k, v in data.metadata.items()}


def by_key(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in meta["keys_json"]}


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_is_the_default_changes_nothing_and_lists_what_would_change(
    admin, ledger: Ledger
) -> None:
    in_flight(ledger, "orders/2026-11-01/load")
    finished(ledger, "orders/2026-11-01/check", Outcome.SUCCEEDED)
    finished(ledger, "orders/2026-11-02/load", Outcome.SUCCEEDED)
    before = snapshot(ledger)

    result = admin(action="reset", prefix="orders/2026-11-01/", state="succeeded")

    assert result.success
    assert snapshot(ledger) == before
    meta = output_metadata(result)
    assert meta["dry_run"] is True
    assert meta["would_change"] == 1 and "changed" not in meta
    assert by_key(meta) == {
        "orders/2026-11-01/check": {
            "key": "orders/2026-11-01/check",
            "state": "succeeded",
            "run_id": "an-earlier-run",
            "fence": 2,
            "change": "reset",
            "note": "the next run does the work again",
            "result": "",
            "event": "",
        }
    }
    assert "would reset" in meta["keys"] and "orders/2026-11-01/check" in meta["keys"]
    assert meta["selection"] == "prefix 'orders/2026-11-01/' (in state succeeded)"


def test_dry_run_refuses_what_the_real_run_would_refuse(admin, ledger: Ledger) -> None:
    """A green dry run must predict a green real run: a refusal fails the dry run too."""
    in_flight(ledger, "k/1")
    before = snapshot(ledger)
    message, _ = failure(admin(action="reset", key="k/1"))
    assert "key 'k/1' is in flight" in message
    assert snapshot(ledger) == before


# --- acting, and the event log naming the run --------------------------------------------------


def test_release_of_a_prefix_frees_only_its_keys_and_the_event_log_names_the_run(
    admin, ledger: Ledger, instance: DagsterInstance
) -> None:
    for key in ("a/1/step", "a/2/step", "ab/1/step", "b/1/step"):
        in_flight(ledger, key)

    result = admin(action="release", prefix="a/", dry_run=False, reason="host lost")

    assert result.success
    assert ledger.get("a/1/step").released and ledger.get("a/2/step").released
    for key in ("ab/1/step", "b/1/step"):
        entry = ledger.get(key)
        assert entry is not None and entry.state == State.IN_FLIGHT
    for key in ("a/1/step", "a/2/step"):
        event = ledger.history(key)[-1]
        assert event.kind == EventKind.RELEASED
        assert event.run_id == "run-on-a-lost-host"  # the run whose claim was freed
        assert event.detail == f"released by Dagster run {result.run_id} (job {ADMIN}): host lost"
    meta = output_metadata(result)
    assert meta["changed"] == 2 and meta["unchanged"] == 0 and meta["dry_run"] is False
    rows = by_key(meta)
    assert set(rows) == {"a/1/step", "a/2/step"}
    assert rows["a/1/step"]["result"] == "released"
    assert result.run_id in rows["a/1/step"]["event"]
    assert "unknown to this Dagster instance" in rows["a/1/step"]["note"]
    assert instance.get_run_by_id(result.run_id).job_name == ADMIN


def test_released_key_proceeds_in_the_next_guarded_run(
    admin, ledger: Ledger, instance: DagsterInstance, work_dir: Path
) -> None:
    """A claim stuck under a run this instance does not know (e.g. a lost host) skips the key
    until its lease ends; released from the admin job, the next run does the work."""
    tags = {KEY_TAG: "stuck"}
    in_flight(ledger, "stuck/work", "run-on-a-lost-host")
    skipped = work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", False)
    )
    assert skipped.success and work_log(work_dir) == []

    assert admin(action="release", key="stuck/work", dry_run=False).success

    again = work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", False)
    )
    assert again.success
    assert work_log(work_dir) == [("work", again.run_id)]
    entry = ledger.get("stuck/work")
    assert entry is not None and (entry.state, entry.run_id) == (State.SUCCEEDED, again.run_id)


def test_release_names_the_holder_s_status_in_dagster(
    admin, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Released as in the CLI whatever the holder is doing, but the operator is told when the
    holder is a live run of this instance (its work would run again)."""
    live = instance.create_run_for_job(job_def=work_job, tags={KEY_TAG: "h"}).run_id
    dead = instance.create_run_for_job(job_def=work_job, tags={KEY_TAG: "h2"})
    instance.report_run_failed(dead)
    in_flight(ledger, "h/work", live)
    in_flight(ledger, "h2/work", dead.run_id)

    rows = by_key(output_metadata(admin(action="release", prefix="h")))

    assert f"holder run {DagsterRunStatus.NOT_STARTED.value} (still live" in rows["h/work"]["note"]
    assert rows["h2/work"]["note"].endswith(f"holder run {DagsterRunStatus.FAILURE.value}")


def test_release_on_a_postgresql_ledger(instance: DagsterInstance, postgres_url: str) -> None:
    """The admin job only uses the ledger API, so both backends behave alike; one story on
    PostgreSQL shows the prefix scan and the audited release there too."""
    with open_ledger(postgres_url) as pg:
        in_flight(pg, "pg/1")
        finished(pg, "pg/2", Outcome.SUCCEEDED)
        defs = ledger_definitions(ledger=IdempotencyLedger(url=postgres_url))
        result = defs.get_job_def(ADMIN).execute_in_process(
            instance=instance,
            run_config={
                "ops": {
                    "ledger_admin": {
                        "config": {
                            "action": "release",
                            "prefix": "pg/",
                            "state": "in_flight",
                            "dry_run": False,
                        }
                    }
                }
            },
        )
        assert result.success
        assert pg.get("pg/1").released and pg.get("pg/2").state == State.SUCCEEDED
        assert result.run_id in (pg.history("pg/1")[-1].detail or "")


def test_an_unreachable_ledger_fails_the_run_saying_nothing_changed(
    instance: DagsterInstance,
) -> None:
    unreachable = "postgresql://rocky:secret@127.0.0.1:1/ledger"  # nothing listens on port 1
    defs = ledger_definitions(ledger=IdempotencyLedger(url=unreachable))
    result = defs.get_job_def(ADMIN).execute_in_process(
        instance=instance,
        run_config={"ops": {"ledger_admin": {"config": {"action": "reset", "key": "k"}}}},
        raise_on_error=False,
    )
    message, meta = failure(result)
    assert "ledger error during reset" in message and message.endswith("nothing was changed")
    assert "secret" not in message and "secret" not in meta["ledger"]


def test_force_makes_the_next_run_of_a_completed_key_proceed(admin, ledger: Ledger) -> None:
    finished(ledger, "f/done", Outcome.SUCCEEDED, "run-that-did-it")
    finished(ledger, "f/failed", Outcome.FAILED, "run-that-failed")

    result = admin(action="force", prefix="f/", dry_run=False)

    assert result.success
    assert ledger.get("f/done") is None
    event = ledger.history("f/done")[-1]
    assert event.kind == EventKind.RESET
    assert event.detail == (
        f"forced by Dagster run {result.run_id} (job {ADMIN}); forgot the succeeded record of "
        "run run-that-did-it"
    )
    # a failure is retried anyway under dedup_on='success': left as it was
    failed = ledger.get("f/failed")
    assert failed is not None and failed.state == State.FAILED
    rows = by_key(output_metadata(result))
    assert rows["f/done"]["result"] == "forced"
    assert rows["f/failed"]["result"] == "unchanged"
    assert "proceeds anyway" in rows["f/failed"]["note"]
    assert ledger.claim("f/done", "next-run").should_run
    assert ledger.claim("f/failed", "next-run").should_run


def test_reset_of_one_key_with_the_cli_guards(admin, ledger: Ledger) -> None:
    finished(ledger, "r/1", Outcome.FAILED, "run-x")
    result = admin(action="reset", key="r/1", run_id="run-x", fence=1, dry_run=False)
    assert result.success
    assert ledger.get("r/1") is None
    assert ledger.history("r/1")[-1].detail.startswith(f"reset by Dagster run {result.run_id} ")
    assert output_metadata(result)["run"] == "run-x"


# --- refusals ------------------------------------------------------------------------------------


def _seed_for_refusals(ledger: Ledger) -> None:
    in_flight(ledger, "p/live/1")
    in_flight(ledger, "p/live/2")
    finished(ledger, "p/done/1", Outcome.SUCCEEDED)
    finished(ledger, "p/done/2", Outcome.FAILED)


REFUSALS = [
    pytest.param(
        {"action": "release", "prefix": "p/"},
        ["key 'p/done/1' is succeeded, not in flight", "action: reset", "state: in_flight"],
        id="release-a-prefix-with-finished-keys",
    ),
    pytest.param(
        {"action": "release", "key": "p/done/1"},
        ["key 'p/done/1' is succeeded, not in flight: nothing to release", "action: reset"],
        id="release-a-finished-key",
    ),
    pytest.param(
        {"action": "reset", "prefix": "p/"},
        ["key 'p/live/1' is in flight", "key 'p/live/2' is in flight", "action: release"],
        id="reset-a-prefix-with-in-flight-keys",
    ),
    pytest.param(
        {"action": "force", "prefix": "p/"},
        ["key 'p/live/1' is in flight", "never overrides a live claim", "action: release"],
        id="force-an-in-flight-key",
    ),
    pytest.param(
        {"action": "release", "key": "p/typo"},
        ["no entry and no history for key 'p/typo'", "action: list and a prefix"],
        id="release-a-missing-key",
    ),
    pytest.param(
        {"action": "reset", "key": "p/done/1", "run_id": "another-run"},
        ["key 'p/done/1' is held by run an-earlier-run, not another-run"],
        id="reset-guarded-by-another-run",
    ),
    pytest.param(
        {"action": "release", "key": "p/live/1", "fence": 99},
        ["key 'p/live/1' has fence 1, not 99"],
        id="release-guarded-by-another-fence",
    ),
    pytest.param(
        {"action": "release", "prefix": "p/live/", "max_keys": 1},
        ["matches more than max_keys=1 keys", "raise max_keys"],
        id="prefix-larger-than-max-keys",
    ),
    pytest.param(
        {"action": "release", "prefix": "nothing/"},
        ["no entry matches prefix 'nothing/': nothing to release"],
        id="prefix-matching-nothing",
    ),
    pytest.param(
        {"action": "reset"},
        ["action 'reset' needs a key or a prefix"],
        id="no-selection",
    ),
    pytest.param(
        {"action": "release", "key": "p/live/1", "prefix": "p/"},
        ["give key or prefix, not both"],
        id="key-and-prefix",
    ),
    pytest.param(
        {"action": "release", "prefix": "p/live/", "fence": 1},
        ["fence guards one key: give key too"],
        id="fence-with-a-prefix",
    ),
    pytest.param(
        {"action": "release", "prefix": "p/\n"},
        ["prefix contains a control character"],
        id="unprintable-prefix",
    ),
]


@pytest.mark.parametrize(("config", "expected"), REFUSALS)
def test_each_refusal_fails_the_run_and_leaves_every_key_unchanged(
    admin, ledger: Ledger, config: dict[str, Any], expected: list[str]
) -> None:
    _seed_for_refusals(ledger)
    before = snapshot(ledger)

    message, _ = failure(admin(**config, dry_run=False))

    for text in expected:
        assert text in message, message
    assert snapshot(ledger) == before


@pytest.mark.parametrize(
    ("action", "first", "then"),
    [
        # entries are read newest first: the keys the action may change come first
        pytest.param("release", Outcome.SUCCEEDED, None, id="release"),
        pytest.param("reset", None, Outcome.SUCCEEDED, id="reset"),
    ],
)
def test_a_refused_prefix_changes_none_of_its_valid_keys(
    admin, ledger: Ledger, action: str, first: Outcome | None, then: Outcome | None
) -> None:
    """Validate all, then act: the keys the action could change, listed before the refused
    one, are not changed either."""
    for outcome in (first, then):
        for n in (1, 2):
            if outcome is None:
                in_flight(ledger, f"v/live/{n}")
            else:
                finished(ledger, f"v/done/{n}", outcome)
    before = snapshot(ledger)

    message, meta = failure(admin(action=action, prefix="v/", dry_run=False))

    assert f"{action} refused, nothing changed" in message
    assert snapshot(ledger) == before
    assert meta["action"] == action and meta["changed"] == 0
    refused = "v/done/" if action == "release" else "v/live/"
    assert {r["key"]: r["result"] for r in meta["keys_json"]} == {
        f"v/{kind}/{n}": "refused"
        if f"v/{kind}/" == refused
        else "unchanged (the action was refused)"
        for kind in ("live", "done")
        for n in (1, 2)
    }


# --- listing -----------------------------------------------------------------------------------


def test_list_shows_the_newest_entries_and_one_key_s_event_log(admin, ledger: Ledger) -> None:
    for n in range(5):
        finished(ledger, f"l/{n}", Outcome.SUCCEEDED)
    before = snapshot(ledger)

    listed = output_metadata(admin(prefix="l/", max_keys=2))
    assert [r["key"] for r in listed["keys_json"]] == ["l/4", "l/3"]
    assert "only the newest 2 are listed" in listed["truncated"]
    assert "truncated" not in output_metadata(admin(prefix="l/", max_keys=5))
    assert len(output_metadata(admin(max_keys=4))["keys_json"]) == 4  # no prefix: every key

    one = output_metadata(admin(key="l/0"))
    assert "| claimed |" in one["history"] and "| succeeded |" in one["history"]
    assert snapshot(ledger) == before


def test_run_id_is_the_holder_and_touched_by_adds_the_history_as_in_the_cli(
    admin, ledger: Ledger
) -> None:
    finished(ledger, "t/1", Outcome.SUCCEEDED, "run-x")
    assert not ledger.claim("t/1", "run-y").should_run  # run-y skipped it: in its history only

    held = output_metadata(admin(run_id="run-y"))
    touched = output_metadata(admin(touched_by="run-y"))

    assert held["keys_json"] == []
    assert [r["key"] for r in touched["keys_json"]] == ["t/1"]
    assert touched["selection"] == "every key (touched by run run-y)"
    message, _ = failure(admin(action="reset", key="t/1", touched_by="run-z"))
    assert "key 't/1' was never touched by run run-z" in message


# --- shipping it -------------------------------------------------------------------------------


def test_ledger_definitions_ship_the_sensors_the_job_and_the_resource(ledger_url: str) -> None:
    resource = IdempotencyLedger(url=ledger_url)
    defs = ledger_definitions(ledger=resource, name_prefix="ops_ledger")
    merged = Definitions.merge(Definitions(jobs=[work_job]), defs)
    repo = merged.get_repository_def()
    assert {s.name for s in repo.sensor_defs} == {
        "ops_ledger_on_failure",
        "ops_ledger_on_canceled",
        "ops_ledger_on_success",
    }
    assert repo.has_job("ops_ledger_admin") and repo.has_job(work_job.name)
    assert merged.get_job_def("ops_ledger_admin").description
    # without a resource, the user's Definitions bind `ledger` and the merge still resolves
    bare = Definitions.merge(Definitions(resources={"ledger": resource}), ledger_definitions())
    assert bare.get_job_def("rocky_ledger_admin").name == "rocky_ledger_admin"
    alone = Definitions(jobs=[ledger_admin_job(name="renamed")], resources={"ledger": resource})
    assert alone.get_job_def("renamed").name == "renamed"


def test_every_config_field_is_documented() -> None:
    fields = LedgerAdminConfig.model_fields
    assert set(fields) >= {
        "action",
        "key",
        "prefix",
        "state",
        "run_id",
        "touched_by",
        "fence",
        "dry_run",
    }
    assert all(f.description for f in fields.values()), [
        n for n, f in fields.items() if not f.description
    ]
    assert fields["dry_run"].default is True
