"""GraphQL and instance helpers for the daemon suite, on top of tests/e2e/dagster_server.py.

`DaemonServer` adds what the e2e helper does not cover: sensor start/stop and tick history
(with the runs each tick launched), schedule evaluation, re-execution with extra tags and asset
backfills. The module functions read what the UI shows from the instance the server writes
(`DagsterInstance` on the same DAGSTER_HOME): step metadata, the run worker's pids, the values
steps stored. Every GraphQL document here is checked against the installed schema by
test_daemon_graphql_documents.py, without a server.
"""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dagster import DagsterEventType, DagsterInstance

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))  # dagster_server, owned by the e2e suite

from dagster_server import DagsterServer  # noqa: E402

T = TypeVar("T")

LEDGER_SENSORS = ("rocky_ledger_on_failure", "rocky_ledger_on_canceled", "rocky_ledger_on_success")

SENSOR_TICKS_QUERY = """
query SensorTicks($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
  ... on Sensor { id name
    sensorState { status
      ticks(limit: $n) { tickId status timestamp skipReason runIds runKeys error { message } } } }
  ... on Error { message } } }
"""

START_SENSOR = """
mutation StartSensor($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
  ... on Sensor { sensorState { status } }
  ... on Error { message } } }
"""

STOP_SENSOR = """
mutation StopSensor($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } }
  ... on Error { message } } }
"""

SCHEDULE_DRY_RUN = """
mutation ScheduleDryRun($s: ScheduleSelector!, $t: Float) {
  scheduleDryRun(selectorData: $s, timestamp: $t) { __typename
    ... on DryRunInstigationTick { timestamp evaluationResult {
      runRequests { runKey jobName runConfigYaml tags { key value } }
      skipReason error { message } } }
    ... on Error { message } } }
"""

REEXECUTE = """
mutation Reexecute($r: ReexecutionParams) { launchPipelineReexecution(reexecutionParams: $r) {
  __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on Error { message } } }
"""

LAUNCH_BACKFILL = """
mutation LaunchBackfill($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename
  ... on LaunchBackfillSuccess { backfillId }
  ... on Error { message } } }
"""

DOCUMENTS = {
    "sensor_ticks": SENSOR_TICKS_QUERY,
    "start_sensor": START_SENSOR,
    "stop_sensor": STOP_SENSOR,
    "schedule_dry_run": SCHEDULE_DRY_RUN,
    "reexecute": REEXECUTE,
    "launch_backfill": LAUNCH_BACKFILL,
}


def wait_for(check: Callable[[], T], what: str, timeout: float = 120.0, every: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class DaemonServer(DagsterServer):
    """The e2e `DagsterServer` plus sensors, schedules, re-execution with tags and backfills."""

    def _selector(self, kind: str, name: str) -> dict[str, str]:
        return {
            "repositoryLocationName": self.location,
            "repositoryName": self.repository,
            f"{kind}Name": name,
        }

    # --- sensors --------------------------------------------------------------------------------

    def sensor_state(self, name: str, ticks: int = 25) -> dict[str, Any]:
        """id, name, sensorState {status, ticks (newest first, with runIds and runKeys)}."""
        data = self.graphql(SENSOR_TICKS_QUERY, {"s": self._selector("sensor", name), "n": ticks})
        result = data["sensorOrError"]
        assert result["__typename"] == "Sensor", result
        return dict(result)

    def sensor_ticks(self, name: str, limit: int = 25) -> list[dict[str, Any]]:
        return list(self.sensor_state(name, limit)["sensorState"]["ticks"])

    def start_sensor(self, name: str) -> None:
        data = self.graphql(START_SENSOR, {"s": self._selector("sensor", name)})
        result = data["startSensor"]
        assert result["__typename"] == "Sensor", result
        assert result["sensorState"]["status"] == "RUNNING", result

    def stop_sensor(self, name: str) -> None:
        data = self.graphql(STOP_SENSOR, {"id": self.sensor_state(name, 0)["id"]})
        result = data["stopSensor"]
        assert result["__typename"] == "StopSensorMutationResult", result
        assert result["instigationState"]["status"] == "STOPPED", result

    @contextmanager
    def sensor_running(self, name: str) -> Iterator[None]:
        self.start_sensor(name)
        try:
            yield
        finally:
            self.stop_sensor(name)

    @contextmanager
    def sensor_stopped(self, name: str, interval: float = 5.0) -> Iterator[None]:
        """Stop a (default RUNNING) sensor for the block, so nothing it does can help the test.

        A Stop alone does not guarantee that. Dagster's sensor daemon starts each tick by
        reading the sensor's state and writing it back (``mark_sensor_state_for_tick``) with
        no compare-and-set, so a Stop landing between that read and write is undone and the
        sensor keeps running; and a tick already queued when the Stop lands still evaluates
        once (``_process_tick_generator`` never re-checks the status). Either way a
        run-status sensor "stopped" for the test could settle a dead claim before the code
        under test does. So: stop it, and wait until it is still STOPPED with no tick running
        and none started for `interval` + 5 s (stopping it again if the daemon undid the
        Stop); at the end, check that it did not tick during the block.
        """
        last = self._quiesce(name, interval + 5.0)
        try:
            yield
            ticked = self._ticks_since(name, last)
            assert not ticked, f"sensor {name} ticked while stopped for the test: {ticked}"
        finally:
            self.start_sensor(name)

    def _quiesce(self, name: str, quiet: float, timeout: float = 180.0) -> str | None:
        """Stop `name` and wait until it stays stopped and idle for `quiet` s; its newest tick id."""
        deadline = time.monotonic() + timeout
        seen: tuple[str, str | None] | None = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            state = self.sensor_state(name, 1)["sensorState"]
            ticks = state["ticks"]
            newest = (str(ticks[0]["tickId"]), ticks[0]["status"]) if ticks else ("", None)
            if state["status"] != "STOPPED":
                self.stop_sensor(name)
                seen = None
            elif newest != seen or newest[1] == "STARTED":
                seen, quiet_since = newest, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet:
                return newest[0] or None
            time.sleep(0.5)
        raise AssertionError(f"sensor {name} did not stay stopped and idle within {timeout} s")

    def _ticks_since(self, name: str, last: str | None) -> list[dict[str, Any]]:
        """The ticks of `name` newer than tick id `last` (newest first)."""
        newer = []
        for tick in self.sensor_ticks(name, 10):
            if str(tick["tickId"]) == last:
                break
            newer.append(tick)
        return newer

    # --- schedules ------------------------------------------------------------------------------

    def evaluate_schedule(self, name: str, tick: datetime) -> dict[str, Any]:
        """Evaluate the schedule's function for `tick` in the code server (what the scheduler
        daemon asks it): {runRequests [{runKey, tags, runConfigYaml}], skipReason, error}."""
        data = self.graphql(
            SCHEDULE_DRY_RUN, {"s": self._selector("schedule", name), "t": tick.timestamp()}
        )
        result = data["scheduleDryRun"]
        assert result["__typename"] == "DryRunInstigationTick", result
        evaluation = dict(result["evaluationResult"])
        assert evaluation["error"] is None, evaluation["error"]
        return evaluation

    # --- re-execution and backfills -------------------------------------------------------------

    def reexecute_with(
        self, parent_run_id: str, strategy: str, extra_tags: Mapping[str, str] | None = None
    ) -> str:
        """`launchPipelineReexecution` as the UI sends it, plus `extra_tags`."""
        tags = {"dagster/from_ui": "true", **(extra_tags or {})}
        data = self.graphql(
            REEXECUTE,
            {
                "r": {
                    "parentRunId": parent_run_id,
                    "strategy": strategy,
                    "extraTags": [{"key": k, "value": v} for k, v in tags.items()],
                }
            },
        )
        result = data["launchPipelineReexecution"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

    def launch_asset_backfill(self, asset: str, partitions: list[str]) -> str:
        """What the UI's "Materialize selected partitions" sends: an asset backfill."""
        data = self.graphql(
            LAUNCH_BACKFILL,
            {"p": {"assetSelection": [{"path": [asset]}], "partitionNames": partitions}},
        )
        result = data["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        return str(result["backfillId"])

    def wait_for_backfill_runs(
        self, backfill_id: str, count: int, timeout: float = 240.0
    ) -> list[dict[str, Any]]:
        """The backfill's runs once `count` of them exist and all are finished."""

        def finished() -> list[dict[str, Any]] | None:
            runs = self.runs({"dagster/backfill": backfill_id})
            if len(runs) == count and all(r["status"] in _TERMINAL for r in runs):
                return runs
            return None

        return wait_for(finished, f"{count} finished runs of backfill {backfill_id}", timeout, 1.0)


_TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


# --- what the instance recorded ------------------------------------------------------------------


def metadata_text(value: Any) -> str:
    """A metadata value as text (run links give their run id)."""
    for attr in ("run_id", "text", "value"):
        if hasattr(value, attr):
            return str(getattr(value, attr))
    return str(value)


def step_decisions(instance: DagsterInstance, run_id: str, step_key: str) -> list[dict[str, str]]:
    """Every `rocky/*` metadata set the step showed: on its outputs, its asset observations and
    its engine events (a `skipped_in_flight` step has no output and reports on an event)."""
    found = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or record.step_key != step_key:
            continue
        metadata: Mapping[str, Any] | None = None
        if event.event_type == DagsterEventType.STEP_OUTPUT:
            metadata = event.step_output_data.metadata
        elif event.event_type == DagsterEventType.ASSET_OBSERVATION:
            metadata = event.asset_observation_data.asset_observation.metadata
        elif event.event_type == DagsterEventType.ENGINE_EVENT:
            metadata = event.engine_event_data.metadata
        if metadata and "rocky/decision" in metadata:
            found.append({k: metadata_text(v) for k, v in metadata.items()})
    return found


def step_failure_text(instance: DagsterInstance, run_id: str, step_key: str) -> str:
    """The step failure's message and its whole cause chain (class names included)."""
    parts: list[str] = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        if record.step_key != step_key:
            continue
        error = record.dagster_event.step_failure_data.error
        while error is not None:
            parts.append(f"{error.cls_name}: {error.message}")
            error = error.cause
    return "\n".join(parts)


def run_pids(instance: DagsterInstance, run_id: str) -> tuple[int | None, dict[str, int]]:
    """(run worker pid, {step key: step worker pid}) as the run's engine events report them."""
    worker = None
    steps: dict[str, int] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_WORKER_STARTED and record.step_key:
            pid = event.engine_event_data.metadata.get("pid")
            if pid is not None:
                steps[record.step_key] = int(metadata_text(pid))
        elif (
            event.event_type == DagsterEventType.ENGINE_EVENT
            and record.step_key is None
            and "multiprocess executor: parent process" in (event.message or "")
        ):
            pid = event.engine_event_data.metadata.get("pid")
            if pid is not None:
                worker = int(metadata_text(pid))
    return worker, steps


def stored_output(home: Path, run_id: str, step_key: str, output: str = "result") -> Any:
    """The value a step stored through the default filesystem IO manager, or None if none."""
    path = Path(home) / "storage" / run_id / step_key / output
    if not path.exists():
        return None
    with path.open("rb") as f:
        return pickle.load(f)  # written by this test's own server


# --- processes -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first found, breadth first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def sigkill_tree(pid: int) -> list[int]:
    """SIGKILL `pid`, then every process below it (a dead container takes its steps along)."""
    below = descendants(pid)
    os.kill(pid, signal.SIGKILL)
    for child in below:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    return [pid, *below]


# --- the example's warehouse ---------------------------------------------------------------------


def warehouse_rows(
    warehouse: Path, sql: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the warehouse; [] while the table does not exist yet."""
    if not warehouse.exists():
        return []
    conn = sqlite3.connect(f"file:{warehouse}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def warehouse_execute(warehouse: Path, *statements: str) -> None:
    """Change the warehouse as an operator would (inject a fault, repair data)."""
    conn = sqlite3.connect(warehouse, timeout=30)
    try:
        with conn:
            for sql in statements:
                conn.execute(sql)
    finally:
        conn.close()
