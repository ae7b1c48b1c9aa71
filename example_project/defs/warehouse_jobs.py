"""The five pipelines as guarded op jobs (one job each) and the whole warehouse as one job.

`warehouse_job` run twice with one `rocky/idempotency_key` tag: the second run skips every op.
The same pipelines as software-defined assets are declared in `warehouse/defs.yaml`.
"""

from __future__ import annotations

import sqlite3

from dagster import op

from example_project.project import DROPS_DIR, MODELS_DIR, SOURCE_DB, WAREHOUSE_DB, ensure_data
from rocky_dagster import ledger_job
from rocky_dagster.pipelines import (
    LoadPipeline,
    QualityPipeline,
    ReplicationPipeline,
    SnapshotPipeline,
    TransformationPipeline,
    pipeline_op,
)

ensure_data()
WAREHOUSE = str(WAREHOUSE_DB)

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

load_payments = pipeline_op(LOAD, name="load_payments")
replicate_shop = pipeline_op(REPLICATION, name="replicate_shop")
build_models = pipeline_op(TRANSFORMATION, name="build_models")
check_quality = pipeline_op(QUALITY, name="check_quality")
snapshot_customers = pipeline_op(SNAPSHOT, name="snapshot_customers")


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
