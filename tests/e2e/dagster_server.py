"""A real `dagster dev` (webserver + daemon) for end-to-end tests, driven over GraphQL.

Started in its own session so SIGINT reaches every child (dagster dev ignores
signals when started in the background from a shell), stopped with SIGINT, and
checked for leftovers (every process of its session, found through /proc) so no
test leaves processes behind.

The GraphQL documents are module constants so a test can validate them against
the schema of the installed dagster-graphql without starting anything
(`QUERIES`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
LEDGER_FILE = "rocky_ledger.db"
"""The default ledger's file name under $DAGSTER_HOME (rocky_dagster.ledger.defaults)."""
ARTIFACTS = REPO / "test-artifacts" / "e2e"
"""Where browser tests leave their screenshots."""
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REQUIRE_BROWSER_ENV = "ROCKY_REQUIRE_BROWSER"
BROWSER_SKIP_MARK = "BROWSER TEST SKIPPED"
"""In a browser test's skip reason, so conftest.py can repeat it loudly at the end."""

DAGSTER_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false
run_retries:
  enabled: true
  max_retries: 0
run_monitoring:
  enabled: true
  poll_interval_seconds: 5
sensors:
  use_threads: true
  num_workers: 4
"""

# --- GraphQL documents (checked against the installed schema by test_dagster_server.py) ---------

WORKSPACE_QUERY = """
query Workspace { workspaceOrError { __typename
  ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } }
  ... on PythonError { message } } }
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on Error { message }
  ... on RunConfigValidationInvalid { errors { message } } } }
"""

RUN_QUERY = """
query Run($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { runId status parentRunId rootRunId jobName
    tags { key value } stepStats { stepKey status } }
  ... on Error { message } } }
"""

RUN_LOGS_QUERY = """
query RunLogs($id: ID!, $cursor: String) { logsForRun(runId: $id, afterCursor: $cursor) {
  __typename
  ... on EventConnection { cursor hasMore
    events { __typename ... on MessageEvent { message level stepKey eventType } } }
  ... on Error { message } } }
"""

TERMINATE_MUTATION = """
mutation Terminate($id: String!) { terminateRun(runId: $id) { __typename
  ... on TerminateRunFailure { message }
  ... on Error { message } } }
"""

REEXECUTE_MUTATION = """
mutation Reexecute($r: ReexecutionParams) { launchPipelineReexecution(reexecutionParams: $r) {
  __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on Error { message }
  ... on RunConfigValidationInvalid { errors { message } } } }
"""

RUNS_QUERY = """
query Runs($f: RunsFilter, $n: Int) { runsOrError(filter: $f, limit: $n) { __typename
  ... on Runs { results { runId status jobName tags { key value } } }
  ... on Error { message } } }
"""

SENSOR_QUERY = """
query Sensor($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
  ... on Sensor { id name
    sensorState { status ticks(limit: $n) { tickId status timestamp skipReason
      error { message } } } }
  ... on Error { message } } }
"""

START_SENSOR_MUTATION = """
mutation StartSensor($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
  ... on Sensor { sensorState { status } }
  ... on Error { message } } }
"""

# In Dagster 1.13 stopSensor takes the sensor's id (Sensor.id), not a SensorSelector.
STOP_SENSOR_MUTATION = """
mutation StopSensor($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } }
  ... on Error { message } } }
"""

QUERIES = {
    "workspace": WORKSPACE_QUERY,
    "launch_run": LAUNCH_RUN_MUTATION,
    "run": RUN_QUERY,
    "run_logs": RUN_LOGS_QUERY,
    "terminate": TERMINATE_MUTATION,
    "reexecute": REEXECUTE_MUTATION,
    "runs": RUNS_QUERY,
    "sensor": SENSOR_QUERY,
    "start_sensor": START_SENSOR_MUTATION,
    "stop_sensor": STOP_SENSOR_MUTATION,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_processes(sid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of session `sid`: (pid, command line), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append((int(entry.name), cmdline.strip()))
    return found


@dataclass
class DagsterServer:
    """`dagster dev -w workspace.yaml` on 127.0.0.1 with its own DAGSTER_HOME.

    `env` is laid over the current environment; ROCKY_LEDGER_URL is dropped unless `env` sets
    it, so the ledger is the default one, `home / rocky_ledger.db` (`ledger_path`).
    """

    home: Path
    env: dict[str, str] = field(default_factory=dict)
    location: str = "example_project"
    repository: str = "__repository__"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    dagster_yaml: str = DAGSTER_YAML
    workspace: Path = REPO / "workspace.yaml"
    leftovers: list[tuple[int, str]] = field(default_factory=list)
    """Processes of the server's session still alive after SIGINT (then SIGKILLed by pid)."""

    def __enter__(self) -> DagsterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> DagsterServer:
        self.home = Path(self.home).absolute()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(self.dagster_yaml)
        self.port = free_port()
        env = {**os.environ, "DAGSTER_HOME": str(self.home)}
        env.pop("ROCKY_LEDGER_URL", None)
        env.update(self.env)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        self.log_path = self.home / "dagster-dev.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "dagster"),
                    "dev",
                    "-w",
                    str(self.workspace),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                ],
                cwd=self.workspace.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self.wait_loaded(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def ledger_path(self) -> Path:
        return Path(self.home).absolute() / LEDGER_FILE

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 90.0) -> None:
        """SIGINT the session leader, wait for every process of its session to end.

        Whatever is still alive after `timeout` is SIGKILLed by pid and recorded in
        `leftovers`, so a fixture can fail loudly on it.
        """
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.leftovers.append((sid, "dagster dev (ignored SIGINT)"))
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (alive := session_processes(sid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, cmd in alive:
            self.leftovers.append((pid, cmd))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    # --- GraphQL ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_page_url(self, run_id: str) -> str:
        return f"{self.url}/runs/{run_id}"

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            # Dagster answers a PythonError with HTTP 500 and the error in the JSON body.
            text = exc.read()
            try:
                payload = json.loads(text or b"{}")
            except ValueError:
                raise AssertionError(f"GraphQL HTTP {exc.code}: {text[:2000]!r}") from exc
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_loaded(self, timeout: float) -> None:
        """Until every code location is LOADED as a RepositoryLocation (a load error raises)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited early:\n{self.log_tail()}")
            try:
                data = self.graphql(WORKSPACE_QUERY)
            except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError) as exc:
                last = exc
                time.sleep(0.5)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            last = entries
            loaded = [e.get("locationOrLoadError") or {} for e in entries]
            errors = [e for e in loaded if e.get("__typename") == "PythonError"]
            if errors:
                raise AssertionError(f"code location failed to load: {errors}\n{self.log_tail()}")
            if entries and all(
                e["loadStatus"] == "LOADED" and lo.get("__typename") == "RepositoryLocation"
                for e, lo in zip(entries, loaded, strict=True)
            ):
                return
            time.sleep(0.5)
        raise AssertionError(f"code location not loaded in {timeout}s: {last}\n{self.log_tail()}")

    def launch_run(
        self,
        job: str,
        tags: dict[str, str] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> str:
        data = self.graphql(
            LAUNCH_RUN_MUTATION,
            {
                "p": {
                    "selector": {
                        "repositoryLocationName": self.location,
                        "repositoryName": self.repository,
                        "jobName": job,
                    },
                    "runConfigData": run_config or {},
                    "executionMetadata": {
                        "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]
                    },
                }
            },
        )
        result = data["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

    def run(self, run_id: str) -> dict[str, Any]:
        """runId, status, parentRunId, rootRunId, jobName, tags [{key, value}], stepStats."""
        data = self.graphql(RUN_QUERY, {"id": run_id})
        result = dict(data["runOrError"])
        assert result["__typename"] == "Run", result
        return result

    def tags(self, run_id: str) -> dict[str, str]:
        return {t["key"]: t["value"] for t in self.run(run_id)["tags"]}

    def step_statuses(self, run_id: str) -> dict[str, str | None]:
        """Step key → SUCCESS / FAILURE / SKIPPED / IN_PROGRESS, for the steps the run had."""
        return {s["stepKey"]: s["status"] for s in self.run(run_id)["stepStats"]}

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        """The run's event log: message, level, stepKey and eventType of each event."""
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = self.graphql(RUN_LOGS_QUERY, {"id": run_id, "cursor": cursor})
            conn = data["logsForRun"]
            assert conn["__typename"] == "EventConnection", conn
            events.extend(conn["events"])
            cursor = conn["cursor"]
            if not conn["hasMore"]:
                return events

    def wait_for_run(
        self, run_id: str, timeout: float = 180.0, statuses: set[str] = TERMINAL
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run.get("status") in statuses:
                return run
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited while waiting:\n{self.log_tail()}")
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} still {run.get('status')} after {timeout}s")

    def terminate(self, run_id: str) -> None:
        data = self.graphql(TERMINATE_MUTATION, {"id": run_id})
        assert data["terminateRun"]["__typename"] == "TerminateRunSuccess", data

    def reexecute(self, parent_run_id: str, strategy: str = "FROM_FAILURE") -> str:
        """`launchPipelineReexecution` as the UI sends it (strategy FROM_FAILURE or ALL_STEPS)."""
        data = self.graphql(
            REEXECUTE_MUTATION,
            {
                "r": {
                    "parentRunId": parent_run_id,
                    "strategy": strategy,
                    "extraTags": [{"key": "dagster/from_ui", "value": "true"}],
                }
            },
        )
        result = data["launchPipelineReexecution"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

    def runs(self, tags: dict[str, str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        data = self.graphql(
            RUNS_QUERY,
            {
                "f": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
                "n": limit,
            },
        )
        result = data["runsOrError"]
        assert result["__typename"] == "Runs", result
        return list(result["results"])

    def terminate_unfinished(self, timeout: float = 120.0) -> list[str]:
        """Terminate every run not finished yet and wait for it to end (before `stop`, so no run
        worker outlives the server). Returns the ids of the runs it terminated."""
        live = [r["runId"] for r in self.runs(limit=1000) if r["status"] not in TERMINAL]
        for run_id in live:
            data = self.graphql(TERMINATE_MUTATION, {"id": run_id})
            if data["terminateRun"]["__typename"] != "TerminateRunSuccess":
                continue  # finished meanwhile, or not started: waited for below either way
        for run_id in live:
            self.wait_for_run(run_id, timeout=timeout)
        return live

    def _sensor_selector(self, name: str) -> dict[str, str]:
        return {
            "repositoryLocationName": self.location,
            "repositoryName": self.repository,
            "sensorName": name,
        }

    def sensor(self, name: str, ticks: int = 5) -> dict[str, Any]:
        """id, name, sensorState {status, ticks [{tickId, status, timestamp, ...}]} (newest first)."""
        data = self.graphql(SENSOR_QUERY, {"s": self._sensor_selector(name), "n": ticks})
        result = data["sensorOrError"]
        assert result["__typename"] == "Sensor", result
        return dict(result)

    def wait_for_sensor_tick(
        self, name: str, timeout: float = 90.0, after: float | None = None
    ) -> dict[str, Any]:
        """The sensor's newest tick once there is one (with a timestamp > `after` if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticks = self.sensor(name, ticks=1)["sensorState"]["ticks"]
            if ticks and (after is None or ticks[0]["timestamp"] > after):
                return dict(ticks[0])
            time.sleep(1.0)
        raise AssertionError(f"sensor {name} did not tick in {timeout}s\n{self.log_tail()}")

    def set_sensor(self, name: str, running: bool) -> None:
        if running:
            data = self.graphql(START_SENSOR_MUTATION, {"s": self._sensor_selector(name)})
            result = data["startSensor"]
            assert result["__typename"] == "Sensor", result
            assert result["sensorState"]["status"] == "RUNNING", result
        else:
            sensor_id = self.sensor(name, ticks=0)["id"]
            data = self.graphql(STOP_SENSOR_MUTATION, {"id": sensor_id})
            result = data["stopSensor"]
            assert result["__typename"] == "StopSensorMutationResult", result
            assert result["instigationState"]["status"] == "STOPPED", result


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    """A page of headless Chromium (1600 by 1000 pixels, 60 s default timeout), closed afterwards.

    Without Chromium or playwright the test is skipped with `BROWSER_SKIP_MARK`, or fails
    under ROCKY_REQUIRE_BROWSER=1 (CI), so a missing browser is never a silent pass.
    """
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            missing = f"the playwright Python package is missing ({exc})"
    if missing is not None:
        import pytest

        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{REQUIRE_BROWSER_ENV}=1 but {missing}", pytrace=False)
        pytest.skip(f"{BROWSER_SKIP_MARK}: {missing}")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()
