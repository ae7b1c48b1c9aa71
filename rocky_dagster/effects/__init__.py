"""Exactly-once effects: a run's own warehouse writes commit with a marker of its claim's key
generation, so a holder that lost its claim never applies them twice. Imports no Dagster.

The package sits beside the ledger and beneath the pipelines (they import it, never the
reverse). `core` is the backend-free model; `sqlite` and `postgres` store the markers and import
only the core; `exactly_once` picks one by the connection it is given, importing `postgres`
(and with it psycopg) only for a psycopg connection.

Examples:
    .. code-block:: python

        from rocky_dagster.effects import exactly_once

        with exactly_once(conn, claim, name="send_invoices") as effect:
            if not effect.already_applied:
                conn.execute("INSERT INTO invoices ...")
                effect.result = {"invoices": 3}
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .core import EFFECTS, Effect, EffectClaim, EffectScope, Marker, encode_effect_result
from .errors import ClaimRefusedError, FenceLostError, PipelineError
from .sqlite import read_marker, sqlite_once

__all__ = [
    "EFFECTS",
    "ClaimRefusedError",
    "Effect",
    "EffectClaim",
    "EffectScope",
    "FenceLostError",
    "Marker",
    "PipelineError",
    "encode_effect_result",
    "exactly_once",
    "read_marker",
]


@contextmanager
def exactly_once(
    conn: Any,
    claim: EffectClaim,
    *,
    name: str = "custom",
    schema: str | None = None,
    ledger: Any = None,
) -> Iterator[EffectScope]:
    """Make your own SQLite or PostgreSQL writes exactly-once per claim generation, like the
    pipelines'.

    `conn` is a `sqlite3.Connection` or a psycopg 3 `Connection` (autocommit or not), and must
    not be inside a transaction already. The body runs inside one transaction that also checks
    and writes the effect marker (table `_rocky_effects`: in SQLite's `main`, in PostgreSQL
    in `schema`, default the connection's current schema, created if missing); `name` tells
    your step's markers from the pipelines'::

        claim = ledger.claim(key, run_id=run_id)
        if claim.should_run:
            with exactly_once(conn, claim, name="send_invoices") as effect:
                if effect.already_applied:
                    result = effect.recorded
                else:
                    conn.execute("INSERT INTO invoices ...")
                    effect.result = result = {"invoices": 3}
            ledger.finalize(key, claim.fence, Outcome.SUCCEEDED, result=result)

    An exception in the body rolls everything back; FenceLostError means a later holder
    committed first and nothing of yours was written.

    PostgreSQL only: `ledger=` a PostgreSQL ledger whose tables are in the connection's
    database stamps the claim `succeeded` (with `effect.result`, a dict or None) in the same
    transaction, so your writes, the marker and the stamp commit together or not at all; a
    refused stamp (the claim was lost) raises FenceLostError and rolls your writes back. Then
    there is no separate `ledger.finalize` to call.
    """
    if claim is None:
        raise ClaimRefusedError("exactly_once needs the claim the ledger returned for this step")
    effect = Effect(claim, name)
    if isinstance(conn, sqlite3.Connection):
        if ledger is not None or schema is not None:
            raise PipelineError(
                "exactly_once: ledger= and schema= are for a PostgreSQL connection; with SQLite "
                "the marker is in the warehouse's main schema and you stamp the ledger yourself "
                "after the block (ledger.finalize)"
            )
        with sqlite_once(conn, effect) as scope:
            yield scope
        return
    psycopg = sys.modules.get("psycopg")  # a psycopg connection means psycopg is imported
    if psycopg is None or not isinstance(conn, psycopg.Connection):
        raise PipelineError(
            "exactly_once: conn must be a sqlite3.Connection or a psycopg (3) Connection, got "
            f"{type(conn).__module__}.{type(conn).__name__}"
        )
    from .postgres import postgres_once

    with postgres_once(conn, effect, schema=schema, ledger=ledger) as scope:
        yield scope
