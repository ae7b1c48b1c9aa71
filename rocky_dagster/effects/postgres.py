"""`exactly_once` on a PostgreSQL connection (psycopg 3). The package imports this module only
when one is passed, so psycopg stays optional; it is the only module that imports psycopg.

The marker table is `<schema>._rocky_effects`, created (in a transaction of its own, before
the run's) when missing. The run's transaction first makes sure the key has a row, inserting
a placeholder (generation 0, never committed: it is either overwritten by this run's marker or
rolled back with it) when it has none, then locks that row with `SELECT … FOR UPDATE`. A second
holder of the key therefore waits at the INSERT or the SELECT until the first one commits or
rolls back, and then decides on what it committed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from .core import EFFECTS, Effect, EffectScope, Marker, encode_effect_result
from .errors import FenceLostError, PipelineError

_COLUMNS = "key, generation, fence, run_id, pipeline_type, result_json, summary_json, applied_at"


@contextmanager
def postgres_once(
    conn: psycopg.Connection[Any], effect: Effect, *, schema: str | None, ledger: Any
) -> Iterator[EffectScope]:
    """`exactly_once` on a psycopg connection: the body, the locked marker row and (with
    `ledger=`) the ledger's stamp in one transaction."""
    if conn.closed:
        raise PipelineError("exactly_once: the connection is closed")
    status = conn.info.transaction_status
    if status != TransactionStatus.IDLE:
        raise PipelineError(
            f"exactly_once: the connection is already inside a transaction ({status.name}); "
            "commit or roll it back first, so the marker and your writes share one transaction"
        )
    if schema is not None and (not isinstance(schema, str) or not schema):
        raise PipelineError(f"exactly_once: schema must be a non-empty string, got {schema!r}")
    if ledger is not None and not callable(getattr(ledger, "finalize_in", None)):
        raise PipelineError(
            "exactly_once: ledger= must be a PostgreSQL ledger (open_ledger('postgresql://…')) "
            f"whose tables are in the connection's database, got {type(ledger).__name__}"
        )
    table = effects_table(conn, schema)
    with conn.transaction():
        if ledger is not None:
            ledger.check_shared_database(conn)  # before the body does any work
        marker = effect.judge(_lock_marker(conn, table, effect.key))
        if marker is not None:
            scope = EffectScope(already_applied=True, recorded=json.loads(marker.result_json))
            yield scope
            result = scope.recorded
        else:
            scope = EffectScope(already_applied=False)
            yield scope
            encoded = encode_effect_result(scope.result)
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET generation = %s, fence = %s, run_id = %s, pipeline_type = %s, "
                    "result_json = %s, summary_json = %s, applied_at = now() WHERE key = %s"
                ).format(table),
                (
                    effect.generation,
                    effect.fence,
                    effect.run_id,
                    effect.pipeline_type,
                    encoded,
                    encoded,
                    effect.key,
                ),
            )
            result = scope.result
        if ledger is not None:
            scope.stamp = _stamp(ledger, conn, effect, result)


def _stamp(ledger: Any, conn: psycopg.Connection[Any], effect: Effect, result: Any) -> Any:
    """The ledger's finalize in this transaction; FenceLostError (so everything rolls back)
    unless it applied, or this very claim was already stamped succeeded."""
    done = ledger.finalize_in(conn, effect.key, effect.fence, "succeeded", result=result)
    if done.applied or (
        getattr(done.reason, "value", None) == "already_final"
        and getattr(done.state, "value", None) == "succeeded"
    ):
        return done
    reason = getattr(done.reason, "value", done.reason)
    raise FenceLostError(
        f"key {effect.key!r}: the ledger refused to stamp fence {effect.fence} ({reason}"
        + (f"; the key is held by run {done.run_id}" if getattr(done, "run_id", None) else "")
        + "): this holder lost its claim, so its writes and marker were rolled back",
        table=EFFECTS,
    )


def effects_table(conn: psycopg.Connection[Any], schema: str | None) -> sql.Composed:
    """`<schema>._rocky_effects`, quoted; created if missing (in a transaction of its own)."""
    for _ in range(3):
        with conn.transaction():
            row = conn.execute(
                "SELECT s, to_regclass(quote_ident(s) || '.' || quote_ident(%s)) "
                "FROM (SELECT coalesce(%s, current_schema()) AS s) AS q",
                (EFFECTS, schema),
            ).fetchone()
        assert row is not None
        name, found = row
        if name is None:
            raise PipelineError(
                "exactly_once: no schema of the connection's search_path exists; pass schema= "
                "to say where the effect markers go"
            )
        table = sql.SQL("{}.{}").format(sql.Identifier(name), sql.Identifier(EFFECTS))
        if found is not None:
            return table
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"rocky_dagster.effects:{name}",)
                )
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, "
                        "generation bigint NOT NULL, fence bigint NOT NULL, run_id text NOT NULL, "
                        "pipeline_type text NOT NULL, result_json text NOT NULL, "
                        "summary_json text NOT NULL, applied_at timestamptz NOT NULL)"
                    ).format(table)
                )
        except psycopg.errors.InvalidSchemaName:
            raise PipelineError(
                f"exactly_once: schema {name!r} does not exist in this database; create it or "
                "pass another schema="
            ) from None
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            pass  # another session created it at the same moment: look again
    raise PipelineError(f"exactly_once: could not create {EFFECTS} in schema {schema!r}")


def _lock_marker(conn: psycopg.Connection[Any], table: sql.Composed, key: str) -> Marker | None:
    """The key's marker, its row locked until this transaction ends (None: there is none)."""
    with conn.pipeline():
        conn.execute(
            sql.SQL(
                f"INSERT INTO {{}} ({_COLUMNS}) VALUES (%s, 0, 0, '', '', 'null', 'null', now()) "
                "ON CONFLICT (key) DO NOTHING"
            ).format(table),
            (key,),
        )
        cur = conn.execute(
            sql.SQL(f"SELECT {_COLUMNS} FROM {{}} WHERE key = %s FOR UPDATE").format(table),
            (key,),
        )
    row = cur.fetchone()
    assert row is not None
    if row[1] == 0:
        return None  # our own placeholder
    return Marker(*row[:7], applied_at=row[7].isoformat())


def read_pg_marker(
    conn: psycopg.Connection[Any], key: str, *, schema: str | None = None
) -> Marker | None:
    """The committed marker of `key` in a PostgreSQL database, or None."""
    with conn.transaction():
        row = conn.execute(
            "SELECT to_regclass(quote_ident(coalesce(%s, current_schema())) || '.' || "
            "quote_ident(%s))::text",
            (schema, EFFECTS),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        found = conn.execute(
            sql.SQL(f"SELECT {_COLUMNS} FROM {{}} WHERE key = %s").format(sql.SQL(row[0])),
            (key,),
        ).fetchone()
    if found is None or found[1] == 0:
        return None
    return Marker(*found[:7], applied_at=found[7].isoformat())
