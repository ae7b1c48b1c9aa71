"""Issue 12: the asset launch paths get the right ledger decision, under the real daemon.

One `dagster dev -w workspace.yaml` (webserver + daemon) serves the whole module (its own,
so the module runs alone); each test drives it over GraphQL the way the UI or the daemon does
— declarative automation, a subset materialization, an asset backfill, a whole asset group
launched with a key — and asserts on what the instance recorded (materializations and
observations per asset), the ledger and the example's data.

Each docstring ends with "Without the ledger", naming the assertion that would break if the
guard were removed (plain assets, a plain multi-asset running its whole pipeline).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from daemon_server import (
    LAUNCH_BACKFILL,
    DaemonServer,
    metadata_text,
    wait_for,
    warehouse_rows,
)
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    EventLogRecord,
)
from dagster_server import LAUNCH_RUN_MUTATION, TERMINAL

from rocky_dagster.ledger import EventKind, Ledger

pytestmark = pytest.mark.e2e

KEY_TAG = "rocky/idempotency_key"
ASSET_JOB = "__ASSET_JOB"
"""The implicit job the UI launches when assets are materialized from the catalog or graph."""
AUTOMATION_SENSOR = "default_automation_condition_sensor"
AUTOMATED_TAG = "dagster/from_automation_condition"
RUN_TIMEOUT = 240.0
AUTOMATION_TIMEOUT = 360.0
"""Two cron ticks a minute apart, each seen by a sensor evaluating every 30 s, on a busy host."""
SKIPPED = "skipped_completed"
CLAIMS = {EventKind.CLAIMED, EventKind.ADOPTED, EventKind.FORCED}

GROUP_ASSETS_QUERY = """
query GroupAssets($g: AssetGroupSelector!) { assetNodes(group: $g) { assetKey { path }
  assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }
"""

DOCUMENTS = {"group_assets": GROUP_ASSETS_QUERY}


# --- helpers -------------------------------------------------------------------------------------


def history(ledger: Ledger, key: str) -> list[tuple[str, str | None]]:
    """The key's event log as (kind, run id), oldest first."""
    return [(EventKind(e.kind).value, e.run_id) for e in ledger.history(key)]


def claimants(ledger: Ledger, key: str) -> list[str | None]:
    """The runs that claimed `key` (and so did its work), in order."""
    return [e.run_id for e in ledger.history(key) if EventKind(e.kind) in CLAIMS]


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def tag_map(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


def materializations(
    instance: DagsterInstance, asset: str, partitions: list[str] | None = None
) -> list[EventLogRecord]:
    scope = AssetRecordsFilter(
        asset_key=AssetKey.from_user_string(asset), asset_partitions=partitions
    )
    return list(instance.fetch_materializations(scope, limit=1000).records)


def observations(
    instance: DagsterInstance, asset: str, partitions: list[str] | None = None
) -> list[EventLogRecord]:
    scope = AssetRecordsFilter(
        asset_key=AssetKey.from_user_string(asset), asset_partitions=partitions
    )
    return list(instance.fetch_observations(scope, limit=1000).records)


def shown(record: EventLogRecord) -> dict[str, str]:
    """The rocky/* metadata an observation carries, as text (run links give their run id)."""
    observation = record.asset_observation
    assert observation is not None
    return {k: metadata_text(v) for k, v in observation.metadata.items() if k.startswith("rocky/")}


def replays(records: list[EventLogRecord]) -> list[EventLogRecord]:
    """The materializations a skipped step reported in a backfill run (no work done)."""
    replayed = []
    for record in records:
        flag = record.asset_materialization and record.asset_materialization.metadata.get(
            "rocky/replay"
        )
        if flag is not None and getattr(flag, "value", None) is True:
            replayed.append(record)
    return replayed


def launch_assets(
    server: DaemonServer,
    assets: Iterable[str],
    tags: dict[str, str] | None = None,
    checks: Iterable[tuple[str, str]] = (),
) -> str:
    """What the UI's "Materialize" sends for the selected assets (and their checks): a run of
    the implicit asset job with an asset selection."""
    data = server.graphql(
        LAUNCH_RUN_MUTATION,
        {
            "p": {
                "selector": {
                    "repositoryLocationName": server.location,
                    "repositoryName": server.repository,
                    "jobName": ASSET_JOB,
                    "assetSelection": [{"path": AssetKey.from_user_string(a).path} for a in assets],
                    "assetCheckSelection": [
                        {"assetKey": {"path": AssetKey.from_user_string(a).path}, "name": name}
                        for a, name in checks
                    ],
                },
                "runConfigData": {},
                "executionMetadata": {
                    "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]
                },
            }
        },
    )
    result = data["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return str(result["run"]["runId"])


def launch_backfill(
    server: DaemonServer,
    assets: list[str],
    partitions: list[str],
    tags: dict[str, str] | None = None,
) -> str:
    """What the UI's "Materialize selected partitions" sends for several assets (with tags:
    what the launch dialog's tags add to every run of the backfill)."""
    params: dict[str, Any] = {
        "assetSelection": [{"path": AssetKey.from_user_string(a).path} for a in assets],
        "partitionNames": partitions,
    }
    if tags:
        params["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
    data = server.graphql(LAUNCH_BACKFILL, {"p": params})
    result = data["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return str(result["backfillId"])


def group_assets(server: DaemonServer, group: str) -> dict[str, list[str]]:
    """The group's assets as the UI lists them: asset key → the names of its checks."""
    data = server.graphql(
        GROUP_ASSETS_QUERY,
        {
            "g": {
                "groupName": group,
                "repositoryName": server.repository,
                "repositoryLocationName": server.location,
            }
        },
    )
    found = {}
    for node in data["assetNodes"]:
        checks = node["assetChecksOrError"]
        names = (
            [c["name"] for c in checks["checks"]] if checks["__typename"] == "AssetChecks" else []
        )
        found[AssetKey(node["assetKey"]["path"]).to_user_string()] = names
    return found


def succeeded(server: DaemonServer, run_id: str) -> None:
    run = server.wait_for_run(run_id, RUN_TIMEOUT)
    assert run["status"] == "SUCCESS", (run, server.log_tail())


def source_execute(data_dir: Path, *statements: str) -> None:
    """Change the shop (the replication's source) as its application would."""
    conn = sqlite3.connect(data_dir / "shop.db", timeout=30)
    try:
        with conn:
            for sql in statements:
                conn.execute(sql)
    finally:
        conn.close()


# --- 1. declarative automation -------------------------------------------------------------------


def automated_runs(server: DaemonServer) -> list[dict[str, Any]]:
    """Runs the automation sensor launched, oldest first."""
    return list(reversed(server.runs({AUTOMATED_TAG: "true"}, limit=100)))


def automate_until(server: DaemonServer, count: int) -> list[dict[str, Any]]:
    """Run the automation sensor until `count` automated runs exist in all, stop it, and return
    every automated run once all are finished (a tick under way when it stopped may add one)."""
    with server.sensor_running(AUTOMATION_SENSOR):
        wait_for(
            lambda: len(automated_runs(server)) >= count,
            f"{count} runs launched by {AUTOMATION_SENSOR}",
            AUTOMATION_TIMEOUT,
            2.0,
        )

    wait_for(
        lambda: all(t["status"] != "STARTED" for t in server.sensor_ticks(AUTOMATION_SENSOR, 5)),
        f"the last {AUTOMATION_SENSOR} tick to end (no run can appear after this)",
        120,
        1.0,
    )

    def all_finished() -> list[dict[str, Any]] | None:
        runs = automated_runs(server)
        return runs if all(r["status"] in TERMINAL for r in runs) else None

    return wait_for(all_finished, "the automated runs to finish", RUN_TIMEOUT, 1.0)


def test_automation_ticking_twice_over_unchanged_upstream_materializes_once_then_again_after_it(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance, data_dir: Path
) -> None:
    """Path 1: declarative automation ticking twice over unchanged upstream.

    `orders_summary` asks for a run on every cron tick (`cron_tick_passed("* * * * *")`) and is
    keyed by `input_versions_key`. Dagster ships its `default_automation_condition_sensor`
    STOPPED in open source; the test starts it over GraphQL (the UI's toggle) until two
    automated runs exist. The first materializes; the second — same code, `orders_extract`
    unchanged — materializes nothing and logs an observation naming the first. Once
    `orders_extract` is materialized (from the UI), the next automated run materializes again,
    under a new ledger key.

    Without the ledger: the second automated run would materialize `orders_summary` again (two
    materializations before the upstream changed, no observation naming the first run).
    """
    summary = "orders_summary"
    assert materializations(instance, summary) == []
    first_runs = automate_until(dagster_dev, 2)
    assert len(first_runs) >= 2, first_runs
    for run in first_runs:
        assert run["status"] == "SUCCESS", run
        tags = tag_map(run)
        assert tags["dagster/sensor_name"] == AUTOMATION_SENSOR
        assert "dagster/run_key" not in tags  # automation gives no key: input_versions_key does
    first_id = first_runs[0]["runId"]
    done = materializations(instance, summary)
    assert [m.run_id for m in done] == [first_id]  # once, however often automation asked
    done_meta = done[0].asset_materialization
    assert done_meta is not None
    first_key = metadata_text(done_meta.metadata["rocky/ledger_key"])
    assert first_key.endswith("/orders_summary") and first_key.startswith("inputs:"), first_key
    skips = {o.run_id: shown(o) for o in observations(instance, summary)}
    assert set(skips) == {r["runId"] for r in first_runs[1:]}
    for meta in skips.values():
        assert meta["rocky/decision"] == SKIPPED
        assert meta["rocky/prior_run_id"] == first_id
        assert meta["rocky/ledger_key"] == first_key
    assert history(ledger, first_key) == [
        ("claimed", first_id),
        ("succeeded", first_id),
        *((SKIPPED, r["runId"]) for r in first_runs[1:]),
    ]

    upstream_id = launch_assets(dagster_dev, ["orders_extract"])
    succeeded(dagster_dev, upstream_id)
    seen = {r["runId"] for r in first_runs}
    later = [r for r in automate_until(dagster_dev, len(first_runs) + 1) if r["runId"] not in seen]
    assert later and all(r["status"] == "SUCCESS" for r in later), later
    again_id = later[0]["runId"]
    done = materializations(instance, summary)
    assert sorted(m.run_id for m in done) == sorted([first_id, again_id])
    latest = next(m for m in done if m.run_id == again_id).asset_materialization
    assert latest is not None
    again_key = metadata_text(latest.metadata["rocky/ledger_key"])
    assert again_key != first_key  # a new upstream version is a new key
    assert metadata_text(latest.metadata["rocky/decision"]) == "proceed"
    assert claimants(ledger, again_key) == [again_id]
    assert claimants(ledger, first_key) == [first_id]
    written = (data_dir / "reports" / "orders_summary.json").read_text()
    assert again_id in written, written


# --- 2. a subset materialization from the UI -----------------------------------------------------


def test_subset_materialization_claims_and_works_only_the_selected_assets(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance, data_dir: Path
) -> None:
    """Path 2: the UI materializes `raw_orders` only, one of `wh_replicate`'s two assets.

    The shop gains a new order and a new customer; the run (the implicit asset job with an
    asset selection, as the UI launches it, with a key) claims `<key>/raw_orders` and nothing
    for `raw_customers`, copies the new order and not the new customer, and materializes
    `raw_orders` only.

    Without the ledger: there would be no claim for `<key>/raw_orders` (its history would be
    empty) and no decision on its materialization; a multi-asset running its whole pipeline
    would also copy the new customer into `raw_customers`.
    """
    key = "e2e-assets-subset"
    warehouse = data_dir / "warehouse_assets.db"
    source_execute(
        data_dir,
        "INSERT INTO orders VALUES (990301, 1, 42.0, 'placed', "
        "'2099-01-01T00:00:00Z', '2099-01-01T00:00:00Z')",
        "INSERT INTO customers VALUES (990301, 'Customer e2e', 'DE', '2099-01-01T00:00:00Z')",
    )
    run_id = launch_assets(dagster_dev, ["raw_orders"], {KEY_TAG: key})
    succeeded(dagster_dev, run_id)

    assert set(dagster_dev.step_statuses(run_id)) == {"wh_replicate"}
    assert history(ledger, f"{key}/raw_orders") == [("claimed", run_id), ("succeeded", run_id)]
    assert ledger.get(f"{key}/raw_customers") is None
    assert history(ledger, f"{key}/raw_customers") == []
    assert warehouse_rows(warehouse, "SELECT id FROM raw_orders WHERE id = 990301") == [(990301,)]
    assert warehouse_rows(warehouse, "SELECT id FROM raw_customers WHERE id = 990301") == []
    mine = [m for m in materializations(instance, "raw_orders") if m.run_id == run_id]
    meta = only(mine).asset_materialization.metadata
    assert metadata_text(meta["rocky/decision"]) == "proceed"
    assert metadata_text(meta["rocky/ledger_key"]) == f"{key}/raw_orders"
    assert [m for m in materializations(instance, "raw_customers") if m.run_id == run_id] == []


# --- 3. a multi-asset backfill, twice ------------------------------------------------------------


def test_multi_asset_backfill_of_two_partitions_twice_materializes_each_once(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance, data_dir: Path
) -> None:
    """Path 3: `daily_shop_reports` (a partitioned multi-asset, two reports per day) backfilled
    over two days, then the same backfill again.

    The first backfill materializes each (report, day) once, from the run of its day, and
    writes its file; the second does no work: each of its runs logs one observation per report
    naming the run that materialized it, reports the recorded materialization again (a replay,
    so the backfill counts the partition as done) and rewrites no file.

    Without the ledger: the second backfill would do all the work again (no replays, no
    observations) and rewrite the four report files.
    """
    reports = ["daily_revenue_report", "daily_status_report"]
    days = ["2026-11-02", "2026-11-03"]
    assert all(materializations(instance, r, days) == [] for r in reports)

    first = dagster_dev.wait_for_backfill_runs(launch_backfill(dagster_dev, reports, days), 2)
    assert {r["status"] for r in first} == {"SUCCESS"}
    by_day = {tag_map(r)["dagster/partition"]: r["runId"] for r in first}
    assert sorted(by_day) == days
    files = {(r, d): data_dir / "reports" / f"{r}_{d}.csv" for r in reports for d in days}
    for report in reports:
        done = materializations(instance, report, days)
        assert sorted((m.partition_key, m.run_id) for m in done) == sorted(by_day.items())
    written = {pair: path.stat().st_mtime_ns for pair, path in files.items()}

    second = dagster_dev.wait_for_backfill_runs(launch_backfill(dagster_dev, reports, days), 2)
    assert {r["status"] for r in second} == {"SUCCESS"}
    again = {tag_map(r)["dagster/partition"]: r["runId"] for r in second}
    assert sorted(again) == days
    for report in reports:
        done = materializations(instance, report, days)
        assert len(done) == 4 and sorted(r.run_id for r in replays(done)) == sorted(again.values())
        seen = observations(instance, report, days)
        assert sorted((o.partition_key, o.run_id) for o in seen) == sorted(again.items())
        for observation in seen:
            meta = shown(observation)
            day = observation.partition_key
            assert meta["rocky/decision"] == SKIPPED
            assert meta["rocky/prior_run_id"] == by_day[day]
            assert meta["rocky/ledger_key"] == f"{report}/{day}"
        for day in days:
            assert claimants(ledger, f"{report}/{day}") == [by_day[day]]
    for pair, path in files.items():
        assert path.stat().st_mtime_ns == written[pair], pair


def settled_backfill(instance: DagsterInstance, backfill_id: str) -> Any:
    """The backfill once the daemon has settled it (any status but REQUESTED / FAILING)."""

    def settled() -> Any:
        backfill = instance.get_backfill(backfill_id)
        status = backfill.status.value if backfill is not None else None
        return backfill if status not in (None, "REQUESTED", "FAILING") else None

    return wait_for(settled, f"backfill {backfill_id} to be settled", RUN_TIMEOUT, 1.0)


def failed_partitions(backfill: Any) -> list[str]:
    """The (asset, partition) pairs the backfill marked failed, as the UI counts them."""
    subset = backfill.asset_backfill_data.failed_and_downstream_subset
    return sorted(
        f"{p.asset_key.to_user_string()}@{p.partition_key}"
        for p in subset.iterate_asset_partitions()
    )


def test_multi_asset_backfill_twice_with_one_key_completes_with_no_partition_failed(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Path 3b: the same backfill of `daily_shop_reports` twice, both carrying one key tag.

    The second backfill's runs skip every (report, day) and each reports a replay of the
    recorded materialization, so Dagster counts the partition as done: the backfill completes
    successfully and marks no partition failed. Yielding nothing (a plain skip) left the
    backfill in progress forever on Dagster 1.12.22 and has it mark the partitions failed on
    1.13.22+ (Dagster issue #34219).

    Without the ledger: the second backfill would do every partition's work again.
    """
    reports = ["daily_revenue_report", "daily_status_report"]
    days = ["2026-11-05", "2026-11-06"]
    tags = {KEY_TAG: "backfill-3b"}

    first_id = launch_backfill(dagster_dev, reports, days, tags)
    first = dagster_dev.wait_for_backfill_runs(first_id, 2)
    assert {r["status"] for r in first} == {"SUCCESS"}
    done = settled_backfill(instance, first_id)
    assert (done.status.value, failed_partitions(done)) == ("COMPLETED_SUCCESS", [])
    by_day = {tag_map(r)["dagster/partition"]: r["runId"] for r in first}

    second_id = launch_backfill(dagster_dev, reports, days, tags)
    second = dagster_dev.wait_for_backfill_runs(second_id, 2)
    assert {r["status"] for r in second} == {"SUCCESS"}
    again = {tag_map(r)["dagster/partition"]: r["runId"] for r in second}
    for report in reports:
        done = materializations(instance, report, days)  # every partition skipped: replays
        assert len(done) == 4 and sorted(r.run_id for r in replays(done)) == sorted(again.values())
        for observation in observations(instance, report, days):
            assert shown(observation)["rocky/decision"] == SKIPPED
            assert shown(observation)["rocky/prior_run_id"] == by_day[observation.partition_key]
    settled = settled_backfill(instance, second_id)
    assert failed_partitions(settled) == []
    assert settled.status.value == "COMPLETED_SUCCESS"


# --- 4. the defs.yaml warehouse launched twice with one key --------------------------------------


def test_yaml_declared_warehouse_launched_twice_with_one_key_second_run_materializes_nothing(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Path 4: the `warehouse` group (declared in defs/warehouse/defs.yaml) materialized from the
    UI with its checks, twice with one `rocky/idempotency_key`.

    The first run materializes every asset of the group and evaluates its checks; the second
    materializes and evaluates nothing. Every asset shows an observation from the second run
    naming the first: the steps whose assets skip say it for their own assets and for the ones
    downstream, whose steps (and check steps) Dagster does not start.

    Without the ledger: the second run would materialize every asset again (no observation at
    all, and the ledger no `skipped_completed` for the steps that ran).
    """
    key = "e2e-assets-warehouse"
    group = group_assets(dagster_dev, "warehouse")
    assets = sorted(group)
    assert assets == sorted(
        [
            "payments",
            "raw_orders",
            "raw_customers",
            "stg_orders",
            "customer_revenue",
            "daily_orders",
            "order_payments",
            "customers_history",
        ]
    )
    checks = [(asset, name) for asset, names in group.items() for name in names]
    assert checks, "the quality pipeline checks assets of the group"

    first_id = launch_assets(dagster_dev, assets, {KEY_TAG: key}, checks)
    succeeded(dagster_dev, first_id)
    second_id = launch_assets(dagster_dev, assets, {KEY_TAG: key}, checks)
    succeeded(dagster_dev, second_id)

    for asset in assets:
        runs = [m.run_id for m in materializations(instance, asset)]
        assert runs.count(first_id) == 1, (asset, runs)
        assert second_id not in runs, asset
        seen = [shown(o) for o in observations(instance, asset) if o.run_id == second_id]
        assert seen, f"no observation of {asset} in the second run"
        for meta in seen:
            assert meta["rocky/decision"] == SKIPPED, (asset, meta)
            assert meta["rocky/prior_run_id"] == first_id, (asset, meta)
            assert meta["rocky/ledger_key"] == f"{key}/{asset}", (asset, meta)
        assert claimants(ledger, f"{key}/{asset}") == [first_id], asset
    for asset in ("payments", "raw_orders", "raw_customers"):  # their steps ran and skipped
        assert history(ledger, f"{key}/{asset}")[-1] == (SKIPPED, second_id), asset
    # the checks ran once too: Dagster skips a check step whose asset yielded nothing
    evaluated = {
        run_id: [
            e.dagster_event.asset_check_evaluation_data.check_name
            for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
        for run_id in (first_id, second_id)
    }
    assert sorted(evaluated[first_id]) == sorted(name for _, name in checks)
    assert evaluated[second_id] == []


# --- the documents above, against the installed schema (no server) ------------------------------


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_document_is_valid_against_the_installed_schema(name: str) -> None:
    """A renamed field fails here with the schema's message, not as a timeout in a test above."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    errors = validate(create_schema().graphql_schema, parse(DOCUMENTS[name]))
    assert not errors, [e.message for e in errors]
