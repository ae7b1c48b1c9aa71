"""End to end through the UI's API: one real `dagster dev` (webserver + daemon + code server)
for the module, the example project loaded from workspace.yaml, runs launched, re-executed and
terminated over GraphQL, the real default ledger file under the temp DAGSTER_HOME, and a
headless Chromium looking at the run page.

Every test uses its own idempotency key. The server is shared (starting one costs seconds), so
is the example's data directory.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster_server import ARTIFACTS, DagsterServer, browser_page, session_processes

from rocky_dagster.ledger import EventKind, Ledger, State, open_ledger

pytestmark = pytest.mark.e2e

KEY_TAG = "rocky/idempotency_key"
WAREHOUSE_STEPS = (
    "load_payments",
    "replicate_shop",
    "build_models",
    "check_quality",
    "snapshot_customers",
)
CANCELED_SENSOR = "rocky_ledger_on_canceled"


OUTCOME_TAG = "rocky/outcome"


def decisions(server: DagsterServer, run_id: str) -> dict[str, str]:
    """step -> the decision it showed in its metadata (a run's tags carry only a summary)."""
    from dagster import DagsterInstance

    from rocky_dagster.step.presentation import step_decisions

    instance = DagsterInstance.from_config(str(server.home))
    try:
        return step_decisions(instance, run_id)
    finally:
        instance.dispose()


def rocky_tags(server: DagsterServer, run_id: str) -> dict[str, str]:
    return {k: v for k, v in server.tags(run_id).items() if k.startswith("rocky/")}


@dataclass
class Example:
    server: DagsterServer
    data_dir: Path

    @property
    def warehouse(self) -> Path:
        return self.data_dir / "warehouse.db"

    def ledger(self) -> Ledger:
        return open_ledger(self.server.ledger_path)

    def count(self, table: str) -> int:
        with sqlite3.connect(self.warehouse) as conn:
            return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])

    def content(self) -> dict[str, list[tuple]]:
        """Every table's rows (bookkeeping tables with their timestamps included), sorted."""
        with sqlite3.connect(self.warehouse) as conn:
            names = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            return {
                n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names
            }


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    """`dagster dev -w workspace.yaml` on a free port, a temp DAGSTER_HOME and data dir."""
    root = tmp_path_factory.mktemp("e2e_ui")
    data_dir = root / "data"
    server = DagsterServer(
        home=root / "dagster_home", env={"ROCKY_EXAMPLE_DATA_DIR": str(data_dir)}
    )
    server.start()
    try:
        yield Example(server, data_dir)
        server.terminate_unfinished()  # e.g. a held run whose test was deselected
    finally:
        server.stop()
    assert not server.leftovers, f"processes left after SIGINT (SIGKILLed): {server.leftovers}"


@dataclass
class TwoRuns:
    key: str
    first: str
    second: str
    counts_after_first: dict[str, int]
    content_after_first: dict[str, list[tuple]]
    content_after_second: dict[str, list[tuple]]


WAREHOUSE_TABLES = (
    "payments",
    "raw_customers",
    "raw_orders",
    "customer_revenue",
    "customers_history",
)


@pytest.fixture(scope="module")
def warehouse_twice(example: Example) -> TwoRuns:
    """warehouse_job launched twice with one key, each run waited for."""
    server = example.server
    key = "e2e-warehouse-twice"
    first = server.launch_run("warehouse_job", tags={KEY_TAG: key})
    run = server.wait_for_run(first)
    assert run["status"] == "SUCCESS", (run, server.log_tail())
    counts = {t: example.count(t) for t in WAREHOUSE_TABLES}
    after_first = example.content()
    second = server.launch_run("warehouse_job", tags={KEY_TAG: key})
    run = server.wait_for_run(second)
    assert run["status"] == "SUCCESS", (run, server.log_tail())
    return TwoRuns(key, first, second, counts, after_first, example.content())


def test_warehouse_job_runs_once_per_key(example: Example, warehouse_twice: TwoRuns) -> None:
    server, runs = example.server, warehouse_twice

    assert rocky_tags(server, runs.first) == {KEY_TAG: runs.key, OUTCOME_TAG: "worked"}
    assert decisions(server, runs.first) == dict.fromkeys(WAREHOUSE_STEPS, "proceed")
    assert all(n > 0 for n in runs.counts_after_first.values()), runs.counts_after_first

    assert rocky_tags(server, runs.second) == {KEY_TAG: runs.key, OUTCOME_TAG: "skipped"}
    assert decisions(server, runs.second) == dict.fromkeys(WAREHOUSE_STEPS, "skipped_completed")
    # Replayed, not redone: every step still "succeeds" (downstream ops ran on the replayed
    # summaries) and the warehouse, load and watermark records included, is exactly as the
    # first run left it.
    assert server.step_statuses(runs.second) == dict.fromkeys(WAREHOUSE_STEPS, "SUCCESS")
    assert runs.content_after_second == runs.content_after_first

    with example.ledger() as ledger:
        for step in WAREHOUSE_STEPS:
            entry = ledger.get(f"{runs.key}/{step}")
            assert entry is not None, step
            assert (entry.state, entry.run_id) == (State.SUCCEEDED, runs.first), entry
            assert entry.result, entry
            kinds = [e.kind for e in ledger.history(f"{runs.key}/{step}")]
            assert kinds.count(EventKind.CLAIMED) == 1, kinds
            assert kinds.count(EventKind.SKIPPED_COMPLETED) == 1, kinds
        assert ledger.entries(State.IN_FLIGHT, run_id=runs.second) == []

    skip_logs = [
        e["message"]
        for e in server.logs(runs.second)
        if runs.first in (e.get("message") or "") and "SKIPPED" in e["message"]
    ]
    assert len(skip_logs) == len(WAREHOUSE_STEPS), skip_logs


def _write_negative_payment(drops: Path) -> Path:
    path = drops / "payments_e2e_refund.csv"
    path.write_text(
        "payment_id,order_id,method,amount,paid_at\n"
        "990001,1,credit_card,-42.50,2026-11-20T10:00:00Z\n"
    )
    return path


def test_failed_quality_check_reexecuted_from_failure_after_the_fix(example: Example) -> None:
    server = example.server
    key = "e2e-reexecute-from-failure"
    _write_negative_payment(example.data_dir / "drops")

    failed = server.launch_run("warehouse_job", tags={KEY_TAG: key})
    run = server.wait_for_run(failed)
    assert run["status"] == "FAILURE", run
    steps = server.step_statuses(failed)
    assert steps["check_quality"] == "FAILURE", steps
    assert {steps[s] for s in WAREHOUSE_STEPS[:3]} == {"SUCCESS"}, steps
    assert steps.get("snapshot_customers") in (None, "SKIPPED"), steps
    messages = [e.get("message") or "" for e in server.logs(failed)]
    assert any("no_negative_payments" in m for m in messages), "the failed check is not named"
    with example.ledger() as ledger:
        entry = ledger.get(f"{key}/check_quality")
        assert entry is not None and entry.state == State.FAILED, entry
        assert entry.run_id == failed
        assert ledger.entries(State.IN_FLIGHT, run_id=failed) == []

    # Fix the data where the check reads it, then "Re-execute from failure" as the UI does.
    with sqlite3.connect(example.warehouse) as conn:
        fixed = conn.execute("UPDATE payments SET amount = abs(amount) WHERE amount < 0").rowcount
    assert fixed == 1

    child = server.reexecute(failed, strategy="FROM_FAILURE")
    run = server.wait_for_run(child)
    assert run["status"] == "SUCCESS", (run, server.log_tail())
    assert run["parentRunId"] == failed and run["rootRunId"] == failed, run
    tags = server.tags(child)
    assert tags[KEY_TAG] == key
    shown = decisions(server, child)
    assert (shown["check_quality"], shown["snapshot_customers"]) == ("proceed", "proceed")
    # The ops that succeeded in the parent were not re-run: the child has no step for them.
    assert server.step_statuses(child) == {
        "check_quality": "SUCCESS",
        "snapshot_customers": "SUCCESS",
    }
    with example.ledger() as ledger:
        for step in ("check_quality", "snapshot_customers"):
            entry = ledger.get(f"{key}/{step}")
            assert entry is not None and (entry.state, entry.run_id) == (State.SUCCEEDED, child)
        for step in WAREHOUSE_STEPS[:3]:
            entry = ledger.get(f"{key}/{step}")
            assert entry is not None and (entry.state, entry.run_id) == (State.SUCCEEDED, failed)


def test_sensor_stopped_and_started_over_graphql(example: Example) -> None:
    """The helper's set_sensor (stopSensor takes the sensor's id in Dagster 1.13) on the live
    server; the ledger's SUCCESS sensor is left running, as it started."""
    server = example.server
    name = "rocky_ledger_on_success"
    assert server.sensor(name)["sensorState"]["status"] == "RUNNING"
    server.set_sensor(name, running=False)
    assert server.sensor(name)["sensorState"]["status"] == "STOPPED"
    server.set_sensor(name, running=True)
    assert server.sensor(name)["sensorState"]["status"] == "RUNNING"


# --- terminate: the CANCELED path ---------------------------------------------------------------


def _hold(server: DagsterServer, key: str, seconds: float) -> str:
    return server.launch_run(
        "slow_job",
        tags={KEY_TAG: key},
        run_config={"ops": {"hold_claim": {"config": {"seconds": seconds}}}},
    )


def _wait_in_flight(example: Example, key: str, run_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline:
        if example.server.ledger_path.exists():
            with example.ledger() as ledger:
                entry = ledger.get(key)
            if entry is not None and entry.state == State.IN_FLIGHT and entry.run_id == run_id:
                return
        status = example.server.run(run_id)["status"]
        assert status in {"QUEUED", "NOT_STARTED", "STARTING", "STARTED"}, status
        time.sleep(0.5)
    raise AssertionError(f"{key} never in flight under {run_id}: {entry}")


def _wait_released(example: Example, key: str, run_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with example.ledger() as ledger:
            entry = ledger.get(key)
            if not ledger.entries(State.IN_FLIGHT, run_id=run_id) and (
                entry is None or entry.released
            ):
                return
        time.sleep(1.0)
    with example.ledger() as ledger:
        raise AssertionError(
            f"claim of canceled run {run_id} not released in {timeout}s: {ledger.get(key)}; "
            f"history {ledger.history(key)}"
        )


def _sensor_acted(server: DagsterServer, run_id: str, timeout: float = 120.0) -> str:
    """The daemon's engine event on the run saying the CANCELED sensor evaluated it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in server.logs(run_id):
            message = e.get("message") or ""
            if CANCELED_SENSOR in message and "CANCELED" in message:
                return message
        time.sleep(1.0)
    raise AssertionError(f"{CANCELED_SENSOR} never acted on run {run_id}")


def _assert_key_proceeds(example: Example, key: str) -> None:
    server = example.server
    again = _hold(server, key, 0.5)
    run = server.wait_for_run(again)
    assert run["status"] == "SUCCESS", run
    assert decisions(server, again)["hold_claim"] == "proceed"
    with example.ledger() as ledger:
        entry = ledger.get(f"{key}/hold_claim")
        assert entry is not None and (entry.state, entry.run_id) == (State.SUCCEEDED, again)


@pytest.fixture(scope="module")
def held(example: Example) -> dict[str, str]:
    """Two slow_job runs holding their claims (key → run id), launched together to save time."""
    server = example.server
    runs = {key: _hold(server, key, 300) for key in ("e2e-terminate", "e2e-force-terminate")}
    for key, run_id in runs.items():
        _wait_in_flight(example, f"{key}/hold_claim", run_id)
    return runs


def test_terminated_run_releases_its_claim(example: Example, held: dict[str, str]) -> None:
    """Terminate (the UI's default "terminate") a run holding its claim: CANCELED, the claim is
    released (the interrupted step releases it itself; the CANCELED sensor then finds nothing
    left in flight) and the key proceeds in the next run."""
    server = example.server
    server.wait_for_sensor_tick(CANCELED_SENSOR)  # it only sees runs ending after its 1st tick
    key = "e2e-terminate"
    run_id = held[key]
    _wait_in_flight(example, f"{key}/hold_claim", run_id)

    server.terminate(run_id)
    assert server.wait_for_run(run_id, timeout=120)["status"] == "CANCELED"
    _wait_released(example, f"{key}/hold_claim", run_id)
    _sensor_acted(server, run_id)
    _assert_key_proceeds(example, key)


def _step_pid(server: DagsterServer, run_id: str) -> int:
    """The pid of the step process that runs hold_claim (from the run's LOGS_CAPTURED event)."""
    run_pids = set()
    step_pids = set()
    for e in server.logs(run_id):
        message = e.get("message") or ""
        found = re.search(r"\(pid: (\d+)\)", message)
        if not found:
            continue
        if e.get("eventType") == "LOGS_CAPTURED":
            step_pids.add(int(found.group(1)))
        else:
            run_pids.add(int(found.group(1)))
    candidates = step_pids - run_pids
    assert len(candidates) == 1, (step_pids, run_pids)
    pid = candidates.pop()
    assert server.proc is not None
    assert pid in {p for p, _ in session_processes(server.proc.pid)}, "not one of the server's"
    return pid


def test_force_terminated_hung_run_is_released_by_the_canceled_sensor(
    example: Example, held: dict[str, str]
) -> None:
    """A step that cannot react (stopped with SIGSTOP), the run force-terminated ("mark as
    canceled immediately"): no hook and no step code runs, only the CANCELED run-status sensor
    can free the claim, and it does."""
    server = example.server
    server.wait_for_sensor_tick(CANCELED_SENSOR)
    key = "e2e-force-terminate"
    run_id = held[key]
    _wait_in_flight(example, f"{key}/hold_claim", run_id)
    pid = _step_pid(server, run_id)

    os.kill(pid, signal.SIGSTOP)
    try:
        data = server.graphql(
            """mutation($id: String!) { terminateRun(runId: $id,
                terminatePolicy: MARK_AS_CANCELED_IMMEDIATELY) { __typename } }""",
            {"id": run_id},
        )
        assert data["terminateRun"]["__typename"] == "TerminateRunSuccess", data
        assert server.wait_for_run(run_id, timeout=60)["status"] == "CANCELED"
        _wait_released(example, f"{key}/hold_claim", run_id)
        with example.ledger() as ledger:
            released = [
                e for e in ledger.history(f"{key}/hold_claim") if e.kind == EventKind.RELEASED
            ]
        assert len(released) == 1, released
        assert released[0].run_id == run_id
        assert CANCELED_SENSOR in (released[0].detail or ""), released
    finally:
        os.kill(pid, signal.SIGCONT)  # let the step see its interrupt and exit
    _sensor_acted(server, run_id)
    _assert_key_proceeds(example, key)


# --- the browser ---------------------------------------------------------------------------------


@pytest.mark.browser
def test_run_page_shows_the_skip_and_the_prior_run(
    example: Example, warehouse_twice: TwoRuns
) -> None:
    first, second = warehouse_twice.first, warehouse_twice.second
    with browser_page() as page:
        from playwright.sync_api import expect

        page.goto(example.server.run_page_url(second))
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()

        # The event log, filtered on the prior run's id: the skip message names it and the
        # step output metadata carries the decision and a link to that run.
        page.get_by_placeholder("Filter…").fill(first)
        skip = page.get_by_text(f"already completed in run {first}").first
        expect(skip).to_be_visible()
        expect(page.get_by_text("rocky/prior_run_id").first).to_be_visible()
        expect(page.get_by_role("link", name=first).first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "skipped_run_logs.png"))

        # The run's tags: the key and the one summary, whatever the op count.
        page.get_by_role("button", name="View tags and config").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        outcome = dialog.get_by_text(f"{OUTCOME_TAG}: skipped", exact=True)  # "<tag>: <value>"
        expect(outcome).to_be_visible()
        key = dialog.get_by_text(f"{KEY_TAG}: {warehouse_twice.key}", exact=True)
        expect(key).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "skipped_run_tags.png"))
