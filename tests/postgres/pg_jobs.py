"""The keyed job of the Dagster-on-PostgreSQL tests, built from the product itself.

`keyed_job` is a `ledger_job` (ledger hooks attached) of two `idempotent_op` steps,
``extract → load``, under the multiprocess executor: every step runs in a process of its own,
which builds the ``ledger`` resource (`IdempotencyLedger`) from ``$ROCKY_LEDGER_URL`` (an
`EnvVar`, as docs/running-across-machines.md recommends). The run's key is the run tag
``rocky/idempotency_key``.

The side effect of each body is rows inserted into ``warehouse_rows`` in PostgreSQL (one row
per unit of work, with the run id and the pid of the step process), so a test can count the
work that really happened independently of what the ledger and Dagster say: a second run that
did the work would double the count.

With the run tag ``test/hold`` set, `extract` marks ``in_body.<run id>`` in the work directory
once it holds its claim and keeps it until the test creates ``go`` there (files, not sleeps).

Step processes import this module by name (`reconstructable`), so it must stay importable
from ``tests/postgres`` on ``sys.path`` / ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg
from dagster import EnvVar, Failure, OpExecutionContext, multiprocess_executor

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_job

LEDGER_URL_ENV = "ROCKY_LEDGER_URL"
WAREHOUSE_URL_ENV = "ROCKY_TEST_WAREHOUSE_URL"
WORK_DIR_ENV = "ROCKY_TEST_WORK_DIR"
HOLD_TAG = "test/hold"
WAREHOUSE_TABLE = "warehouse_rows"
EXTRACT_ROWS = 3
GO_TIMEOUT_SECONDS = 300.0

CREATE_WAREHOUSE = (
    f"CREATE TABLE {WAREHOUSE_TABLE} "
    "(op text NOT NULL, run_id text NOT NULL, pid integer NOT NULL, n integer NOT NULL)"
)


def work_dir() -> Path:
    return Path(os.environ[WORK_DIR_ENV])


def _insert_rows(context: OpExecutionContext, op_name: str, count: int) -> int:
    """The work itself: `count` rows in the warehouse, stamped with this run and process."""
    with psycopg.connect(os.environ[WAREHOUSE_URL_ENV]) as conn:
        conn.cursor().executemany(
            f"INSERT INTO {WAREHOUSE_TABLE} (op, run_id, pid, n) VALUES (%s, %s, %s, %s)",
            [(op_name, context.run_id, os.getpid(), i) for i in range(count)],
        )
    context.log.info(f"{op_name}: inserted {count} rows into {WAREHOUSE_TABLE}")
    return count


def _hold_if_asked(context: OpExecutionContext) -> None:
    """Keep the claim (we are inside the body) until the test says ``go``."""
    if not context.run.tags.get(HOLD_TAG):
        return
    (work_dir() / f"in_body.{context.run_id}").touch()
    deadline = time.monotonic() + GO_TIMEOUT_SECONDS
    while not (work_dir() / "go").exists():
        if time.monotonic() > deadline:
            raise Failure(description="the test never created the 'go' file", allow_retries=False)
        time.sleep(0.05)


@idempotent_op
def extract(context: OpExecutionContext) -> dict[str, Any]:
    _hold_if_asked(context)
    rows = _insert_rows(context, "extract", EXTRACT_ROWS)
    return {"rows": rows, "table": WAREHOUSE_TABLE}


@idempotent_op
def load(context: OpExecutionContext, extracted: dict[str, Any]) -> dict[str, Any]:
    rows = _insert_rows(context, "load", 2 * int(extracted["rows"]))
    return {"rows": rows, "table": WAREHOUSE_TABLE}


@ledger_job(
    executor_def=multiprocess_executor,
    ledger=IdempotencyLedger(url=EnvVar(LEDGER_URL_ENV)),
)
def keyed_job() -> None:
    load(extract())
