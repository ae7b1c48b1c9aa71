"""Fixtures of the engine tests: a real deployment on loopback, started and stopped here.

Per module: Redis (the Celery broker and result backend), a database on the suite's
PostgreSQL server holding the Dagster instance (dagster-postgres), the ledger (schema
``rocky_ledger``) and the warehouse (schema ``engines``), and a DAGSTER_HOME whose
dagster.yaml points at it. Workers (Celery or Dask) run as real subprocesses with the same
environment a deployment gives them: $DAGSTER_HOME, $ROCKY_LEDGER_URL, the warehouse URL, and
this directory on PYTHONPATH (the job code).

Every test in the directory carries the `engines` marker (CI runs them in a lane of their own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import engines_cluster
import engines_jobs
import pg_server
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from rocky_dagster.ledger import Entry, Event, EventKind, Ledger, State, open_ledger
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT = 300.0
LAUNCH_TAG = "test/launch"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.engines)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[engines_cluster.RedisServer]:
    server = engines_cluster.RedisServer(engines_cluster.scratch("rocky-redis-"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Launched:
    """One run launched in a subprocess (its run worker)."""

    proc: subprocess.Popen[str]
    launch_id: str
    key: str
    run_id: str | None = None


@dataclass
class Deployment:
    """The module's deployment: env for every process, the instance, the ledger, the warehouse."""

    env: dict[str, str]
    database_url: str
    signals: Path
    root: Path
    run_config: dict[str, Any] = field(default_factory=dict)
    _instance: DagsterInstance | None = None

    @property
    def instance(self) -> DagsterInstance:
        if self._instance is None:
            self._instance = DagsterInstance.get()
        return self._instance

    def ledger(self) -> Ledger:
        return open_ledger(self.env[engines_jobs.LEDGER_URL_ENV])

    # --- runs --------------------------------------------------------------------------------

    def launch(self, job: str, key: str, **tags: str) -> Launched:
        launch_id = uuid.uuid4().hex
        all_tags = {KEY_TAG: key, LAUNCH_TAG: launch_id, **tags}
        out = open(self.root / f"launch-{launch_id}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "engines_launch.py"),
                job,
                json.dumps(all_tags),
                json.dumps(self.run_config),
            ],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
        )
        out.close()
        return Launched(proc, launch_id, key)

    def run_of(self, launched: Launched) -> DagsterRun:
        """The run the launch created (waits until it exists)."""

        def find() -> DagsterRun | None:
            runs = self.instance.get_runs(RunsFilter(tags={LAUNCH_TAG: launched.launch_id}))
            if not runs and launched.proc.poll() not in (None, 0):
                raise AssertionError(f"the launch failed:\n{self.launch_log(launched)}")
            return runs[0] if runs else None

        run = engines_cluster.wait_for(find, "the launched run to exist", RUN_TIMEOUT)
        launched.run_id = run.run_id
        return run

    def finish(self, launched: Launched) -> DagsterRun:
        """Wait for the run worker to exit; the run as the instance has it."""
        try:
            launched.proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            launched.proc.kill()
            raise AssertionError(
                f"the run did not finish within {RUN_TIMEOUT:.0f} s:\n{self.launch_log(launched)}"
            ) from None
        run = self.run_of(launched)
        refreshed = self.instance.get_run_by_id(run.run_id)
        assert refreshed is not None
        return refreshed

    def succeeded(self, launched: Launched) -> str:
        """Wait for the run to finish, assert it succeeded (its launch log if not): its id."""
        run = self.finish(launched)
        assert run.status == DagsterRunStatus.SUCCESS, self.launch_log(launched)
        return run.run_id

    def status(self, run_id: str) -> DagsterRunStatus:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        return run.status

    def launch_log(self, launched: Launched) -> str:
        return (self.root / f"launch-{launched.launch_id}.log").read_text(errors="replace")[-6000:]

    def decisions(self, run_id: str) -> dict[str, str]:
        return step_decisions(self.instance, run_id)

    # --- what happened -------------------------------------------------------------------------

    def effects(self, key: str) -> list[tuple[str, int]]:
        """(run id, pid) of every row written for `key`: the work that really happened."""
        with psycopg.connect(self.database_url) as conn:
            return [
                (run_id, pid)
                for run_id, pid in conn.execute(
                    f"SELECT run_id, pid FROM {engines_jobs.TABLE} WHERE key = %s "
                    "ORDER BY written_at",
                    (key,),
                ).fetchall()
            ]

    def entry(self, key: str) -> Entry | None:
        with self.ledger() as ledger:
            return ledger.get(key)

    def history(self, key: str) -> list[Event]:
        with self.ledger() as ledger:
            return ledger.history(key)

    def reentered_and_stamped(self, ledger_key: str, run_id: str) -> Entry:
        """Assert the run's step ran again in the same run (a broker or scheduler re-delivered
        it after its worker died), re-entered its own claim (the killed process is gone, its
        lease still alive) continuing the first claim's generation, and stamped it once."""
        entry = self.entry(ledger_key)
        assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == run_id
        history = self.history(ledger_key)
        kinds = [e.kind for e in history]
        assert kinds == [EventKind.CLAIMED, EventKind.CLAIMED, EventKind.SUCCEEDED], kinds
        assert history[1].detail is not None
        assert "re-entrant claim by the same run" in history[1].detail
        assert entry.generation == history[0].fence
        assert self.reached_end(run_id)
        return entry

    # --- the pause points of engines_jobs ------------------------------------------------------

    def paused(self, run_id: str, point: str) -> tuple[int, int]:
        """Wait until the run's step paused at `point`: (its pid, its PID-namespace inode)."""
        path = self.signals / f"{run_id}.{point}"
        text = engines_cluster.wait_for(
            lambda: path.exists() and path.read_text(), f"run {run_id} to pause {point}", 300
        )
        pid, namespace = text.split()
        return int(pid), int(namespace)

    def go(self, run_id: str) -> None:
        (self.signals / f"{run_id}.go").touch()

    def reached_end(self, run_id: str) -> bool:
        return (self.signals / f"{run_id}.end").exists()


@pytest.fixture(scope="module")
def deployment(
    postgres_server: pg_server.PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    name = f"engines_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    database_url = postgres_server.create_database(name)
    root = tmp_path_factory.mktemp("engines")
    home = root / "dagster_home"
    home.mkdir()
    signals = root / "signals"
    signals.mkdir()
    # dagster-postgres uses psycopg2 through SQLAlchemy, and SQLAlchemy 2.1 maps a bare
    # postgresql:// to psycopg 3: name the driver (dagster-postgres depends on psycopg2-binary)
    instance_url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {json.dumps(instance_url)}\n"
        "telemetry:\n  enabled: false\n"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in engines_jobs.CREATE_WAREHOUSE:
            conn.execute(statement)  # type: ignore[arg-type]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        engines_jobs.LEDGER_URL_ENV: database_url,
        engines_jobs.WAREHOUSE_URL_ENV: database_url,
        engines_jobs.SIGNALS_ENV: str(signals),
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }
    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", engines_jobs.LEDGER_URL_ENV)}
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ[engines_jobs.LEDGER_URL_ENV] = database_url
    found = Deployment(env=env, database_url=database_url, signals=signals, root=root)
    try:
        yield found
    finally:
        if found._instance is not None:
            found._instance.dispose()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        postgres_server.drop_database(name)


def new_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"
