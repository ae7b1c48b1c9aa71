"""The example's Definitions: five pipeline jobs, the whole warehouse job, a drop-file sensor,
a daily schedule, a guarded partitioned asset and multi-asset, the ledger's run-status sensors
and its admin job; and, from defs/, the same warehouse as software-defined assets
(warehouse/defs.yaml) and an asset launched by declarative automation (automation/assets.py).

Open it with `dagster dev -w workspace.yaml` from the repository root.
"""

from __future__ import annotations

import csv
import hashlib
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    BetaWarning,
    Config,
    DailyPartitionsDefinition,
    Definitions,
    MaterializeResult,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    define_asset_job,
    load_from_defs_folder,
    op,
    schedule,
    sensor,
)

from rocky_dagster import (
    IdempotencyLedger,
    guard_run_requests,
    idempotent_asset,
    idempotent_multi_asset,
    idempotent_op,
    ledger_admin_job,
    ledger_job,
    ledger_run_status_sensors,
    with_ledger,
)
from rocky_dagster.pipeline_ops import (
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

from .project import DROPS_DIR, MODELS_DIR, REPORTS_DIR, SOURCE_DB, WAREHOUSE_DB, ensure_data

ensure_data()
WAREHOUSE = str(WAREHOUSE_DB)

# --- the five pipelines -------------------------------------------------------------------------

LOAD = LoadPipeline(
    warehouse=WAREHOUSE,
    directory=str(DROPS_DIR),
    pattern="payments_*",
    table="payments",
    column_types={"payment_id": "INTEGER", "order_id": "INTEGER", "amount": "REAL"},
)
REPLICATION = ReplicationPipeline(
    warehouse=WAREHOUSE,
    source=str(SOURCE_DB),
    tables=["customers", "orders"],
    strategy="incremental",
    cursor_column="updated_at",
    key_columns=["id"],
    target_prefix="raw_",
)
TRANSFORMATION = TransformationPipeline(warehouse=WAREHOUSE, models_dir=str(MODELS_DIR))
QUALITY = QualityPipeline(
    warehouse=WAREHOUSE,
    checks=[
        {"kind": "not_null", "table": "raw_orders", "column": "customer_id"},
        {"kind": "unique", "table": "raw_orders", "columns": ["id"]},
        {
            "kind": "accepted_values",
            "table": "raw_orders",
            "column": "status",
            "values": ["placed", "shipped", "delivered", "returned"],
        },
        {"kind": "row_count", "table": "customer_revenue", "min": 1},
        {
            "kind": "expression",
            "name": "no_negative_payments",
            "table": "payments",
            "sql": "SELECT payment_id, amount FROM payments WHERE amount < 0",
            "description": "A refund arrived as a payment: fix the drop file.",
        },
        {
            "kind": "freshness",
            "table": "raw_orders",
            "column": "updated_at",
            "max_age": "3650d",
            "severity": "warn",
        },
    ],
)
SNAPSHOT = SnapshotPipeline(
    warehouse=WAREHOUSE,
    source_table="raw_customers",
    target_table="customers_history",
    unique_key=["id"],
    strategy="timestamp",
    updated_at="updated_at",
    invalidate_hard_deletes=True,
)

load_payments = load_op(LOAD, name="load_payments")
replicate_shop = replication_op(REPLICATION, name="replicate_shop")
build_models = transformation_op(TRANSFORMATION, name="build_models")
check_quality = quality_op(QUALITY, name="check_quality")
snapshot_customers = snapshot_op(SNAPSHOT, name="snapshot_customers")


@ledger_job(description="Load dropped payment files (CSV / JSON lines) into the warehouse.")
def load_job() -> None:
    load_payments()


@ledger_job(description="Replicate the shop's customers and orders incrementally.")
def replication_job() -> None:
    replicate_shop()


def _missing_tables(names: tuple[str, ...]) -> set[str]:
    if not WAREHOUSE_DB.exists():
        return set(names)
    with sqlite3.connect(WAREHOUSE_DB) as conn:
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    return set(names) - present


@op(
    description=(
        "Sample inputs on demand: on a fresh warehouse, run the upstream pipelines once (without "
        "the ledger) so this job can run on its own; does nothing once the tables exist."
    )
)
def sample_inputs(context) -> None:
    if _missing_tables(("payments", "raw_orders", "raw_customers")):
        LOAD.run()
        REPLICATION.run()
        context.log.info("fresh warehouse: loaded and replicated the sample inputs")
    if _missing_tables(("customer_revenue",)):
        TRANSFORMATION.run()
        context.log.info("fresh warehouse: built the models the checks read")


@ledger_job(description="Build the SQL models in example_project/models.")
def transformation_job() -> None:
    build_models(after=sample_inputs())


@ledger_job(description="Check the warehouse (error checks fail the run, warn checks do not).")
def quality_job() -> None:
    check_quality(after=sample_inputs())


@ledger_job(description="Record SCD-2 history of the customers.")
def snapshot_job() -> None:
    snapshot_customers(after=sample_inputs())


@ledger_job(
    description=(
        "The whole warehouse: load → replicate → transform → check → snapshot. Run it twice "
        "with one rocky/idempotency_key tag: the second run skips every op."
    )
)
def warehouse_job() -> None:
    loaded = load_payments()
    replicated = replicate_shop(after=loaded)
    built = build_models(after=replicated)
    checked = check_quality(after=built)
    snapshot_customers(after=checked)


# --- a playground for failure behaviour ------------------------------------------------------------


class HoldConfig(Config):
    seconds: float = 30.0


@idempotent_op(description="Holds its claim for `seconds`: try duplicates, cancel and kill on it.")
def hold_claim(config: HoldConfig) -> dict[str, float]:
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    return {"held_seconds": config.seconds}


class FlakyConfig(Config):
    fail_times: int = 1


@idempotent_op(description="Fails until the run is Dagster's retry number `fail_times`.")
def flaky_step(context, config: FlakyConfig) -> dict[str, int]:
    attempt = int(context.run.tags.get("dagster/retry_number", "0"))
    if attempt < config.fail_times:
        raise RuntimeError(
            f"flaky_step fails on run attempt {attempt} (fail_times={config.fail_times})"
        )
    return {"attempt": attempt}


@ledger_job(description="One guarded op that holds its claim (see hold_claim).")
def slow_job() -> None:
    hold_claim()


@ledger_job(description="One guarded op that fails on the first run attempt (see flaky_step).")
def flaky_job() -> None:
    flaky_step()


# --- a guarded partitioned asset ----------------------------------------------------------------

DAILY = DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-15")


@idempotent_asset(
    partitions_def=DAILY,
    group_name="reports",
    description="One CSV report of orders per day; a backfill run twice writes each day once.",
)
def daily_order_report(context) -> MaterializeResult:
    day = context.partition_key
    ensure_data()
    with sqlite3.connect(SOURCE_DB) as conn:
        rows = conn.execute(
            "SELECT id, customer_id, amount, status FROM orders "
            "WHERE substr(created_at, 1, 10) = ? ORDER BY id",
            (day,),
        ).fetchall()
    path = REPORTS_DIR / f"orders_{day}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["order_id", "customer_id", "amount", "status"])
        writer.writerows(rows)
    return MaterializeResult(metadata={"rows": len(rows), "path": str(path)})


@idempotent_multi_asset(
    specs=[
        AssetSpec("daily_revenue_report", description="Revenue per customer, one CSV per day."),
        AssetSpec("daily_status_report", description="Orders per status, one CSV per day."),
    ],
    partitions_def=DAILY,
    can_subset=True,
    group_name="reports",
    description="Two reports per day from one query; a backfill run twice writes each once.",
)
def daily_shop_reports(context: AssetExecutionContext) -> Iterator[MaterializeResult]:
    """Writes only the reports the ledger let through (`context.selected_asset_keys`)."""
    day = context.partition_key
    ensure_data()
    with sqlite3.connect(SOURCE_DB) as conn:
        orders = conn.execute(
            "SELECT customer_id, amount, status FROM orders WHERE substr(created_at, 1, 10) = ?",
            (day,),
        ).fetchall()
    revenue: dict[int, float] = {}
    statuses: dict[str, int] = {}
    for customer, amount, status in orders:
        revenue[customer] = round(revenue.get(customer, 0.0) + amount, 2)
        statuses[status] = statuses.get(status, 0) + 1
    reports = {
        "daily_revenue_report": (("customer_id", "revenue"), sorted(revenue.items())),
        "daily_status_report": (("status", "orders"), sorted(statuses.items())),
    }
    for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
        header, rows = reports[key.to_user_string()]
        path = REPORTS_DIR / f"{key.to_user_string()}_{day}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        yield MaterializeResult(asset_key=key, metadata={"rows": len(rows), "path": str(path)})


reports_job = with_ledger(define_asset_job("reports_job", selection=[daily_order_report]))

# --- sensor and schedule: ask the ledger before asking Dagster for a run ---------------------------


def _file_key(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"drop:{path.name}:{digest}"


# job_name, not job=: a sensor holding the job object makes Dagster re-create the sensor to bind
# the Definitions' resources to it, and that copy warns (BetaWarning) in every process.
@sensor(job_name="load_job", minimum_interval_seconds=10)
def payments_drop_sensor(context: SensorEvaluationContext, ledger: IdempotencyLedger):
    """One load run per dropped file content; a file that was loaded is never requested again."""
    files = sorted(p for p in DROPS_DIR.glob("payments_*") if p.is_file())
    if not files:
        return None
    requests = [RunRequest(run_key=_file_key(p), tags={"rocky/drop_file": p.name}) for p in files]
    return guard_run_requests(context, requests, ledger=ledger, job=load_job)


@schedule(cron_schedule="0 6 * * *", job=warehouse_job, execution_timezone="UTC")
def daily_warehouse_schedule(context: ScheduleEvaluationContext, ledger: IdempotencyLedger):
    """The warehouse once a day; a tick fired twice runs once (key: schedule + tick time)."""
    tick = context.scheduled_execution_time
    request = RunRequest(run_key=f"daily_warehouse@{tick.isoformat()}")
    return guard_run_requests(context, request, ledger=ledger, job=warehouse_job)


# Dagster's component loader copies asset checks with a beta parameter of its own (in every
# process that builds the asset graph); nothing here passes it, so the notice is not ours to act on.
warnings.filterwarnings("ignore", message="Parameter `execution_type`", category=BetaWarning)


def _declared_in_yaml() -> Definitions:
    """The warehouse as assets, declared in defs/warehouse/defs.yaml (PipelinesComponent)."""
    with warnings.catch_warnings():
        # ... and tags what it loads with a beta metadata class
        warnings.simplefilter("ignore", BetaWarning)
        return load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)


defs = Definitions.merge(
    Definitions(
        jobs=[
            load_job,
            replication_job,
            transformation_job,
            quality_job,
            snapshot_job,
            warehouse_job,
            slow_job,
            flaky_job,
            reports_job,
            ledger_admin_job(),  # operate the ledger from the Launchpad (rocky_ledger_admin)
        ],
        assets=[daily_order_report, daily_shop_reports],
        sensors=[payments_drop_sensor, *ledger_run_status_sensors(minimum_interval_seconds=5)],
        schedules=[daily_warehouse_schedule],
        # url=None: $ROCKY_LEDGER_URL if set, else $DAGSTER_HOME/rocky_ledger.db.
        resources={"ledger": IdempotencyLedger()},
    ),
    _declared_in_yaml(),
)
