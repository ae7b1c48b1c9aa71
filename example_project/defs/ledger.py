"""The ledger: the `ledger` resource every guarded step asks, the run-status sensors that settle
the claims of failed, canceled and crashed runs, and the admin job (`rocky_ledger_admin`)."""

from __future__ import annotations

from rocky_dagster import IdempotencyLedger, ledger_definitions

# url=None: $ROCKY_LEDGER_URL if set, else $DAGSTER_HOME/rocky_ledger.db.
defs = ledger_definitions(ledger=IdempotencyLedger(), minimum_interval_seconds=5)
