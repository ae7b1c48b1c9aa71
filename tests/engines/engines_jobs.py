"""The jobs the engine tests run on Celery and Dask workers, built from the product itself.

Every job has one step writing one row (the side effect) into ``engines.effects`` in a
PostgreSQL warehouse. The guarded step is an `idempotent_op` whose write goes through
`exactly_once` on a psycopg connection with the step's own claim (`running_claim(context)`),
so the row and its effect marker commit together; the plain step is an `@op` writing the
same row with no ledger (the control). Counting rows per key counts the work that happened.

The run tag ``test/pause`` (``before`` / ``after``) makes the first attempt of a step stop
at that point (before the write; after the write committed, before the step returns) and
write ``<run id>.<point>`` (its pid and PID-namespace inode) into $ROCKY_ENGINES_SIGNALS;
it goes on when the test writes ``<run id>.go``. A re-delivered attempt finds the file and
does not pause again. Files, not sleeps: the test waits for a state, never for a time.

Workers and launchers import this module by name: keep it importable from tests/engines.
"""

import os
import time
from pathlib import Path
from typing import Any

import psycopg
from dagster import EnvVar, Failure, OpExecutionContext, job, op
from dagster_celery import celery_executor
from dagster_dask import dask_executor

from rocky_dagster import IdempotencyLedger, exactly_once, idempotent_op, ledger_job
from rocky_dagster.step.guard import running_claim
from rocky_dagster.step.keys import KEY_TAG

LEDGER_URL_ENV = "ROCKY_LEDGER_URL"
WAREHOUSE_URL_ENV = "ROCKY_ENGINES_WAREHOUSE_URL"
SIGNALS_ENV = "ROCKY_ENGINES_SIGNALS"
PAUSE_TAG = "test/pause"
SCHEMA = "engines"
TABLE = f"{SCHEMA}.effects"
LEASE_SECONDS = 90.0
"""Long enough that a re-delivery or a relaunch surely comes while a dead holder's lease lives
(on a loaded CI machine); waits for the lease to run out are bounded by it."""
SHORT_LEASE_SECONDS = 3.0
"""For "after the lease ran out": a few seconds away (heartbeat every 0.75 s)."""
GO_TIMEOUT_SECONDS = 300.0

CREATE_WAREHOUSE = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"CREATE TABLE IF NOT EXISTS {TABLE} (key text NOT NULL, run_id text NOT NULL, "
    "pid integer NOT NULL, written_at timestamptz NOT NULL DEFAULT now())",
)


def _signals() -> Path:
    return Path(os.environ[SIGNALS_ENV])


def _key(context: OpExecutionContext) -> str:
    return context.run.tags.get(KEY_TAG) or context.run_id


def pause(context: OpExecutionContext, point: str) -> None:
    """The first attempt stops here until the test writes ``<run id>.go`` (see module doc)."""
    if context.run.tags.get(PAUSE_TAG) != point:
        return
    reached = _signals() / f"{context.run_id}.{point}"
    if reached.exists():
        return  # a re-delivered attempt: the first one already paused here
    namespace = os.stat("/proc/self/ns/pid").st_ino
    partial = reached.with_suffix(".tmp")
    partial.write_text(f"{os.getpid()} {namespace}")
    partial.rename(reached)
    go = _signals() / f"{context.run_id}.go"
    deadline = time.monotonic() + GO_TIMEOUT_SECONDS
    while not go.exists():
        if time.monotonic() > deadline:
            raise Failure(description="the test never wrote the go file", allow_retries=False)
        time.sleep(0.02)


def _insert(conn: psycopg.Connection[Any], context: OpExecutionContext) -> None:
    conn.execute(
        f"INSERT INTO {TABLE} (key, run_id, pid) VALUES (%s, %s, %s)",
        (_key(context), context.run_id, os.getpid()),
    )


@op
def plain_effect(context: OpExecutionContext) -> dict[str, Any]:
    """The control: the same write with no ledger."""
    pause(context, "before")
    with psycopg.connect(os.environ[WAREHOUSE_URL_ENV], autocommit=True) as conn:
        _insert(conn, context)
    pause(context, "after")
    (_signals() / f"{context.run_id}.end").touch()
    return {"rows": 1}


@idempotent_op
def guarded_effect(context: OpExecutionContext) -> dict[str, Any]:
    """The write, exactly once per key: the row and its marker commit in one transaction."""
    pause(context, "before")
    with (
        psycopg.connect(os.environ[WAREHOUSE_URL_ENV], autocommit=True) as conn,
        exactly_once(conn, running_claim(context), name="engines", schema=SCHEMA) as effect,
    ):
        if effect.already_applied:
            result = effect.recorded  # an earlier attempt of this generation committed it
        else:
            _insert(conn, context)
            effect.result = result = {"rows": 1}
    pause(context, "after")
    (_signals() / f"{context.run_id}.end").touch()
    return result


def _ledger(lease_seconds: float) -> IdempotencyLedger:
    return IdempotencyLedger(url=EnvVar(LEDGER_URL_ENV), lease_seconds=lease_seconds)


@job(executor_def=celery_executor)
def plain_celery_job() -> None:
    plain_effect()


@ledger_job(executor_def=celery_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_celery_job() -> None:
    guarded_effect()


@ledger_job(executor_def=celery_executor, ledger=_ledger(SHORT_LEASE_SECONDS))
def guarded_celery_short_lease_job() -> None:
    guarded_effect()


@ledger_job(executor_def=dask_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_dask_job() -> None:
    guarded_effect()


# dagster-dask names a step's Dask task "<job name>.<step key>", and Dask shares one task among
# every client that submits the same name: concurrent runs of ONE job on one cluster would get
# a single step execution (and its events) between them. Concurrent runs of one key therefore
# come from four jobs (the ledger key is the run's key and the step, whatever the job).
@ledger_job(executor_def=dask_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_dask_job_a() -> None:
    guarded_effect()


@ledger_job(executor_def=dask_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_dask_job_b() -> None:
    guarded_effect()


@ledger_job(executor_def=dask_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_dask_job_c() -> None:
    guarded_effect()


@ledger_job(executor_def=dask_executor, ledger=_ledger(LEASE_SECONDS))
def guarded_dask_job_d() -> None:
    guarded_effect()


JOBS = {
    "plain_celery_job": plain_celery_job,
    "guarded_celery_job": guarded_celery_job,
    "guarded_celery_short_lease_job": guarded_celery_short_lease_job,
    "guarded_dask_job": guarded_dask_job,
    "guarded_dask_job_a": guarded_dask_job_a,
    "guarded_dask_job_b": guarded_dask_job_b,
    "guarded_dask_job_c": guarded_dask_job_c,
    "guarded_dask_job_d": guarded_dask_job_d,
}
