"""Guarded partitioned assets: a daily report, and two reports from one multi-asset."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Iterator

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    DailyPartitionsDefinition,
    MaterializeResult,
    define_asset_job,
)

from example_project.project import REPORTS_DIR, SOURCE_DB, ensure_data
from rocky_dagster import idempotent_asset, idempotent_multi_asset, with_ledger

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
