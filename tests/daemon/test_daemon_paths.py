"""Issue 7: every way Dagster starts work gets the right ledger decision, under the real daemon.

One `dagster dev -w workspace.yaml` (webserver + daemon, run retries and run monitoring on)
serves the whole module; each test drives it over GraphQL with keys of its own and asserts on
run status, run tags, what the steps reported and stored, and the ledger itself. The rows of
docs/behaviour-matrix.md map one to one onto these tests.

Each docstring ends with "Without the ledger", naming the assertion that would break if the
ledger wiring were removed (plain ops, a plain sensor and schedule, no guard).

`warehouse_job` runs use the in-process executor (`IN_PROCESS`) to keep the suite short: its
five steps would otherwise spawn five step processes per run. The executor takes no part in a
decision; every other job here runs on the default multiprocess executor, one process per step.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_server import (
    DaemonServer,
    alive,
    cmdline,
    run_pids,
    sigkill_tree,
    step_decisions,
    step_failure_text,
    stored_output,
    wait_for,
    warehouse_execute,
    warehouse_rows,
)
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.presentation import step_decisions as run_decisions

pytestmark = pytest.mark.e2e

KEY_TAG = "rocky/idempotency_key"
FORCE_TAG = "rocky/idempotency"
OUTCOME_TAG = "rocky/outcome"
SENSOR = "payments_drop_sensor"
SCHEDULE = "daily_warehouse_schedule"
ON_FAILURE = "rocky_ledger_on_failure"
WAREHOUSE_STEPS = (
    "load_payments",
    "replicate_shop",
    "build_models",
    "check_quality",
    "snapshot_customers",
)
SKIPS = {"skipped_completed", "skipped_in_flight"}
CLAIMS = {EventKind.CLAIMED, EventKind.ADOPTED, EventKind.FORCED}
RUN_TIMEOUT = 240.0
PAYMENT_HEADER = "payment_id,order_id,method,amount,paid_at\n"
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def decision(instance: DagsterInstance, run_id: str, step: str) -> str | None:
    """The decision the step showed in its metadata (the run's tags carry only a summary)."""
    return run_decisions(instance, run_id).get(step)


def rocky_tags(server: DaemonServer, run_id: str) -> dict[str, str]:
    return {k: v for k, v in server.tags(run_id).items() if k.startswith("rocky/")}


def hold(seconds: float) -> dict[str, Any]:
    return {"ops": {"hold_claim": {"config": {"seconds": seconds}}}}


def flaky(fail_times: int) -> dict[str, Any]:
    return {"ops": {"flaky_step": {"config": {"fail_times": fail_times}}}}


def history(ledger: Ledger, key: str) -> list[tuple[str, str | None]]:
    """The key's event log as (kind, run id), oldest first."""
    return [(EventKind(e.kind).value, e.run_id) for e in ledger.history(key)]


def claimants(ledger: Ledger, key: str) -> list[str | None]:
    """The runs that claimed `key` (and so did its work), in order."""
    return [e.run_id for e in ledger.history(key) if EventKind(e.kind) in CLAIMS]


def launch_together(launch: Callable[[], str], times: int = 2) -> list[str]:
    """Fire `launch` from `times` threads released at the same instant."""
    barrier = threading.Barrier(times)
    ids: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        barrier.wait()
        try:
            ids.append(launch())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return ids


def end_if_running(server: DaemonServer, run_id: str) -> None:
    """Terminate a long-holding run a failed test left behind (no process outlives the test)."""
    if server.run(run_id)["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
        return
    with suppress(AssertionError):
        server.terminate(run_id)
        server.wait_for_run(run_id, 120)


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def in_flight_by(ledger: Ledger, key: str, run_id: str) -> bool:
    entry = ledger.get(key)
    return entry is not None and entry.state == State.IN_FLIGHT and entry.run_id == run_id


def write_drop(data_dir: Path, name: str, rows: list[str]) -> Path:
    path = data_dir / "drops" / name
    path.write_text(PAYMENT_HEADER + "".join(f"{r}\n" for r in rows))
    return path


def payment_ids(data_dir: Path, low: int, high: int) -> list[int]:
    rows = warehouse_rows(
        data_dir / "warehouse.db",
        "SELECT payment_id FROM payments WHERE payment_id BETWEEN ? AND ? ORDER BY payment_id",
        (low, high),
    )
    return [r[0] for r in rows]


def ensure_payments_table(server: DaemonServer, data_dir: Path) -> None:
    """The load pipeline creates `payments` on its first load; make sure one happened."""
    if warehouse_rows(data_dir / "warehouse.db", "SELECT 1 FROM payments LIMIT 1"):
        return
    run_id = server.launch_run("load_job", {KEY_TAG: "e2e-setup-load"})
    assert server.wait_for_run(run_id, RUN_TIMEOUT)["status"] == "SUCCESS"


# --- sensors -------------------------------------------------------------------------------------


def test_sensor_run_key_ticking_repeatedly_runs_once_then_skips_naming_the_winner(
    dagster_dev: DaemonServer, ledger: Ledger, data_dir: Path, instance: DagsterInstance
) -> None:
    """Row: sensor with a run_key, ticking repeatedly over the same input.

    `payments_drop_sensor` is started and ticks over the seeded drop files until at least two
    ticks after every file's run finished. Each file gets exactly one run, whose op claimed the
    file's key and did the work; every later tick is SKIPPED with a SkipReason naming the run
    that loaded each file.

    Without the ledger: Dagster's own run_key dedup would still launch one run per file, but its
    later ticks would carry no SkipReason naming the winners (the skipReason assertions fail),
    the runs would carry no `proceed` decision and the ledger no claim for the file keys.
    """
    files = sorted(p.name for p in (data_dir / "drops").glob("payments_*"))
    assert files, "the example seeds its drop directory"

    def finished_runs() -> dict[str, list[dict[str, Any]]] | None:
        runs: dict[str, list[dict[str, Any]]] = {}
        for run in dagster_dev.runs({"dagster/sensor_name": SENSOR}):
            tags = {t["key"]: t["value"] for t in run["tags"]}
            runs.setdefault(tags.get("rocky/drop_file", ""), []).append(run)
        if set(files) <= set(runs) and all(
            r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for f in files for r in runs[f]
        ):
            return runs
        return None

    with dagster_dev.sensor_running(SENSOR):
        wait_for(finished_runs, f"a finished {SENSOR} run per drop file", RUN_TIMEOUT, 1.0)
        settled_at = datetime.now(UTC).timestamp()

        def skipped_ticks() -> list[dict[str, Any]] | None:
            ticks = [
                t
                for t in dagster_dev.sensor_ticks(SENSOR)
                if t["timestamp"] > settled_at and t["status"] != "STARTED"
            ]
            return ticks if len(ticks) >= 2 else None

        later = wait_for(skipped_ticks, f"two more {SENSOR} ticks", 120, 1.0)
    runs = finished_runs()
    assert runs is not None

    winners = {}
    for name in files:
        run = only(runs[name])  # exactly one run per file, however often the sensor ticked
        assert run["status"] == "SUCCESS", run
        tags = dagster_dev.tags(run["runId"])
        key = tags[KEY_TAG]
        assert tags["dagster/run_key"] == key  # a key that never ran keeps run_key == key
        assert decision(instance, run["runId"], "load_payments") == "proceed"
        assert claimants(ledger, f"{key}/load_payments") == [run["runId"]]
        entry = ledger.get(f"{key}/load_payments")
        assert entry is not None and entry.state == State.SUCCEEDED
        assert entry.run_id == run["runId"]
        winners[name] = run["runId"]

    for tick in later:
        assert tick["status"] == "SKIPPED", tick
        assert tick["runIds"] == [], tick
        for name, run_id in winners.items():
            assert run_id in (tick["skipReason"] or ""), (name, tick)


def test_sensor_failed_input_is_requested_again_and_proceeds_once_fixed(
    dagster_dev: DaemonServer, ledger: Ledger, data_dir: Path, instance: DagsterInstance
) -> None:
    """Row: sensor input whose run failed, then is fixed.

    A new drop file's load fails because the warehouse rejects one of its rows (a trigger
    injected by the test, standing for any fault outside the file). The failure is finalized
    in the ledger. Once the fault is removed, the same sensor requests the same input again —
    same file, same content, same ledger key — under a new run_key (`<key>#1`), and that run
    proceeds and loads the rows. Later ticks skip naming the run that loaded it.

    Without the ledger: Dagster never launches a sensor's run_key twice, even after a failure,
    so the second run would never appear (the wait for it times out) and the rows would never
    be loaded.
    """
    ensure_payments_table(dagster_dev, data_dir)
    warehouse = data_dir / "warehouse.db"
    name = "payments_2026-11-03.csv"
    drop = write_drop(
        data_dir,
        name,
        [f"{i},{i - 990000},card,{i - 989990}.50,2026-11-03T10:00:00Z" for i in (990001, 990002)],
    )
    warehouse_execute(
        warehouse,
        "CREATE TRIGGER e2e_reject_990001 BEFORE INSERT ON payments "
        "WHEN NEW.payment_id = 990001 "
        "BEGIN SELECT RAISE(ABORT, 'e2e: the warehouse rejects payment 990001'); END",
    )
    try:

        def runs_for_file() -> list[dict[str, Any]]:
            return dagster_dev.runs({"dagster/sensor_name": SENSOR, "rocky/drop_file": name})

        # the sensor is stopped as soon as it launched the run: no tick can re-request the key
        # while the fault is still there
        with dagster_dev.sensor_running(SENSOR):
            first_id = only(wait_for(runs_for_file, f"a run for {name}", 120, 1.0))["runId"]
        assert dagster_dev.wait_for_run(first_id, RUN_TIMEOUT)["status"] == "FAILURE"
        first = dagster_dev.tags(first_id)
        key = first[KEY_TAG]
        assert first["dagster/run_key"] == key
        ledger_key = f"{key}/load_payments"
        entry = ledger.get(ledger_key)
        assert entry is not None and entry.state == State.FAILED and entry.run_id == first_id
        assert payment_ids(data_dir, 990001, 990002) == []

        warehouse_execute(warehouse, "DROP TRIGGER e2e_reject_990001")  # the fix

        with dagster_dev.sensor_running(SENSOR):
            second_id = wait_for(
                lambda: [r["runId"] for r in runs_for_file() if r["runId"] != first_id],
                f"{SENSOR} to request {name} again",
                120,
                1.0,
            )[0]
            assert dagster_dev.wait_for_run(second_id, RUN_TIMEOUT)["status"] == "SUCCESS"
            done_at = datetime.now(UTC).timestamp()
            tick = wait_for(
                lambda: [
                    t
                    for t in dagster_dev.sensor_ticks(SENSOR, 5)
                    if t["timestamp"] > done_at and t["status"] != "STARTED"
                ],
                f"a {SENSOR} tick after the reload",
                120,
                1.0,
            )[-1]
        assert [r["runId"] for r in runs_for_file()] == [second_id, first_id]
        second = dagster_dev.tags(second_id)
        assert second[KEY_TAG] == key  # same input, same ledger key
        assert second["dagster/run_key"] == f"{key}#1"  # new run_key, so Dagster launches it
        assert decision(instance, second_id, "load_payments") == "proceed"
        assert history(ledger, ledger_key) == [
            ("claimed", first_id),
            ("failed", first_id),
            ("claimed", second_id),
            ("succeeded", second_id),
        ]
        assert payment_ids(data_dir, 990001, 990002) == [990001, 990002]
        assert tick["status"] == "SKIPPED" and second_id in (tick["skipReason"] or ""), tick
    finally:
        warehouse_execute(warehouse, "DROP TRIGGER IF EXISTS e2e_reject_990001")
        drop.unlink(missing_ok=True)


# --- schedules -----------------------------------------------------------------------------------


def test_schedule_tick_fired_twice_does_the_work_once(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: schedule tick fired twice for the same tick.

    Dagster's scheduler never fires one tick twice itself, so the test does what two schedulers
    (or a scheduler and an operator re-launching "that tick") would: the code server evaluates
    `daily_warehouse_schedule` for the same tick twice — both evaluations happen before any run
    exists, so both request the run — and both requests are launched at the same moment with
    the tags the scheduler sets (`dagster/schedule_name`, `dagster/run_key`,
    `.dagster/scheduled_execution_time`). Every op is claimed by exactly one of the two runs;
    the other run skips it (or never reaches it). A third evaluation of the tick then returns a
    SkipReason naming the run that did the work.

    Without the ledger: both runs would run every op (each step key would have two claimants,
    or none recorded at all), and the third evaluation would request a third run.
    """
    tick = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
    evaluations = [dagster_dev.evaluate_schedule(SCHEDULE, tick) for _ in range(2)]
    requests = [only(e["runRequests"]) for e in evaluations]
    assert requests[0] == requests[1]  # both evaluations asked for the same run
    request = requests[0]
    tags = {t["key"]: t["value"] for t in request["tags"]}
    key = tags[KEY_TAG]
    assert key == request["runKey"] == f"daily_warehouse@{tick.isoformat()}"
    scheduler_tags = {
        **tags,
        "dagster/schedule_name": SCHEDULE,
        "dagster/run_key": request["runKey"],
        ".dagster/scheduled_execution_time": tick.isoformat(),
    }
    run_ids = launch_together(
        lambda: dagster_dev.launch_run("warehouse_job", scheduler_tags, IN_PROCESS)
    )
    for run_id in run_ids:
        assert dagster_dev.wait_for_run(run_id, RUN_TIMEOUT)["status"] == "SUCCESS"

    workers = set()
    for step in WAREHOUSE_STEPS:
        worker = only(claimants(ledger, f"{key}/{step}"))
        assert worker in run_ids
        workers.add(worker)
        assert decision(instance, worker, step) == "proceed"
        other = next(r for r in run_ids if r != worker)
        assert decision(instance, other, step) in {*SKIPS, None}, (step, other)
    # one of the two runs skipped its very first op: it did none of the work
    assert any(decision(instance, r, "load_payments") in SKIPS for r in run_ids), run_ids

    again = dagster_dev.evaluate_schedule(SCHEDULE, tick)
    assert not again["runRequests"], again
    for worker in workers:
        assert worker in again["skipReason"], again


# --- manual launches -----------------------------------------------------------------------------


MANUAL_KEY = "e2e-manual-warehouse"


@pytest.fixture(scope="module")
def manual_runs(dagster_dev: DaemonServer) -> tuple[str, str]:
    """`warehouse_job` launched by hand twice with one key, one after the other."""
    run_ids = []
    for _ in range(2):
        run_id = dagster_dev.launch_run("warehouse_job", {KEY_TAG: MANUAL_KEY}, IN_PROCESS)
        assert dagster_dev.wait_for_run(run_id, RUN_TIMEOUT)["status"] == "SUCCESS"
        run_ids.append(run_id)
    return run_ids[0], run_ids[1]


def test_manual_launch_twice_with_one_key_second_run_skips_every_op(
    dagster_dev: DaemonServer,
    ledger: Ledger,
    instance: DagsterInstance,
    manual_runs: tuple[str, str],
) -> None:
    """Row: manual launch with `rocky/idempotency_key`, then the same key again.

    `warehouse_job` is launched twice with one key. The second run succeeds with every op
    `skipped_completed`: each op's output metadata names the first run as the prior run, and
    the value each op stored is the first run's recorded summary, marked replayed — no body
    ran.

    Without the ledger: the second run's ops would run their bodies again (their stored
    values would not be replays, the ledger would show no `skipped_completed`), and no
    metadata would name the first run.
    """
    first_id, second_id = manual_runs
    home = Path(dagster_dev.home)

    for step in WAREHOUSE_STEPS:
        assert decision(instance, first_id, step) == "proceed"
        assert decision(instance, second_id, step) == "skipped_completed"
        shown = only(step_decisions(instance, second_id, step))
        assert shown["rocky/decision"] == "skipped_completed"
        assert shown["rocky/prior_run_id"] == first_id
        assert shown["rocky/ledger_key"] == f"{MANUAL_KEY}/{step}"
        did = stored_output(home, first_id, step)
        replayed = stored_output(home, second_id, step)
        assert isinstance(did, dict) and not did.get("replayed"), did
        assert replayed == {**did, "replayed": True, "prior_run_id": first_id}
        assert history(ledger, f"{MANUAL_KEY}/{step}") == [
            ("claimed", first_id),
            ("succeeded", first_id),
            ("skipped_completed", second_id),
        ]


def test_manual_relaunch_shows_a_two_tag_summary_and_names_the_prior_run_in_metadata(
    dagster_dev: DaemonServer, instance: DagsterInstance, manual_runs: tuple[str, str]
) -> None:
    """Row: manual launch, then the same key again — the runs list reads at a glance.

    Each run carries two `rocky/` tags whatever its op count: the key and `rocky/outcome`
    (`worked`, then `skipped`); the skipped step's metadata links the run that did the work.

    Without the ledger: no outcome tag would say the second run skipped, and no metadata would
    name the first run.
    """
    first_id, second_id = manual_runs
    assert rocky_tags(dagster_dev, first_id) == {KEY_TAG: MANUAL_KEY, OUTCOME_TAG: "worked"}
    assert rocky_tags(dagster_dev, second_id) == {KEY_TAG: MANUAL_KEY, OUTCOME_TAG: "skipped"}
    assert decision(instance, second_id, "load_payments") == "skipped_completed"
    shown = only(step_decisions(instance, second_id, "load_payments"))
    assert shown["rocky/prior_run_id"] == first_id


# --- run retries and re-execution ----------------------------------------------------------------


def test_automatic_run_retry_proceeds_without_any_run_status_sensor(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: automatic run retry (`dagster/max_retries`) of a run whose op fails once.

    `flaky_job` fails on its first run attempt; the daemon retries it (`dagster/max_retries=1`).
    The ledger's failure sensor is stopped for the whole story, so no run-status sensor can
    react before the retry starts. The retry inherits the key, claims it at once (the failed
    attempt's claim was finalized failed by the op itself) and succeeds.

    Without the ledger: the ledger would show no claim/failed/claim/succeeded sequence and the
    retry no `proceed` decision; a ledger that kept the failure as a dedup record, or left the
    claim in flight for a sensor to settle, would make the retry skip and the run retry would
    do nothing.
    """
    key = "e2e-auto-retry"
    with dagster_dev.sensor_stopped(ON_FAILURE):
        root_id = dagster_dev.launch_run(
            "flaky_job", {KEY_TAG: key, "dagster/max_retries": "1"}, flaky(1)
        )
        assert dagster_dev.wait_for_run(root_id, RUN_TIMEOUT)["status"] == "FAILURE"
        retry_id = only(
            wait_for(
                lambda: dagster_dev.runs({"dagster/parent_run_id": root_id}),
                "the daemon's automatic retry",
                120,
                1.0,
            )
        )["runId"]
        assert dagster_dev.wait_for_run(retry_id, RUN_TIMEOUT)["status"] == "SUCCESS"
    root, retry = dagster_dev.tags(root_id), dagster_dev.tags(retry_id)
    assert root["dagster/will_retry"] == "true"
    assert retry["dagster/retry_number"] == "1"
    assert retry[KEY_TAG] == key
    assert decision(instance, root_id, "flaky_step") == "proceed"
    assert decision(instance, retry_id, "flaky_step") == "proceed"  # its own, not inherited
    assert rocky_tags(dagster_dev, root_id) == {KEY_TAG: key, OUTCOME_TAG: "failed"}  # what it was
    assert rocky_tags(dagster_dev, retry_id) == {KEY_TAG: key, OUTCOME_TAG: "worked"}
    assert history(ledger, f"{key}/flaky_step") == [
        ("claimed", root_id),
        ("failed", root_id),
        ("claimed", retry_id),
        ("succeeded", retry_id),
    ]
    assert stored_output(Path(dagster_dev.home), retry_id, "flaky_step") == {"attempt": 1}
    shown = only(step_decisions(instance, retry_id, "flaky_step"))
    assert shown["rocky/decision"] == "proceed"


def test_ui_reexecution_from_failure_proceeds(
    dagster_dev: DaemonServer, ledger: Ledger, data_dir: Path, instance: DagsterInstance
) -> None:
    """Row: UI re-execution from failure.

    A drop file with a refund booked as a payment makes `warehouse_job`'s quality check fail
    (load, replicate and build succeeded). The operator removes the bad row and re-executes
    from failure exactly as the UI does. The re-execution inherits the key; `check_quality`,
    whose claim was finalized failed, proceeds, and so does `snapshot_customers`; the steps
    that succeeded in the parent are neither re-run nor re-claimed.

    Without the ledger: the ledger would not show check_quality claimed by the parent, failed,
    then claimed and succeeded by the re-execution; a ledger that kept the failure as a dedup
    record would make the re-execution skip the check instead of running it.
    """
    key = "e2e-reexecute-from-failure"
    warehouse = data_dir / "warehouse.db"
    drop = write_drop(
        data_dir, "payments_2026-11-06.csv", ["990201,11,card,-5.00,2026-11-06T09:00:00Z"]
    )
    try:
        root_id = dagster_dev.launch_run("warehouse_job", {KEY_TAG: key}, IN_PROCESS)
        assert dagster_dev.wait_for_run(root_id, RUN_TIMEOUT)["status"] == "FAILURE"
        steps = dagster_dev.step_statuses(root_id)
        assert steps["check_quality"] == "FAILURE", steps
        entry = ledger.get(f"{key}/check_quality")
        assert entry is not None and entry.state == State.FAILED and entry.run_id == root_id

        warehouse_execute(warehouse, "DELETE FROM payments WHERE payment_id = 990201")  # the fix
        rerun_id = dagster_dev.reexecute_with(root_id, "FROM_FAILURE")
        assert dagster_dev.wait_for_run(rerun_id, RUN_TIMEOUT)["status"] == "SUCCESS"
    finally:
        drop.unlink(missing_ok=True)
        if payment_ids(data_dir, 990201, 990201):
            warehouse_execute(warehouse, "DELETE FROM payments WHERE payment_id = 990201")
    rerun = dagster_dev.tags(rerun_id)
    assert rerun[KEY_TAG] == key
    assert set(dagster_dev.step_statuses(rerun_id)) == {"check_quality", "snapshot_customers"}
    assert decision(instance, rerun_id, "check_quality") == "proceed"
    assert decision(instance, rerun_id, "snapshot_customers") == "proceed"
    assert history(ledger, f"{key}/check_quality") == [
        ("claimed", root_id),
        ("failed", root_id),
        ("claimed", rerun_id),
        ("succeeded", rerun_id),
    ]
    assert claimants(ledger, f"{key}/snapshot_customers") == [rerun_id]
    for step in ("load_payments", "replicate_shop", "build_models"):
        assert history(ledger, f"{key}/{step}") == [("claimed", root_id), ("succeeded", root_id)]


def test_ui_reexecute_all_of_a_success_skips_unless_forced(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: UI re-execute-all of a succeeded run.

    Re-executing all steps of a succeeded run (as the UI does) inherits its key: the op is
    `skipped_completed`, names the parent as the prior run and replays its recorded result.
    With the run tag `rocky/idempotency=force` the op runs again, and the ledger records the
    override (a `forced` event naming the record it overrode).

    Without the ledger: the plain re-execution would run the op again (a second claim, a stored
    value that is not a replay) and nothing would record the forced override.
    """
    key = "e2e-reexecute-all"
    home = Path(dagster_dev.home)
    root_id = dagster_dev.launch_run("flaky_job", {KEY_TAG: key}, flaky(0))
    assert dagster_dev.wait_for_run(root_id, RUN_TIMEOUT)["status"] == "SUCCESS"

    again_id = dagster_dev.reexecute_with(root_id, "ALL_STEPS")
    assert dagster_dev.wait_for_run(again_id, RUN_TIMEOUT)["status"] == "SUCCESS"
    again = dagster_dev.tags(again_id)
    assert again[KEY_TAG] == key
    assert decision(instance, again_id, "flaky_step") == "skipped_completed"
    # the re-execution copied its parent's `worked`; it shows its own summary
    assert rocky_tags(dagster_dev, again_id)[OUTCOME_TAG] == "skipped"
    shown = only(step_decisions(instance, again_id, "flaky_step"))
    assert shown["rocky/prior_run_id"] == root_id
    assert stored_output(home, again_id, "flaky_step") == {
        "attempt": 0,
        "replayed": True,
        "prior_run_id": root_id,
    }

    forced_id = dagster_dev.reexecute_with(root_id, "ALL_STEPS", {FORCE_TAG: "force"})
    assert dagster_dev.wait_for_run(forced_id, RUN_TIMEOUT)["status"] == "SUCCESS"
    forced = dagster_dev.tags(forced_id)
    assert forced[FORCE_TAG] == "force"
    assert decision(instance, forced_id, "flaky_step") == "proceed"
    assert stored_output(home, forced_id, "flaky_step") == {"attempt": 0}
    assert history(ledger, f"{key}/flaky_step") == [
        ("claimed", root_id),
        ("succeeded", root_id),
        ("skipped_completed", again_id),
        ("forced", forced_id),
        ("succeeded", forced_id),
    ]
    override = [e for e in ledger.history(f"{key}/flaky_step") if e.kind == EventKind.FORCED]
    assert root_id in (only(override).detail or "")


# --- assets --------------------------------------------------------------------------------------


def test_asset_backfill_twice_materializes_each_partition_once(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance, data_dir: Path
) -> None:
    """Row: partitioned asset backfill over 3 partitions, then the same backfill again.

    Two asset backfills (as the UI launches them) of `daily_order_report` over the same three
    days. The first materializes each partition once and writes its report; the second does
    no work: each of its runs logs an observation with the decision `skipped_completed` naming
    the run that materialized that day, reports that materialization again (a replay, so the
    backfill counts the day as done) and rewrites no report file.

    Without the ledger: the second backfill would do the work again (no replays, no
    observations) and rewrite the three report files.
    """
    asset = AssetKey("daily_order_report")
    days = ["2026-11-07", "2026-11-08", "2026-11-09"]
    scope = AssetRecordsFilter(asset_key=asset, asset_partitions=days)

    def materializations() -> list[Any]:
        return list(instance.fetch_materializations(scope, limit=100).records)

    assert materializations() == []
    first = dagster_dev.wait_for_backfill_runs(
        dagster_dev.launch_asset_backfill("daily_order_report", days), 3
    )
    assert {r["status"] for r in first} == {"SUCCESS"}
    by_day = {dagster_dev.tags(r["runId"])["dagster/partition"]: r["runId"] for r in first}
    assert sorted(by_day) == days
    done = materializations()
    assert sorted(m.partition_key for m in done) == days
    reports = {d: (data_dir / "reports" / f"orders_{d}.csv").stat().st_mtime_ns for d in days}

    second = dagster_dev.wait_for_backfill_runs(
        dagster_dev.launch_asset_backfill("daily_order_report", days), 3
    )
    assert {r["status"] for r in second} == {"SUCCESS"}
    replayed = [m for m in materializations() if m.run_id not in by_day.values()]
    assert len(replayed) == 3  # one replay per day, from the second backfill's runs
    for record in replayed:
        meta = record.asset_materialization.metadata
        assert meta["rocky/replay"].value is True
        assert meta["rocky/decision"].value == "skipped_completed"
    observed = {}
    for run in second:
        day = dagster_dev.tags(run["runId"])["dagster/partition"]
        shown = step_decisions(instance, run["runId"], "daily_order_report")
        assert len(shown) == 2  # the observation and the replayed output say the same
        for decision in shown:
            assert decision["rocky/decision"] == "skipped_completed"
            assert decision["rocky/prior_run_id"] == by_day[day]
        observed[day] = run["runId"]
    assert sorted(observed) == days
    observations = instance.fetch_observations(scope, limit=100).records
    assert sorted(o.partition_key for o in observations) == days
    assert {o.run_id for o in observations} == set(observed.values())
    for day in days:
        assert (data_dir / "reports" / f"orders_{day}.csv").stat().st_mtime_ns == reports[day]
        ledger_key = f"daily_order_report/{day}"
        assert claimants(ledger, ledger_key) == [by_day[day]]


# --- concurrency, crashes, cancels ---------------------------------------------------------------


def test_two_launches_of_one_key_at_once_exactly_one_works(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: two launches of one key at the same moment.

    Two `slow_job` runs with one key are launched at the same instant; the op would hold its
    claim for 600 s. The test waits for events, not for time: once the ledger shows one run's
    claim and the other run's `skipped_in_flight`, and the skipped run has ended SUCCESS
    (storing nothing, naming the holder), the holder is terminated, which releases its claim
    from the step itself. However slow the machine, the second run decides while the first
    still holds the key.

    Without the ledger: both runs would hold the claim op's body at once (no
    `skipped_in_flight` decision, no run named as holder).
    """
    key = "e2e-concurrent"
    ledger_key = f"{key}/hold_claim"
    home = Path(dagster_dev.home)
    run_ids = launch_together(lambda: dagster_dev.launch_run("slow_job", {KEY_TAG: key}, hold(600)))
    try:
        decided = wait_for(
            lambda: len(history(ledger, ledger_key)) >= 2 and history(ledger, ledger_key),
            "both runs to ask the ledger",
            RUN_TIMEOUT,
        )
        winner = only([r for kind, r in decided if kind == "claimed"])
        loser = only([r for kind, r in decided if kind == "skipped_in_flight"])
        assert sorted(run_ids) == sorted([winner, loser])
        assert dagster_dev.wait_for_run(loser, RUN_TIMEOUT)["status"] == "SUCCESS"
        assert in_flight_by(ledger, ledger_key, winner)  # still holding: the loser never waited
        dagster_dev.terminate(winner)
        assert dagster_dev.wait_for_run(winner, RUN_TIMEOUT)["status"] == "CANCELED"
    finally:
        for run_id in run_ids:
            end_if_running(dagster_dev, run_id)

    assert decision(instance, winner, "hold_claim") == "proceed"
    assert decision(instance, loser, "hold_claim") == "skipped_in_flight"
    shown = only(step_decisions(instance, loser, "hold_claim"))
    assert shown["rocky/held_by_run_id"] == winner
    assert stored_output(home, loser, "hold_claim") is None
    assert rocky_tags(dagster_dev, loser) == {KEY_TAG: key, OUTCOME_TAG: "skipped"}
    assert history(ledger, ledger_key) == [
        ("claimed", winner),
        ("skipped_in_flight", loser),
        ("released", winner),
    ]
    # released by the winner's own step on the cancel, not later by the CANCELED sensor
    assert ledger.history(ledger_key)[-1].detail == (
        f"run {winner} was interrupted (canceled) during the work"
    )


def test_sigkill_of_the_run_worker_mid_op_lets_the_next_run_proceed_at_once(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: run worker killed with SIGKILL mid-op.

    While `hold_claim` holds its claim, the run worker is SIGKILLed together with its step
    process (as when a container or host dies; no hook can run). The code server marks the run
    FAILURE. The ledger's failure sensor is stopped, so the claim stays in flight — until the
    next run with the key reaps it: that run asks Dagster, finds the holder FAILURE, settles
    the dead claim and proceeds. The lease (120 s by default, no heartbeat after the kill) is
    far longer than the wait, and the decision is `proceed` (not `adopted_stale`), so it was
    the reap, not the lease.

    Without the ledger: there would be no claim to reap, no `rocky/reaped_run_id` naming the
    killed run, and no claimed/failed/claimed/succeeded history.
    """
    key = "e2e-sigkill"
    ledger_key = f"{key}/hold_claim"
    with dagster_dev.sensor_stopped(ON_FAILURE):
        victim = dagster_dev.launch_run("slow_job", {KEY_TAG: key}, hold(600))
        try:
            wait_for(lambda: in_flight_by(ledger, ledger_key, victim), "the victim's claim", 180)
        except AssertionError:
            end_if_running(dagster_dev, victim)
            raise

        def pids() -> tuple[int, dict[str, int]] | None:
            worker, steps = run_pids(instance, victim)
            return (worker, steps) if worker and "hold_claim" in steps else None

        worker, steps = wait_for(pids, "the run worker's and step worker's pids", 60)
        assert "spawn_main" in cmdline(worker), cmdline(worker)
        assert steps["hold_claim"] in sigkill_tree(worker)
        assert dagster_dev.wait_for_run(victim, 120)["status"] == "FAILURE"
        wait_for(lambda: not any(alive(p) for p in (worker, steps["hold_claim"])), "the kill", 30)
        assert in_flight_by(ledger, ledger_key, victim)  # nobody has settled it

        nxt = dagster_dev.launch_run("slow_job", {KEY_TAG: key}, hold(0))
        assert dagster_dev.wait_for_run(nxt, 100)["status"] == "SUCCESS"
    assert decision(instance, nxt, "hold_claim") == "proceed"
    shown = only(step_decisions(instance, nxt, "hold_claim"))
    assert shown["rocky/decision"] == "proceed"
    # the reap is the point of this row: the next run met the dead claim, settled it and claimed
    assert shown["rocky/reaped_run_id"] == victim
    assert history(ledger, ledger_key) == [
        ("claimed", victim),
        ("skipped_in_flight", nxt),
        ("failed", victim),
        ("claimed", nxt),
        ("succeeded", nxt),
    ]


def test_terminated_run_is_canceled_its_claim_released_and_the_next_run_proceeds(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance
) -> None:
    """Row: run terminated from the UI/GraphQL.

    A `slow_job` run is terminated over GraphQL (the UI's Terminate) while it holds its claim.
    It ends CANCELED and its claim is released (the key is free again, with a `released`
    event), before any other run asks; the next run with the key proceeds without reaping
    anything.

    Without the ledger: there would be no `released` event and the next run no `proceed`
    decision; a canceled holder whose claim stayed in flight would make the next run depend on
    a reap or the lease instead.
    """
    key = "e2e-terminate"
    ledger_key = f"{key}/hold_claim"
    victim = dagster_dev.launch_run("slow_job", {KEY_TAG: key}, hold(600))
    try:
        wait_for(lambda: in_flight_by(ledger, ledger_key, victim), "the victim's claim", 180)
    except AssertionError:
        end_if_running(dagster_dev, victim)
        raise
    dagster_dev.terminate(victim)
    assert dagster_dev.wait_for_run(victim, 120)["status"] == "CANCELED"
    wait_for(
        lambda: getattr(ledger.get(ledger_key), "released", False),
        "the canceled run's claim to be released",
        60,
    )
    assert history(ledger, ledger_key) == [("claimed", victim), ("released", victim)]
    # the step released it on the interrupt (the CANCELED sensor would say "sensor")
    released = ledger.history(ledger_key)[-1]
    assert released.detail == f"run {victim} was interrupted (canceled) during the work"

    nxt = dagster_dev.launch_run("slow_job", {KEY_TAG: key}, hold(0))
    assert dagster_dev.wait_for_run(nxt, RUN_TIMEOUT)["status"] == "SUCCESS"
    assert decision(instance, nxt, "hold_claim") == "proceed"
    shown = only(step_decisions(instance, nxt, "hold_claim"))
    assert "rocky/reaped_run_id" not in shown
    assert history(ledger, ledger_key)[2:] == [("claimed", nxt), ("succeeded", nxt)]


# --- the ledger itself unavailable ---------------------------------------------------------------


def test_read_only_ledger_fails_closed_and_does_no_work(
    dagster_dev: DaemonServer, ledger: Ledger, instance: DagsterInstance, data_dir: Path
) -> None:
    """Row: ledger file unavailable (made read-only) during a launch.

    With the ledger file at mode 0444, `load_job` is launched with a key while a new drop file
    waits to be loaded. The op fails closed: its failure names `LedgerUnavailableError` and the
    read-only file, no row of the file reaches the warehouse, and the ledger holds nothing for
    the key (no entry, no event; the whole ledger unchanged). Once the file is writable again
    the same key proceeds and loads the file — so the failed run really had work to skip.

    Without the ledger: the first run would load the file (its rows would be in the warehouse)
    and succeed.
    """
    ensure_payments_table(dagster_dev, data_dir)
    key = "e2e-read-only-ledger"
    ledger_key = f"{key}/load_payments"
    path = Path(dagster_dev.home) / "rocky_ledger.db"
    drop = write_drop(
        data_dir,
        "payments_2026-11-05.csv",
        [f"{i},{i - 990090},card,12.00,2026-11-05T08:00:00Z" for i in (990101, 990102, 990103)],
    )
    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        before = ledger.stats()
        os.chmod(path, 0o444)
        try:
            failed_id = dagster_dev.launch_run("load_job", {KEY_TAG: key})
            assert dagster_dev.wait_for_run(failed_id, RUN_TIMEOUT)["status"] == "FAILURE"
            after = ledger.stats()
        finally:
            os.chmod(path, mode)
        failure = step_failure_text(instance, failed_id, "load_payments")
        assert "LedgerUnavailableError" in failure, failure
        assert "read-only" in failure, failure
        assert "did no work" in failure, failure
        assert decision(instance, failed_id, "load_payments") is None
        assert payment_ids(data_dir, 990101, 990103) == []
        assert ledger.get(ledger_key) is None
        assert history(ledger, ledger_key) == []
        assert (after.events, after.last_fence, after.entries) == (
            before.events,
            before.last_fence,
            before.entries,
        )

        retried_id = dagster_dev.launch_run("load_job", {KEY_TAG: key})
        assert dagster_dev.wait_for_run(retried_id, RUN_TIMEOUT)["status"] == "SUCCESS"
        assert decision(instance, retried_id, "load_payments") == "proceed"
        assert payment_ids(data_dir, 990101, 990103) == [990101, 990102, 990103]
        assert history(ledger, ledger_key) == [("claimed", retried_id), ("succeeded", retried_id)]
    finally:
        drop.unlink(missing_ok=True)
