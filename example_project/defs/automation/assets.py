"""Declarative automation launching a guarded asset keyed by its inputs.

`orders_summary` asks declarative automation for a run every minute (`cron_tick_passed`), the
way a "keep it fresh" policy does, whether or not anything upstream changed. Its key is
`input_versions_key` — its code version plus the data version of `orders_extract` — so only
the first automated run after a change of `orders_extract` (or of the code) does the work; the
others skip, and their observation names the run that did it. Materialize `orders_extract`
(by hand, here) and the next automated run summarizes again.

Turn on `default_automation_condition_sensor` in the UI (Automation) to let it launch.
"""

from __future__ import annotations

import json
import sqlite3

from dagster import AssetExecutionContext, AutomationCondition, MaterializeResult, asset

from example_project.project import REPORTS_DIR, SOURCE_DB, ensure_data
from rocky_dagster import idempotent_asset, input_versions_key

EXTRACT = REPORTS_DIR / "orders_extract.json"
SUMMARY = REPORTS_DIR / "orders_summary.json"


@asset(
    group_name="automation",
    description="The shop's orders per status, extracted when someone materializes it.",
)
def orders_extract() -> MaterializeResult:
    ensure_data()
    with sqlite3.connect(SOURCE_DB) as conn:
        counts = dict(conn.execute("SELECT status, count(*) FROM orders GROUP BY status"))
    EXTRACT.write_text(json.dumps(counts, sort_keys=True))
    return MaterializeResult(metadata={"statuses": len(counts), "path": str(EXTRACT)})


@idempotent_asset(
    key_fn=input_versions_key,
    code_version="1",
    deps=[orders_extract],
    group_name="automation",
    automation_condition=AutomationCondition.cron_tick_passed("* * * * *"),
    description=(
        "Orders summarized from orders_extract; automation asks every minute, the ledger lets "
        "it work only when orders_extract (or this code) changed."
    ),
)
def orders_summary(context: AssetExecutionContext) -> MaterializeResult:
    counts = json.loads(EXTRACT.read_text()) if EXTRACT.exists() else {}
    summary = {"orders": sum(counts.values()), "statuses": len(counts), "run_id": context.run_id}
    SUMMARY.write_text(json.dumps(summary, sort_keys=True))
    return MaterializeResult(metadata={"orders": summary["orders"], "path": str(SUMMARY)})
