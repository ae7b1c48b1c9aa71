"""Small SQLite helpers shared by the pipelines: quoting, schema introspection, type affinity.

Plain SQL lives here because exactness matters: SQLite's type affinity decides how a copied
value is stored, so schemas are compared by affinity and created with the declared types verbatim.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from .errors import KeyChangeError, SchemaConflictError

INTERNAL_PREFIX = "_rocky_"
SAMPLE_LIMIT = 5
_MAX_TEXT = 200


def qi(name: str) -> str:
    """Quote an SQL identifier so any table or column name is safe to splice into SQL."""
    return '"' + name.replace('"', '""') + '"'


def affinity(declared: str) -> str:
    """Type affinity of a declared column type, by SQLite's own rules (section 3.1 of datatype3)."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper or not upper.strip():
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


@dataclass(frozen=True)
class Column:
    """One column as PRAGMA table_info reports it; `pk` is its 1-based position in the key, or 0."""

    name: str
    type: str
    pk: int = 0

    @property
    def affinity(self) -> str:
        return affinity(self.type)


def table_columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[Column]:
    """Columns of a table or view, empty when it does not exist."""
    rows = conn.execute(f"PRAGMA {qi(schema)}.table_info({qi(table)})").fetchall()
    return [Column(name=row[1], type=row[2] or "", pk=row[5]) for row in rows]


def object_type(conn: sqlite3.Connection, name: str, schema: str = "main") -> str | None:
    """'table', 'view' or None: what a name currently denotes in a schema (case-insensitive)."""
    row = conn.execute(
        f"SELECT type FROM {qi(schema)}.sqlite_master "
        "WHERE type IN ('table', 'view') AND lower(name) = lower(?)",
        (name,),
    ).fetchone()
    return None if row is None else str(row[0])


def user_tables(conn: sqlite3.Connection, schema: str = "main") -> list[str]:
    """Tables of a schema, without SQLite's own and rocky's bookkeeping tables."""
    rows = conn.execute(
        f"SELECT name FROM {qi(schema)}.sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_rocky\\_%' ESCAPE '\\' "
        "ORDER BY name"
    ).fetchall()
    return [str(row[0]) for row in rows]


def broken_views(conn: sqlite3.Connection, schema: str = "main") -> dict[str, str]:
    """Views of a schema that no longer compile, with SQLite's reason.

    SQLite lets a table be dropped or rebuilt under a view and only fails when the view is
    read, so a run that changes tables must ask every view itself.
    """
    names = conn.execute(
        f"SELECT name FROM {qi(schema)}.sqlite_master WHERE type = 'view' ORDER BY name"
    ).fetchall()
    broken: dict[str, str] = {}
    for (name,) in names:
        try:
            conn.execute(f"SELECT * FROM {qi(schema)}.{qi(name)} LIMIT 0").fetchall()
        except sqlite3.Error as exc:
            broken[str(name)] = str(exc)
    return broken


def count_rows(conn: sqlite3.Connection, table: str, schema: str = "main") -> int:
    return int(conn.execute(f"SELECT count(*) FROM {qi(schema)}.{qi(table)}").fetchone()[0])


def key_is_unique(conn: sqlite3.Connection, table: str, key: list[str], schema: str) -> bool:
    """Whether a primary key or unique index covers exactly `key`, so duplicates cannot exist."""
    wanted = {k.lower() for k in key}
    pk = {c.name.lower() for c in table_columns(conn, table, schema) if c.pk}
    if pk == wanted:
        return True
    for index in conn.execute(f"PRAGMA {qi(schema)}.index_list({qi(table)})").fetchall():
        if not index[2]:
            continue
        info = conn.execute(f"PRAGMA {qi(schema)}.index_info({qi(index[1])})").fetchall()
        if {str(row[2]).lower() for row in info} == wanted and len(info) == len(wanted):
            return True
    return False


def key_index_name(table: str) -> str:
    return f"{INTERNAL_PREFIX}key_{table}"


def ensure_unique_key(conn: sqlite3.Connection, table: str, key: list[str]) -> None:
    """Give a warehouse table the unique index that ON CONFLICT upserts on `key` need.

    The index rocky made for an earlier `key_columns` is replaced, not kept: it would go on
    rejecting rows the new key tells apart.
    """
    index = key_index_name(table)
    current = [
        str(row[2]).lower()
        for row in conn.execute(f"PRAGMA main.index_info({qi(index)})").fetchall()
    ]
    if current and sorted(current) != sorted(k.lower() for k in key):
        conn.execute(f"DROP INDEX main.{qi(index)}")
    if key_is_unique(conn, table, key, "main"):
        return
    cols = ", ".join(qi(k) for k in key)
    try:
        conn.execute(f"CREATE UNIQUE INDEX main.{qi(index)} ON {qi(table)} ({cols})")
    except sqlite3.IntegrityError as exc:
        raise KeyChangeError(
            f"key columns {key}: warehouse table {table!r} already holds rows sharing a key "
            f"({exc}); drop the table (the next run rebuilds it) or keep the old key_columns",
            table=table,
        ) from exc


def rekey(conn: sqlite3.Connection, table: str, key: list[str]) -> bool:
    """Rebuild a table whose PRIMARY KEY would reject rows that `key` tells apart.

    A table is created with its key as PRIMARY KEY; after `key_columns` change, a primary key
    that does not contain the new key can refuse rows the new key calls distinct. The table
    is re-created with the new key (its indexes and triggers re-applied) and its rows copied.
    """
    wanted = {k.lower() for k in key}
    columns = table_columns(conn, table)
    pk = [c for c in sorted(columns, key=lambda c: c.pk) if c.pk]
    if not pk or wanted <= {c.name.lower() for c in pk}:
        return False  # rows distinct on the new key are distinct on the primary key too
    extras = conn.execute(
        "SELECT sql FROM main.sqlite_master WHERE tbl_name = ? AND type IN ('index', 'trigger') "
        "AND sql IS NOT NULL AND name != ?",
        (table, key_index_name(table)),
    ).fetchall()
    stash = f"{INTERNAL_PREFIX}rekey"
    conn.execute(f"DROP TABLE IF EXISTS temp.{qi(stash)}")
    conn.execute(f"CREATE TEMP TABLE {qi(stash)} AS SELECT * FROM main.{qi(table)}")
    conn.execute(f"DROP TABLE main.{qi(table)}")
    create_like(conn, table, columns, key)
    names = ", ".join(qi(c.name) for c in columns)
    try:
        conn.execute(f"INSERT INTO main.{qi(table)} ({names}) SELECT {names} FROM temp.{qi(stash)}")
    except sqlite3.IntegrityError as exc:
        raise KeyChangeError(
            f"key columns {key}: warehouse table {table!r} (primary key "
            f"{[c.name for c in pk]}) already holds rows sharing the new key ({exc}); drop the "
            "table (the next run rebuilds it) or keep the old key_columns",
            table=table,
        ) from exc
    finally:
        conn.execute(f"DROP TABLE temp.{qi(stash)}")
    for (sql,) in extras:
        conn.execute(sql)
    return True


def create_like(
    conn: sqlite3.Connection, table: str, columns: list[Column], key: list[str]
) -> None:
    """Create a warehouse table with the source's declared types verbatim (same affinity, same values)."""
    defs = [f"{qi(c.name)} {c.type}".rstrip() for c in columns]
    if key:
        defs.append(f"PRIMARY KEY ({', '.join(qi(k) for k in key)})")
    conn.execute(f"CREATE TABLE main.{qi(table)} ({', '.join(defs)})")


def align_columns(
    conn: sqlite3.Connection, table: str, wanted: list[Column], *, context: str
) -> list[str]:
    """Add columns the target lacks; refuse a column whose type affinity differs from the target's.

    Returns the names of the columns added. A conflict would silently change stored values
    (e.g. TEXT '007' into an INTEGER column becomes 7), hence an error instead of a coercion.
    """
    existing = {c.name.lower(): c for c in table_columns(conn, table)}
    added: list[str] = []
    for column in wanted:
        current = existing.get(column.name.lower())
        if current is None:
            conn.execute(
                f"ALTER TABLE main.{qi(table)} ADD COLUMN {qi(column.name)} {column.type}".rstrip()
            )
            added.append(column.name)
        elif current.affinity != column.affinity:
            raise SchemaConflictError(
                f"{context}: column {column.name!r} has type {column.type or 'untyped'!r} "
                f"(affinity {column.affinity}) but warehouse table {table!r} has "
                f"{current.type or 'untyped'!r} (affinity {current.affinity}); change one of them "
                "or drop the warehouse table to rebuild it"
            )
    return added


def json_value(value: Any) -> Any:
    """A sample value that is JSON-able and short, so results stay small enough for metadata."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + "…"
    return value


def fetch_dicts(cursor: sqlite3.Cursor, limit: int = SAMPLE_LIMIT) -> list[dict[str, Any]]:
    """First `limit` rows of a cursor as JSON-able dicts."""
    names = [d[0] for d in cursor.description or ()]
    return [
        {name: json_value(value) for name, value in zip(names, row, strict=True)}
        for row in cursor.fetchmany(limit)
    ]


def same_rows(conn: sqlite3.Connection, left: str, right: str, columns: list[str]) -> bool:
    """Whether two (already quoted, qualified) relations hold the same multiset of rows.

    Compares grouped counts, so duplicates count and NULLs compare equal; used to skip
    rewriting a table whose content would not change.
    """
    n_left = conn.execute(f"SELECT count(*) FROM {left}").fetchone()[0]
    n_right = conn.execute(f"SELECT count(*) FROM {right}").fetchone()[0]
    if n_left != n_right:
        return False
    cols = ", ".join(qi(c) for c in columns)
    diff = conn.execute(
        f"SELECT 1 FROM (SELECT {cols}, count(*) FROM {left} GROUP BY {cols} "
        f"EXCEPT SELECT {cols}, count(*) FROM {right} GROUP BY {cols}) LIMIT 1"
    ).fetchone()
    return diff is None
