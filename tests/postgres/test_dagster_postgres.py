"""Dagster with its instance on PostgreSQL (dagster-postgres) and the ledger in the same
database: a keyed job under the multiprocess executor runs its work once per key, whether
launched twice in a row or twice at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pg_jobs
import pytest
from dagster import DagsterInstance, DagsterRunStatus, execute_job, reconstructable

from rocky_dagster.ledger import EventKind, open_ledger

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# `reconstructable` points step processes at module `pg_jobs`; they inherit this sys.path, but
# Dagster drops sys.path[0] (the script path) before importing, which is where pytest put this
# directory. A second entry keeps it importable.
sys.path.append(str(HERE))


@pytest.fixture
def instance_home(postgres_database: str, tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, whose server-side parameters break
    # dagster-postgres's `NOTIFY run_events, %(id)s`: name its driver, psycopg2, explicitly.
    url = postgres_database.replace("postgresql://", "postgresql+psycopg2://", 1)
    (home / "dagster.yaml").write_text(
        "storage:\n"
        "  postgres:\n"
        f"    postgres_url: {json.dumps(url)}\n"
        "telemetry:\n"
        "  enabled: false\n"
    )
    return home


@pytest.fixture
def env(
    instance_home: Path, postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    work = tmp_path / "work"
    work.mkdir()
    values = {
        "DAGSTER_HOME": str(instance_home),
        "ROCKY_LEDGER_URL": postgres_database,  # same server and database, schema rocky_ledger
        pg_jobs.WORK_DIR_ENV: str(work),
        # the launch subprocesses import pg_jobs by module name
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def instance(env: dict[str, str]) -> Iterator[DagsterInstance]:
    with DagsterInstance.get() as opened:  # creates dagster-postgres's tables once, up front
        assert type(opened.run_storage).__name__ == "PostgresRunStorage"
        yield opened


def _work_done(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in Path(env[pg_jobs.WORK_DIR_ENV]).glob("*.done"))


def test_same_key_twice_runs_the_work_once(instance, env):
    tags = {pg_jobs.KEY_TAG: "orders-2024-06-01"}
    runs: list[tuple[str, dict]] = []
    for _ in range(2):
        with execute_job(
            reconstructable(pg_jobs.keyed_job), instance=instance, tags=tags
        ) as result:
            assert result.success
            runs.append((result.run_id, result.output_for_node("guarded_work")))
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.SUCCESS
    (first_run, first), (second_run, second) = runs
    assert first == {"decision": "proceed", "worked": True}
    assert second == {"decision": "skipped_completed", "worked": False}
    assert _work_done(env) == [f"{first_run}.done"]
    # the guarded step ran in a process of its own (multiprocess executor), not in this one
    messages = [e.user_message or "" for e in instance.all_logs(second_run)]
    assert any("ledger decision" in m for m in messages)
    assert not any(f"(pid {os.getpid()})" in m for m in messages)
    with open_ledger(env["ROCKY_LEDGER_URL"]) as ledger:
        kinds = [e.kind for e in ledger.history("orders-2024-06-01/guarded_work")]
    assert kinds == [EventKind.CLAIMED, EventKind.SUCCEEDED, EventKind.SKIPPED_COMPLETED]


LAUNCH = textwrap.dedent(
    """
    import json
    from dagster import DagsterInstance, execute_job, reconstructable
    import pg_jobs
    tags = {pg_jobs.KEY_TAG: "nightly-load", pg_jobs.WAIT_TAG: "1"}
    with DagsterInstance.get() as instance:
        with execute_job(reconstructable(pg_jobs.keyed_job), instance=instance, tags=tags) as r:
            print(json.dumps({"run_id": r.run_id, "success": r.success,
                              "summary": r.output_for_node("guarded_work")}))
    """
)


def test_two_concurrent_launches_of_one_key_work_once(instance, env):
    code = LAUNCH
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["success"] for o in outputs)
    decisions = sorted(o["summary"]["decision"] for o in outputs)
    assert decisions == ["proceed", "skipped_in_flight"]
    winner = next(o["run_id"] for o in outputs if o["summary"]["worked"])
    assert _work_done(env) == [f"{winner}.done"]
    for o in outputs:
        assert instance.get_run_by_id(o["run_id"]).status == DagsterRunStatus.SUCCESS
    with open_ledger(env["ROCKY_LEDGER_URL"]) as ledger:
        history = ledger.history("nightly-load/guarded_work")
    assert [(e.kind, e.run_id) for e in history] == [
        (EventKind.CLAIMED, winner),
        (EventKind.SKIPPED_IN_FLIGHT, next(o["run_id"] for o in outputs if o["run_id"] != winner)),
        (EventKind.SUCCEEDED, winner),
    ]
