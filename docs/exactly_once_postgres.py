"""exactly_once with the ledger and the warehouse in one PostgreSQL database: your writes, the
effect marker and the ledger's stamp commit in one transaction, or none of them does.

Run it against a database you may create schemas in (it uses `rocky_ledger` for the ledger
and `billing` for the example's table and markers):

    python docs/exactly_once_postgres.py postgresql://user:password@localhost:5432/dbname
"""

import sys

import psycopg

from rocky_dagster import exactly_once
from rocky_dagster.ledger import open_ledger

url = sys.argv[1]
ledger = open_ledger(url)  # the ledger's tables: schema rocky_ledger of this database

with psycopg.connect(url, autocommit=True) as conn:
    conn.execute("CREATE SCHEMA IF NOT EXISTS billing")
    conn.execute("CREATE TABLE IF NOT EXISTS billing.invoices (customer text, amount int)")

    def send_invoices(run_id: str) -> tuple[str, dict | None]:
        claim = ledger.claim("invoices/2026-12", run_id)
        if not claim.should_run:
            return claim.decision.value, claim.result  # done before: the recorded result
        with exactly_once(
            conn, claim, name="send_invoices", schema="billing", ledger=ledger
        ) as effect:
            if effect.already_applied:  # an earlier holder committed it: write nothing
                return "already applied", effect.recorded
            conn.execute("INSERT INTO billing.invoices VALUES ('ada', 120), ('bob', 80)")
            effect.result = {"invoices": 2}
        # committed together: the rows, the marker, and the ledger entry now `succeeded`
        return "ran", effect.result

    print("run-1:", *send_invoices("run-1"))
    print("run-2:", *send_invoices("run-2"))
    print("entry:", ledger.get("invoices/2026-12").state.value)
    (count,) = conn.execute("SELECT count(*) FROM billing.invoices").fetchone()
    print("invoices:", count)
