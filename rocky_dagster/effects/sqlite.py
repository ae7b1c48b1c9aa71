"""Effect markers in a SQLite database: table `_rocky_effects` in the connection's `main`.

A writer takes SQLite's write lock (`BEGIN IMMEDIATE`) before it reads the key's marker, so a
second holder of the key waits until the first commits or rolls back and then judges what it
committed. The pipelines call `applied` and `record` inside their own write transaction;
`sqlite_once` is `exactly_once` for a user's own writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from .core import EFFECTS, Effect, EffectScope, Marker, encode_effect_result
from .errors import PipelineError

_TABLE = f'main."{EFFECTS}"'


def applied(conn: sqlite3.Connection, effect: Effect) -> Marker | None:
    """Call first inside the write transaction: `effect.judge` of the key's marker (None
    without a claim: an unguarded run records nothing)."""
    if effect.claim is None:
        return None
    return effect.judge(read_marker(conn, effect.key))


def record(conn: sqlite3.Connection, effect: Effect, result_json: str, summary_json: str) -> None:
    """Call last inside the write transaction: the marker commits with the writes (nothing
    without a claim)."""
    if effect.claim is None:
        return
    ensure_effects_table(conn)
    conn.execute(
        f"INSERT INTO {_TABLE} (key, generation, fence, run_id, pipeline_type, "
        "result_json, summary_json, applied_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET generation = excluded.generation, "
        "fence = excluded.fence, run_id = excluded.run_id, "
        "pipeline_type = excluded.pipeline_type, result_json = excluded.result_json, "
        "summary_json = excluded.summary_json, applied_at = excluded.applied_at",
        (
            effect.key,
            effect.generation,
            effect.fence,
            effect.run_id,
            effect.pipeline_type,
            result_json,
            summary_json,
            datetime.now(UTC).isoformat(),
        ),
    )


@contextmanager
def sqlite_once(conn: sqlite3.Connection, effect: Effect) -> Iterator[EffectScope]:
    """`exactly_once` on a `sqlite3.Connection`: the body, the marker check and the marker
    write in one `BEGIN IMMEDIATE` transaction."""
    if conn.in_transaction:
        raise PipelineError(
            "exactly_once: the connection is already inside a transaction; commit or roll it "
            "back first, so the marker and your writes share one transaction"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        marker = applied(conn, effect)
        if marker is not None:
            yield EffectScope(already_applied=True, recorded=json.loads(marker.result_json))
        else:
            scope = EffectScope(already_applied=False)
            yield scope
            encoded = encode_effect_result(scope.result)
            record(conn, effect, encoded, encoded)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def ensure_effects_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_TABLE} (key TEXT PRIMARY KEY, "
        "generation INTEGER NOT NULL, fence INTEGER NOT NULL, run_id TEXT NOT NULL, "
        "pipeline_type TEXT NOT NULL, result_json TEXT NOT NULL, summary_json TEXT NOT NULL, "
        "applied_at TEXT NOT NULL) STRICT"
    )


def read_marker(conn: sqlite3.Connection, key: str) -> Marker | None:
    """The marker of `key`, or None (also when no run with a claim ever wrote one)."""
    exists = conn.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?", (EFFECTS,)
    ).fetchone()
    if exists is None:
        return None
    row = conn.execute(
        "SELECT key, generation, fence, run_id, pipeline_type, result_json, summary_json, "
        f"applied_at FROM {_TABLE} WHERE key = ?",
        (key,),
    ).fetchone()
    return None if row is None else Marker(*row)
