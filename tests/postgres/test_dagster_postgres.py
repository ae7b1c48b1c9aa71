"""Dagster with its instance on PostgreSQL (dagster-postgres) and the ledger on the same server
(Issue 6): the product itself — `idempotent_op` steps in a `ledger_job`, the ledger resource
`IdempotencyLedger(url=EnvVar(...))`, the key in the run tag ``rocky/idempotency_key`` — under
the multiprocess executor runs its work once per key, whether the job is launched twice in a
row (the second run skips) or twice at the same time (exactly one run works).

The proof is three-fold: the ledger entries and history, each step's decision in its metadata
(``rocky/decision``), and the side effects (rows in a PostgreSQL table, which would double if a
second run did the work).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pg_jobs
import psycopg
import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    execute_job,
    reconstructable,
)

from rocky_dagster.ledger import EventKind, State, open_ledger
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# `reconstructable` points step processes at module `pg_jobs`; they inherit this sys.path, but
# Dagster drops sys.path[0] (the script path) before importing, which is where pytest put this
# directory. A second entry keeps it importable.
sys.path.append(str(HERE))

WAIT_SECONDS = 300.0
T = TypeVar("T")


@pytest.fixture
def instance_home(postgres_database: str, tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, whose server-side parameters break
    # dagster-postgres's `NOTIFY run_events, %(id)s`: name its driver, psycopg2, explicitly.
    url = postgres_database.replace("postgresql://", "postgresql+psycopg2://", 1)
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {json.dumps(url)}\ntelemetry:\n  enabled: false\n"
    )
    return home


@pytest.fixture
def warehouse(postgres_database: str) -> str:
    """The table the guarded bodies write to (their side effect), in the same database."""
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(pg_jobs.CREATE_WAREHOUSE)
    return postgres_database


@pytest.fixture
def env(
    instance_home: Path,
    postgres_database: str,
    warehouse: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    work = tmp_path / "work"
    work.mkdir()
    values = {
        "DAGSTER_HOME": str(instance_home),
        # the ledger on the same server and database as the instance (schema rocky_ledger)
        pg_jobs.LEDGER_URL_ENV: postgres_database,
        pg_jobs.WAREHOUSE_URL_ENV: warehouse,
        pg_jobs.WORK_DIR_ENV: str(work),
        # step processes and the launch subprocesses import pg_jobs by module name
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def instance(env: dict[str, str]) -> Iterator[DagsterInstance]:
    with DagsterInstance.get() as opened:  # creates dagster-postgres's tables once, up front
        assert type(opened.run_storage).__name__ == "PostgresRunStorage"
        assert type(opened.event_log_storage).__name__ == "PostgresEventLogStorage"
        yield opened


# --- what happened, read back from PostgreSQL ------------------------------------------------------


def _warehouse_rows(env: dict[str, str]) -> dict[tuple[str, str], int]:
    """(op, run id) -> rows that body inserted: the work that really happened."""
    with psycopg.connect(env[pg_jobs.WAREHOUSE_URL_ENV]) as conn:
        found = conn.execute(
            f"SELECT op, run_id, count(*) FROM {pg_jobs.WAREHOUSE_TABLE} GROUP BY op, run_id"
        ).fetchall()
    return {(op_name, run_id): count for op_name, run_id, count in found}


def _step_pids(env: dict[str, str]) -> dict[str, set[int]]:
    with psycopg.connect(env[pg_jobs.WAREHOUSE_URL_ENV]) as conn:
        found = conn.execute(f"SELECT DISTINCT op, pid FROM {pg_jobs.WAREHOUSE_TABLE}").fetchall()
    pids: dict[str, set[int]] = {}
    for op_name, pid in found:
        pids.setdefault(op_name, set()).add(pid)
    return pids


def _decisions(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """step key -> the decision the guarded step showed in its metadata."""
    shown = step_decisions(instance, run_id)
    return {step: shown[step] for step in ("extract", "load") if step in shown}


def _history(env: dict[str, str], key: str) -> list[tuple[EventKind, str | None]]:
    with open_ledger(env[pg_jobs.LEDGER_URL_ENV]) as ledger:
        return [(e.kind, e.run_id) for e in ledger.history(key)]


def _wait_for(condition: Callable[[], T | None], what: str) -> T:
    """Poll `condition` until it returns something truthy (a bound on a hang, not a timing)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"gave up after {WAIT_SECONDS:.0f} s waiting for {what}")


# --- one key, two runs in a row -------------------------------------------------------------------


def test_same_key_twice_second_run_skips(instance: DagsterInstance, env: dict[str, str]) -> None:
    key = "orders-2024-06-01"
    runs: list[str] = []
    outputs: list[dict[str, Any]] = []
    for _ in range(2):
        with execute_job(
            reconstructable(pg_jobs.keyed_job), instance=instance, tags={KEY_TAG: key}
        ) as result:
            assert result.success
            runs.append(result.run_id)
            outputs.append({step: result.output_for_node(step) for step in ("extract", "load")})
    first, second = runs
    for run_id in runs:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        assert run.tags[KEY_TAG] == key

    # the decision tags: the first run worked, the second skipped both steps
    assert _decisions(instance, first) == {"extract": "proceed", "load": "proceed"}
    assert _decisions(instance, second) == {
        "extract": "skipped_completed",
        "load": "skipped_completed",
    }

    # the side effects happened once: a second run doing the work would double these counts
    table = pg_jobs.WAREHOUSE_TABLE
    assert _warehouse_rows(env) == {
        ("extract", first): pg_jobs.EXTRACT_ROWS,
        ("load", first): 2 * pg_jobs.EXTRACT_ROWS,
    }
    # ... each step in a process of its own (multiprocess executor), none in this one
    pids = _step_pids(env)
    assert len(pids["extract"]) == len(pids["load"]) == 1
    assert pids["extract"].isdisjoint(pids["load"])
    assert os.getpid() not in pids["extract"] | pids["load"]

    # the second run replayed the recorded summaries, so its downstream step still ran (skipped)
    assert outputs[0] == {
        "extract": {"rows": pg_jobs.EXTRACT_ROWS, "table": table},
        "load": {"rows": 2 * pg_jobs.EXTRACT_ROWS, "table": table},
    }
    assert outputs[1] == {
        step: {**summary, "replayed": True, "prior_run_id": first}
        for step, summary in outputs[0].items()
    }

    # the ledger, read straight from PostgreSQL
    with open_ledger(env[pg_jobs.LEDGER_URL_ENV]) as ledger:
        entries = {e.key: e for e in ledger.entries(run_id=first)}
        assert ledger.entries(run_id=second) == []
    assert set(entries) == {f"{key}/extract", f"{key}/load"}
    for step, summary in outputs[0].items():
        entry = entries[f"{key}/{step}"]
        assert entry.state == State.SUCCEEDED
        assert entry.run_id == first
        assert entry.result == summary
        assert _history(env, f"{key}/{step}") == [
            (EventKind.CLAIMED, first),
            (EventKind.SUCCEEDED, first),
            (EventKind.SKIPPED_COMPLETED, second),
        ]

    # the second run's log says why it did nothing, naming the run that did
    messages = "\n".join(e.user_message or "" for e in instance.all_logs(second))
    assert f"already completed in run {first}" in messages


# --- one key, two launches at the same time -------------------------------------------------------

LAUNCH = textwrap.dedent(
    """
    import json
    from dagster import DagsterInstance, execute_job, reconstructable
    import pg_jobs
    from rocky_dagster.step.keys import KEY_TAG
    tags = {KEY_TAG: "nightly-load", pg_jobs.HOLD_TAG: "1"}
    with DagsterInstance.get() as instance:
        with execute_job(reconstructable(pg_jobs.keyed_job), instance=instance, tags=tags) as r:
            print(json.dumps({"run_id": r.run_id, "success": r.success}))
    """
)


class Launch:
    """One run launched from a process of its own (as a run worker), its output in files."""

    def __init__(self, env: dict[str, str], directory: Path, name: str) -> None:
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            # a session of its own, so a failed test can stop the run and its step processes
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH],
                cwd=REPO,
                env={**os.environ, **env},
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
            )

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def report(self) -> dict[str, Any]:
        assert self.proc.wait(timeout=WAIT_SECONDS) == 0, self.err.read_text()[-4000:]
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_two_concurrent_launches_of_one_key_work_once(
    instance: DagsterInstance, env: dict[str, str], tmp_path: Path
) -> None:
    key = "nightly-load/extract"
    work = Path(env[pg_jobs.WORK_DIR_ENV])

    def in_body() -> list[str]:
        found = sorted(p.name.split(".", 1)[1] for p in work.glob("in_body.*"))
        assert len(found) <= 1, f"both runs entered the guarded body: {found}"
        return found

    launches = [Launch(env, tmp_path, name) for name in ("a", "b")]
    try:
        # the loser decides and finishes while the winner holds the claim, waiting for "go"
        def finished() -> list[Launch]:
            in_body()  # fails at once if both runs got in
            return [launch for launch in launches if launch.finished()]

        done = _wait_for(finished, "one of the two runs to finish")
        assert len(done) == 1, [launch.err.read_text()[-2000:] for launch in done]
        [loser] = done
        [winner] = _wait_for(in_body, "the winner to be inside its body")
        lost = loser.report()
        assert lost["success"] and lost["run_id"] != winner
        with open_ledger(env[pg_jobs.LEDGER_URL_ENV]) as ledger:
            held = ledger.get(key)
        assert held is not None and held.state == State.IN_FLIGHT and held.run_id == winner
        (work / "go").touch()
        [won] = [launch.report() for launch in launches if launch is not loser]
    finally:
        (work / "go").touch()
        for launch in launches:
            launch.stop()
    loser_run = lost["run_id"]
    assert won == {"run_id": winner, "success": True}
    for run_id in (winner, loser_run):
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS

    # exactly one run did the work
    assert _warehouse_rows(env) == {
        ("extract", winner): pg_jobs.EXTRACT_ROWS,
        ("load", winner): 2 * pg_jobs.EXTRACT_ROWS,
    }
    assert _decisions(instance, winner) == {"extract": "proceed", "load": "proceed"}
    # the loser's extract was turned away; having no output, its load never ran (no decision)
    assert _decisions(instance, loser_run) == {"extract": "skipped_in_flight"}
    skipped_steps = {
        e.step_key for e in instance.all_logs(loser_run, of_type=DagsterEventType.STEP_SKIPPED)
    }
    assert skipped_steps == {"load"}

    # ... and it names the winner: in its log line and in that line's metadata
    [skip] = [
        e
        for e in instance.all_logs(loser_run, of_type=DagsterEventType.ENGINE_EVENT)
        if e.step_key == "extract"
    ]
    assert skip.dagster_event is not None
    assert f"being worked on by run {winner}" in (skip.user_message or skip.message or "")
    meta = skip.dagster_event.engine_event_data.metadata
    assert meta["rocky/decision"].value == "skipped_in_flight"
    assert meta["rocky/held_by_run_id"].value == winner

    # the ledger: the loser's skip is recorded between the winner's claim and its success
    assert _history(env, key) == [
        (EventKind.CLAIMED, winner),
        (EventKind.SKIPPED_IN_FLIGHT, loser_run),
        (EventKind.SUCCEEDED, winner),
    ]
    with open_ledger(env[pg_jobs.LEDGER_URL_ENV]) as ledger:
        assert {e.key: e.state for e in ledger.entries(run_id=winner)} == {
            key: State.SUCCEEDED,
            "nightly-load/load": State.SUCCEEDED,
        }
        assert ledger.entries(run_id=loser_run) == []
