"""Jobs (and small helpers) for the Dagster-layer tests, importable by name from subprocesses.

Every guarded body appends ``<op> <run id>`` to ``$ROCKY_TEST_WORK_DIR/work.log`` when it really
runs, so a test can count the work that happened independently of what the ledger says.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from dagster import (
    Config,
    Failure,
    IOManager,
    RetryPolicy,
    in_process_executor,
    io_manager,
    job,
    logger,
    multiprocess_executor,
    op,
)

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_hooks, ledger_job
from rocky_dagster.effects import exactly_once
from rocky_dagster.step.guard import running_claim

HERE = Path(__file__).resolve().parent
GO_TIMEOUT_SECONDS = 120


def work_dir() -> Path:
    return Path(os.environ["ROCKY_TEST_WORK_DIR"])


def did_work(name: str, run_id: str) -> None:
    with open(work_dir() / "work.log", "a") as log:
        log.write(f"{name} {run_id}\n")


def work_log(directory: Path) -> list[tuple[str, str]]:
    """(op, run id) of every body that ran, in order."""
    path = directory / "work.log"
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


class FailConfig(Config):
    fail: bool = False


def assert_replayed(instance: Any, asset: str, replay_run: str, first_run: str) -> None:
    """The asset's newest materialization replays the first run's: no work, the skip's
    decision and the run that did the work in its metadata, the same data version."""
    from dagster import AssetKey

    records = instance.fetch_materializations(AssetKey(asset), limit=10).records
    assert [r.run_id for r in records] == [replay_run, first_run]
    newest, original = (r.asset_materialization for r in records)
    assert newest.metadata["rocky/replay"].value is True
    assert newest.metadata["rocky/decision"].value == "skipped_completed"
    assert newest.metadata["rocky/prior_run_id"].value == first_run
    assert newest.tags["dagster/data_version"] == original.tags["dagster/data_version"]


def fail_config(op_name: str, fail: bool) -> dict[str, Any]:
    return {"ops": {op_name: {"config": {"fail": fail}}}}


@idempotent_op
def work(context, config: FailConfig) -> dict[str, Any]:
    """The unit of work of most stories: fails when told to."""
    did_work("work", context.run_id)
    if config.fail:
        raise ValueError("work failed on purpose")
    return {"rows": 42}


@idempotent_op
def first(context) -> dict[str, Any]:
    did_work("first", context.run_id)
    return {"rows": 1}


@idempotent_op
def second(context, upstream: dict[str, Any], config: FailConfig) -> dict[str, Any]:
    did_work("second", context.run_id)
    if config.fail:
        raise ValueError("second failed on purpose")
    return {"rows": upstream["rows"] + 1}


@idempotent_op
def hold(context) -> dict[str, Any]:
    """Holds its claim until the test creates ``go`` in the work dir."""
    did_work("hold", context.run_id)
    (work_dir() / f"in_body.{context.run_id}").touch()
    deadline = time.monotonic() + GO_TIMEOUT_SECONDS
    while not (work_dir() / "go").exists():
        if time.monotonic() > deadline:
            raise Failure("the test never said go")
        time.sleep(0.05)
    return {"held": True}


@op
def explode(context) -> None:
    raise ValueError("an unrelated step of the same run failed")


@idempotent_op(retry_policy=RetryPolicy(max_retries=2))
def flaky_once(context) -> dict[str, Any]:
    """Attempt 1 fails, attempt 2 succeeds, inside one run."""
    did_work("flaky_once", context.run_id)
    if context.retry_number == 0:
        raise ValueError("first attempt fails")
    return {"attempt": context.retry_number + 1}


_JOB = {"ledger": IdempotencyLedger(), "executor_def": in_process_executor}


@ledger_job(**_JOB)
def work_job() -> None:
    work()


@ledger_job(**_JOB)
def two_step_job() -> None:
    second(first())


@ledger_job(**_JOB)
def hold_job() -> None:
    hold()


@ledger_job(**_JOB, hooks=ledger_hooks)  # the failure hook fires on `explode`
def hold_and_explode_job() -> None:
    hold()
    explode()


# --- a body that keeps doing side effects (the orphan stories) ---------------------------------

BUSY_SECONDS = 600


@idempotent_op
def busy(context) -> dict[str, Any]:
    """Appends a line to ``busy.log`` every 0.1 s for ten minutes, or until the ``go`` file
    exists; writes its pid first and, when something stops it, what did."""
    directory = work_dir()
    (directory / f"busy_pid.{context.run_id}").write_text(str(os.getpid()))
    deadline = time.monotonic() + BUSY_SECONDS
    try:
        with open(directory / "busy.log", "a") as out:
            while not (directory / "go").exists() and time.monotonic() < deadline:
                out.write(f"{context.run_id}\n")
                out.flush()
                time.sleep(0.1)
    except BaseException as exc:
        (directory / f"busy_stopped.{context.run_id}").write_text(type(exc).__name__)
        raise
    return {"busy": True}


_SHORT_LEASE = IdempotencyLedger(lease_seconds=2.0)  # heartbeats (and run checks) every 0.5 s


@ledger_job(ledger=_SHORT_LEASE, executor_def=in_process_executor)
def busy_job() -> None:
    busy()


@ledger_job(ledger=_SHORT_LEASE, executor_def=multiprocess_executor)
def busy_multiprocess_job() -> None:
    busy()


@ledger_job(
    ledger=_SHORT_LEASE,
    executor_def=multiprocess_executor.configured({"start_method": {"forkserver": {}}}),
)
def busy_forkserver_job() -> None:
    busy()


# --- a write of one's own through `exactly_once`, then a stop (the generation stories) ---------

AFTER_TAG = "rocky_test/after"
"""What `write_once` does once its write committed: `return` (the default), `wait` for the
``go`` file (holding its claim, so the test can kill, cancel or release it), or `raise`."""


def warehouse_rows(directory: Path) -> list[tuple[str, ...]]:
    """The rows `write_once` inserted: (run id,) each, in order."""
    with closing(sqlite3.connect(directory / "warehouse.db")) as conn:
        return conn.execute("SELECT run_id FROM payments ORDER BY rowid").fetchall()


@idempotent_op
def write_once(context) -> dict[str, Any]:
    """Inserts one row with a plain INSERT (no natural key, so a second application really adds
    a second row) inside `exactly_once` on its own claim; then does what its run's tag says."""
    did_work("write_once", context.run_id)
    claim = running_claim(context)
    with closing(sqlite3.connect(work_dir() / "warehouse.db", isolation_level=None)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS payments (run_id TEXT NOT NULL)")
        with exactly_once(conn, claim, name="payments") as effect:
            if effect.already_applied:
                result = effect.recorded
            else:
                conn.execute("INSERT INTO payments VALUES (?)", (context.run_id,))
                effect.result = result = {"rows": 1, "by": context.run_id}
    (work_dir() / f"committed.{context.run_id}").touch()
    after = context.run.tags.get(AFTER_TAG, "return")
    if after == "raise":
        raise ValueError("write_once failed after its write committed")
    if after == "wait":
        deadline = time.monotonic() + GO_TIMEOUT_SECONDS
        while not (work_dir() / "go").exists():
            if time.monotonic() > deadline:
                raise Failure("the test never said go")
            time.sleep(0.05)
    return result


@ledger_job(**_JOB)
def write_once_job() -> None:
    write_once()


@ledger_job(ledger=_SHORT_LEASE, executor_def=in_process_executor)
def write_once_watched_job() -> None:
    """Heartbeats (and looks at its run) every 0.5 s: a release or a finished run stops it."""
    write_once()


def committed(directory: Path) -> str | None:
    """Run id of a run whose `write_once` write has committed, if any."""
    markers = sorted(directory.glob("committed.*"))
    return markers[0].name.split(".", 1)[1] if markers else None


# --- helpers --------------------------------------------------------------------------------


def start_run(job_name: str, tags: dict[str, str]) -> subprocess.Popen[str]:
    """Run `job_name` from this module in a new process (as a run worker would)."""
    return subprocess.Popen(
        [sys.executable, str(HERE / "dagster_layer_run.py"), job_name, json.dumps(tags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` (a deadlock guard, not a timing test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def holder_started(directory: Path) -> str | None:
    """Run id of a run whose `hold` body is running, if any."""
    markers = sorted(directory.glob("in_body.*"))
    return markers[0].name.split(".", 1)[1] if markers else None


# --- the five pipelines + a custom op, for the F2 story -----------------------------------------


def make_pipeline_inputs(directory: Path) -> None:
    """A source database, a CSV drop and one SQL model under `directory`."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(directory / "source.db")) as conn:
        conn.executescript(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT, amount REAL,"
            " updated_at TEXT);"
            "INSERT INTO orders VALUES (1, 'paid', 10.0, '2024-06-01T00:00:00'),"
            " (2, 'paid', 5.5, '2024-06-01T01:00:00'), (3, 'open', 7.0, '2024-06-01T02:00:00');"
        )
        conn.commit()
    (directory / "drop").mkdir()
    (directory / "drop" / "customers.csv").write_text("id,name\n1,Ada\n2,Grace\n")
    (directory / "models").mkdir()
    (directory / "models" / "order_totals.sql").write_text(
        "SELECT status, sum(amount) AS total FROM raw_orders GROUP BY status\n"
    )


def multiprocess_work_job():
    """`work` under the multiprocess executor: the step (and its hooks) in a process of its own."""
    from dagster import multiprocess_executor

    @ledger_job(
        name="multiprocess_work_job", ledger=IdempotencyLedger(), executor_def=multiprocess_executor
    )
    def job() -> None:
        work()

    return job


def flaky_multiprocess_job(dedup_on: str = "success"):
    """`flaky_once` under the multiprocess executor: each attempt in a step process of its own."""
    from dagster import multiprocess_executor

    @ledger_job(
        name="flaky_multiprocess_job",
        ledger=IdempotencyLedger(dedup_on=dedup_on),
        executor_def=multiprocess_executor,
    )
    def job() -> None:
        flaky_once()

    return job


def pipelines_job():
    """Load → replicate → transform → check → snapshot, plus a custom op (configs from env)."""

    from rocky_dagster.decorators.pipeline_ops import (
        load_op,
        quality_op,
        replication_op,
        snapshot_op,
        transformation_op,
    )
    from rocky_dagster.pipelines import (
        LoadPipeline,
        QualityPipeline,
        ReplicationPipeline,
        SnapshotPipeline,
        TransformationPipeline,
    )

    base = work_dir()
    warehouse = str(base / "warehouse.db")
    load = load_op(
        LoadPipeline(warehouse=warehouse, directory=str(base / "drop"), table="customers")
    )
    replicate = replication_op(
        ReplicationPipeline(
            warehouse=warehouse,
            source=str(base / "source.db"),
            tables=["orders"],
            target_prefix="raw_",
        )
    )
    transform = transformation_op(
        TransformationPipeline(warehouse=warehouse, models_dir=str(base / "models"))
    )
    check = quality_op(
        QualityPipeline(
            warehouse=warehouse,
            checks=[
                {"kind": "not_null", "table": "raw_orders", "column": "id"},
                {"kind": "unique", "table": "raw_orders", "column": "id"},
            ],
        )
    )
    snapshot = snapshot_op(
        SnapshotPipeline(
            warehouse=warehouse,
            source_table="raw_orders",
            target_table="orders_history",
            unique_key=["id"],
            updated_at="updated_at",
        )
    )

    @idempotent_op
    def notify(context) -> dict[str, Any]:
        did_work("notify", context.run_id)
        return {"sent": 1}

    @ledger_job(name="pipelines_job", ledger=IdempotencyLedger(), executor_def=in_process_executor)
    def job() -> None:
        loaded = replicate(after=load())
        snapshot(after=check(after=transform(after=loaded)))
        notify()

    return job


# --- a ledger that turns read-only while a step stores its output (the backstop stories) -------


def ledger_path() -> Path:
    return Path(os.environ["ROCKY_LEDGER_URL"].removeprefix("sqlite:///"))


class LedgerGoesReadOnly(IOManager):
    """Stores nothing; marks the ledger file read-only, as an operator or a full disk would.

    The ledger refuses a read-only file even for root: every write checks the file's mode, so
    the step's stamp, right after its output is stored, is refused.
    """

    def handle_output(self, context, obj) -> None:
        ledger_path().chmod(0o444)

    def load_input(self, context):  # pragma: no cover - never read back
        raise NotImplementedError


def make_ledger_writable() -> None:
    ledger_path().chmod(0o644)


@logger
def ledger_back_when_stamp_fails(init_context):
    """Makes the ledger writable again the moment the step says its stamp failed: after the
    step's own write and before its hooks run, i.e. "briefly" unwritable, deterministically."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "could not stamp ledger key" in record.getMessage():
                make_ledger_writable()

    log = logging.getLogger("rocky_test_stamp_watch")
    log.setLevel(logging.INFO)
    log.handlers = [_Handler()]
    return log


@idempotent_op
def slow_stamp(context) -> dict[str, Any]:
    did_work("slow_stamp", context.run_id)
    return {"rows": 3}


_STAMP_JOB = {
    "executor_def": in_process_executor,
    "resource_defs": {
        "ledger": IdempotencyLedger(),
        "io_manager": io_manager(lambda _: LedgerGoesReadOnly()),
    },
}


@job(**_STAMP_JOB, hooks=set(ledger_hooks), logger_defs={"watch": ledger_back_when_stamp_fails})
def stamp_fails_with_hook_job() -> None:
    slow_stamp()


@job(**_STAMP_JOB)
def stamp_fails_without_hooks_job() -> None:
    slow_stamp()


@job(executor_def=in_process_executor, resource_defs={"ledger": IdempotencyLedger()})
def slow_stamp_job() -> None:
    slow_stamp()
