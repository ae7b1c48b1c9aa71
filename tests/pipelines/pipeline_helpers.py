"""Plain helpers for the pipeline tests (importable from hypothesis tests, unlike fixtures)."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any


def execute(
    path: str | Path, script: str, rows: dict[str, Sequence[Sequence[Any]]] | None = None
) -> None:
    """Run DDL/DML on a database file, then insert `rows` per table, and commit."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(script)
        for table, values in (rows or {}).items():
            if values:
                marks = ", ".join("?" for _ in values[0])
                conn.executemany(f'INSERT INTO "{table}" VALUES ({marks})', values)
        conn.commit()


def query(path: str | Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def table_rows(path: str | Path, table: str, order: str = "1") -> list[tuple[Any, ...]]:
    return query(path, f'SELECT * FROM "{table}" ORDER BY {order}')


def dump(path: str | Path) -> dict[str, tuple[str, list[str]]]:
    """Schema and content of every table and view (bookkeeping included), order-independent:
    equal dumps mean a run changed nothing in the warehouse."""
    with closing(sqlite3.connect(path)) as conn:
        objects = conn.execute(
            "SELECT name, type, sql FROM sqlite_master WHERE type IN ('table', 'view', 'index') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        result: dict[str, tuple[str, list[str]]] = {}
        for name, kind, sql in objects:
            rows: list[str] = []
            if kind == "table":
                rows = sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{name}"'))
            result[name] = (sql or "", rows)
        return result


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh directory per hypothesis example (function-scoped tmp_path cannot be used)."""
    with tempfile.TemporaryDirectory(prefix="rocky-pipelines-") as name:
        yield Path(name)
