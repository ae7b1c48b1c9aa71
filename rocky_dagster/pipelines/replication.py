"""Replication: copy tables from a source SQLite database into the warehouse.

The source is ATTACHed read-only and rows move with INSERT … SELECT inside SQLite, so a
million rows never round-trip through Python. Upserts only rewrite rows whose values differ,
which is what makes a re-run on unchanged input write nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlite_utils import Database

from ..effects import EffectClaim
from .base import PipelineConfig, as_list, check_identifier, failure_context, write_transaction
from .errors import KeyChangeError, PipelineError
from .results import PipelineResult, TableStats, utcnow
from .sql import (
    align_columns,
    count_rows,
    create_like,
    ensure_unique_key,
    key_is_unique,
    object_type,
    qi,
    rekey,
    same_rows,
    table_columns,
    user_tables,
)

Strategy = Literal["full_refresh", "incremental"]
WATERMARKS = "_rocky_watermarks"
SRC = "rocky_src"


class ReplicationTableOptions(BaseModel):
    """Per-table overrides of the pipeline-wide replication settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy | None = None
    cursor_column: str | None = None
    key_columns: list[str] | None = None
    target: str | None = Field(None, description="Warehouse table name (default: prefix + source).")

    _list = field_validator("key_columns", mode="before")(as_list)


@dataclass(frozen=True)
class TablePlan:
    """How one source table is replicated, after merging overrides."""

    source: str
    target: str
    strategy: Strategy
    cursor: str | None
    key: list[str]


class ReplicationPipeline(PipelineConfig):
    """Copy source tables into the warehouse, fully or incrementally on a cursor column.

    Incremental runs read rows whose cursor is >= the stored watermark (so rows sharing the
    last cursor value are never missed) and upsert them on `key_columns`; unchanged rows are
    not rewritten. Rows whose cursor is NULL are only picked up by the first run.
    """

    pipeline_type: ClassVar[str] = "replication"

    source: str = Field(description="Path of the source SQLite database; opened read-only.")
    tables: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Source table names or glob patterns (e.g. 'orders', 'crm_*').",
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of tables to skip.")
    strategy: Strategy = "full_refresh"
    cursor_column: str | None = Field(None, description="Incremental cursor, e.g. updated_at.")
    key_columns: list[str] = Field(default_factory=list, description="Columns identifying a row.")
    target_prefix: str = Field("", description="Prefix of warehouse table names, e.g. 'raw_'.")
    table_options: dict[str, ReplicationTableOptions] = Field(default_factory=dict)

    _lists = field_validator("tables", "exclude", "key_columns", mode="before")(as_list)

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be the path of the source SQLite database")
        return value

    @field_validator("target_prefix")
    @classmethod
    def _prefix_not_reserved(cls, value: str) -> str:
        return check_identifier(value, "target_prefix") if value else value

    @model_validator(mode="after")
    def _incremental_needs_cursor_and_key(self) -> Self:
        scopes: list[tuple[str, TablePlan]] = [("", self.plan("*"))]
        scopes += [(f"table_options.{name}.", self.plan(name)) for name in self.table_options]
        for prefix, plan in scopes:
            if plan.strategy != "incremental":
                continue
            if not plan.cursor:
                raise ValueError(
                    f"{prefix}cursor_column: required when strategy is 'incremental' "
                    "(the column whose growth marks new or changed rows, e.g. updated_at)"
                )
            if not plan.key:
                raise ValueError(
                    f"{prefix}key_columns: required when strategy is 'incremental' "
                    "(the columns changed rows are upserted on, e.g. [id])"
                )
        return self

    def plan(self, source_table: str) -> TablePlan:
        """Effective settings for one source table."""
        lookup = {k.lower(): v for k, v in self.table_options.items()}
        opts = lookup.get(source_table.lower(), ReplicationTableOptions())
        return TablePlan(
            source=source_table,
            target=opts.target or f"{self.target_prefix}{source_table}",
            strategy=opts.strategy or self.strategy,
            cursor=opts.cursor_column or self.cursor_column,
            key=list(opts.key_columns if opts.key_columns is not None else self.key_columns),
        )

    def run(self, *, claim: EffectClaim | None = None) -> PipelineResult:
        """Replicate every selected table in one transaction; a failure changes nothing."""
        effect = self._effect(claim)
        source = Path(self.source)
        if not source.is_file():
            raise PipelineError(
                f"source: database file {self.source!r} does not exist", path=self.source
            )
        if Path(self.warehouse).exists() and source.resolve() == Path(self.warehouse).resolve():
            raise PipelineError(
                "source: must be a different database than the warehouse", path=self.source
            )
        result = PipelineResult(pipeline_type=self.pipeline_type)
        watermarks: dict[str, Any] = {}
        added: dict[str, list[str]] = {}
        with self._session() as (conn, db):
            uri = "file:" + urllib.parse.quote(self.source) + "?mode=ro"
            with failure_context("reading the source database", path=self.source):
                conn.execute(f"ATTACH DATABASE ? AS {SRC}", (uri,))
                plans = [self.plan(name) for name in self._selected(conn)]
            with write_transaction(conn):
                recorded = effect.begin(conn)
                if recorded is not None:
                    return recorded
                _ensure_watermarks(db)
                for plan in plans:
                    with failure_context(
                        f"replicating {plan.source!r} into {plan.target!r}", table=plan.target
                    ):
                        new_cols, mark = _replicate(conn, db, plan, result, self.source)
                    if new_cols:
                        added[plan.target] = new_cols
                    if plan.strategy == "incremental":
                        watermarks[plan.target] = mark
                result.details = {"watermarks": watermarks, "added_columns": added}
                effect.commit(conn, result.finish())
        return result

    def selected_tables(self) -> list[str]:
        """The source tables this config replicates, read from the source now (read-only):
        what `pipeline_assets` turns into one asset per target table."""
        if not Path(self.source).is_file():
            raise PipelineError(
                f"source: database file {self.source!r} does not exist", path=self.source
            )
        conn = sqlite3.connect(":memory:", uri=True)
        try:
            uri = "file:" + urllib.parse.quote(self.source) + "?mode=ro"
            with failure_context("reading the source database", path=self.source):
                conn.execute(f"ATTACH DATABASE ? AS {SRC}", (uri,))
                return self._selected(conn)
        finally:
            conn.close()

    def for_tables(self, source_tables: list[str]) -> ReplicationPipeline:
        """This config narrowed to some of its source tables (a subset run), each named
        exactly; the per-table options of the others are dropped."""
        wanted = {name.lower() for name in source_tables}
        return self.model_copy(
            update={
                "tables": list(source_tables),
                "exclude": [],
                "table_options": {
                    k: v for k, v in self.table_options.items() if k.lower() in wanted
                },
            }
        )

    def _selected(self, conn: sqlite3.Connection) -> list[str]:
        available = user_tables(conn, SRC)
        chosen: set[str] = set()
        for pattern in self.tables:
            matched = _matching(pattern, available)
            if not matched and not _is_glob(pattern):
                raise PipelineError(
                    f"tables: source {self.source!r} has no table {pattern!r} "
                    f"(it has: {', '.join(available) or 'no tables'})",
                    table=pattern,
                )
            chosen.update(matched)
        excluded: set[str] = set()
        for pattern in self.exclude:
            excluded.update(_matching(pattern, available))
        selected = sorted(chosen - excluded)
        if not selected:
            raise PipelineError(f"tables: {self.tables} minus exclude selected no source table")
        unknown = {k for k in self.table_options if k.lower() not in {s.lower() for s in selected}}
        if unknown:
            raise PipelineError(f"table_options: {sorted(unknown)} are not selected tables")
        targets = [self.plan(n).target.lower() for n in selected]
        clashes = sorted({t for t in targets if targets.count(t) > 1})
        if clashes:
            raise PipelineError(
                f"table_options: several source tables map to {clashes}", table=clashes[0]
            )
        return selected


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _matching(pattern: str, names: list[str]) -> set[str]:
    """Names a `tables`/`exclude` entry selects, case-insensitively. A table whose name is
    exactly the entry is that table, even when the name holds glob characters (`weird[1]`);
    otherwise the entry is a glob pattern."""
    exact = {n for n in names if n.lower() == pattern.lower()}
    if exact or not _is_glob(pattern):
        return exact
    return {n for n in names if fnmatchcase(n.lower(), pattern.lower())}


def _ensure_watermarks(db: Database) -> None:
    db[WATERMARKS].create(  # type: ignore[union-attr]
        {
            "target_table": str,
            "source": str,
            "source_table": str,
            "cursor_column": str,
            "value_json": str,
            "updated_at": str,
        },
        pk="target_table",
        if_not_exists=True,
    )


def _replicate(
    conn: sqlite3.Connection, db: Database, plan: TablePlan, result: PipelineResult, source: str
) -> tuple[list[str], Any]:
    """Bring one target table up to date; returns (columns added, watermark after the run)."""
    started = time.perf_counter()
    columns = table_columns(conn, plan.source, SRC)
    present = {c.name.lower() for c in columns}
    cursor = [plan.cursor] if plan.cursor and plan.strategy == "incremental" else []
    for name in [*cursor, *plan.key]:
        if name.lower() not in present:
            raise PipelineError(
                f"column {name!r} (cursor_column/key_columns) is not in source table "
                f"{plan.source!r}; it has {[c.name for c in columns]}"
            )
    key = plan.key or [c.name for c in sorted((c for c in columns if c.pk), key=lambda c: c.pk)]
    kind = object_type(conn, plan.target)
    added: list[str] = []
    if kind is None:
        # A missing target is built in full, as dbt does: a watermark left by a dropped
        # table would otherwise make the next incremental run skip every older row.
        conn.execute(f"DELETE FROM {WATERMARKS} WHERE target_table = ?", (plan.target,))
        create_like(conn, plan.target, columns, key)
    elif kind == "view":
        raise PipelineError(f"warehouse object {plan.target!r} is a view, not a table")
    else:
        added = align_columns(conn, plan.target, columns, context=f"source table {plan.source!r}")
    stats = result.table(plan.target)
    if key and kind is not None:
        _rekey(conn, plan, key, stats)
    elif key:
        ensure_unique_key(conn, plan.target, key)
    copier = _Copier(conn, plan, [c.name for c in columns], key, stats)
    mark = copier.incremental(db, source) if plan.strategy == "incremental" else copier.full()
    stats.duration_seconds = round(time.perf_counter() - started, 6)
    return added, mark


def _rekey(conn: sqlite3.Connection, plan: TablePlan, key: list[str], stats: TableStats) -> None:
    """Fit an existing target to the current key. When its rows share a value of a new key,
    a full refresh empties it first (it is about to equal the source anyway); an incremental
    run cannot rebuild what it no longer reads, so the KeyChangeError stands."""
    conn.execute("SAVEPOINT rocky_rekey")
    try:
        rekey(conn, plan.target, key)
        ensure_unique_key(conn, plan.target, key)
    except KeyChangeError:
        conn.execute("ROLLBACK TO rocky_rekey")
        conn.execute("RELEASE rocky_rekey")
        if plan.strategy != "full_refresh":
            raise
        stats.rows_deleted += conn.execute(f"DELETE FROM main.{qi(plan.target)}").rowcount
        rekey(conn, plan.target, key)
        ensure_unique_key(conn, plan.target, key)
    else:
        conn.execute("RELEASE rocky_rekey")


@dataclass
class _Copier:
    """The SQL of one table's copy; every statement runs inside the run's transaction."""

    conn: sqlite3.Connection
    plan: TablePlan
    columns: list[str]
    key: list[str]
    stats: TableStats

    @property
    def src(self) -> str:
        return f"{SRC}.{qi(self.plan.source)}"

    @property
    def dst(self) -> str:
        return f"main.{qi(self.plan.target)}"

    def full(self) -> None:
        """Make the target equal to the source, writing only the rows that differ."""
        names = ", ".join(qi(c) for c in self.columns)
        empty = count_rows(self.conn, self.plan.target) == 0
        if self.key:
            self.stats.rows_read, new_keys, _ = self._batch("1", [])
            self._check_duplicates("1", [])
        else:
            self.stats.rows_read = count_rows(self.conn, self.plan.source, SRC)
        if empty:
            cur = self.conn.execute(
                f"INSERT INTO {self.dst} ({names}) SELECT {names} FROM {self.src}"
            )
            self.stats.rows_inserted = cur.rowcount
        elif self.key:
            self._apply("1", [], new_keys)
            match = self._key_match()
            keys = ", ".join(qi(k) for k in self.key)
            m_keys = ", ".join(f"m.{qi(k)}" for k in self.key)
            cur = self.conn.execute(
                f"DELETE FROM {self.dst} WHERE ({keys}) IN (SELECT {m_keys} FROM {self.dst} AS m "
                f"WHERE NOT EXISTS (SELECT 1 FROM {self.src} AS s WHERE {match}))"
            )
            self.stats.rows_deleted = cur.rowcount
        elif not same_rows(self.conn, self.src, self.dst, self.columns):
            self.stats.rows_deleted = self.conn.execute(f"DELETE FROM {self.dst}").rowcount
            cur = self.conn.execute(
                f"INSERT INTO {self.dst} ({names}) SELECT {names} FROM {self.src}"
            )
            self.stats.rows_inserted = cur.rowcount

    def incremental(self, db: Database, source: str) -> Any:
        """Upsert rows at or past the watermark; store the new watermark in the same transaction."""
        cursor = self.plan.cursor
        assert cursor is not None
        row = self.conn.execute(
            f"SELECT cursor_column, value_json FROM {WATERMARKS} WHERE target_table = ?",
            (self.plan.target,),
        ).fetchone()
        mark = json.loads(row[1]) if row is not None and row[0] == cursor else None
        where, params = ("1", []) if mark is None else (f"s.{qi(cursor)} >= ?", [mark])
        self.stats.rows_read, new_keys, batch_max = self._batch(where, params, cursor)
        if not self.stats.rows_read:
            return mark
        self._check_duplicates(where, params)
        self._apply(where, params, new_keys)
        if batch_max is None or batch_max == mark:
            return mark
        if not isinstance(batch_max, int | float | str):
            raise PipelineError(f"cursor column {cursor!r} holds a BLOB; use a number or text")
        db[WATERMARKS].upsert(  # type: ignore[union-attr]
            {
                "target_table": self.plan.target,
                "source": source,
                "source_table": self.plan.source,
                "cursor_column": cursor,
                "value_json": json.dumps(batch_max),
                "updated_at": utcnow().isoformat(),
            },
            pk="target_table",
        )
        return batch_max

    def _key_match(self) -> str:
        return " AND ".join(f"m.{qi(k)} = s.{qi(k)}" for k in self.key)

    def _batch(
        self, where: str, params: list[Any], cursor: str | None = None
    ) -> tuple[int, int, Any]:
        """Count the rows to copy and the keys the target lacks; refuse NULL keys.

        Returns (rows, new keys, max cursor); a NULL key would never match ON CONFLICT and
        so would silently duplicate instead of upserting.
        """
        nulls = " OR ".join(f"s.{qi(k)} IS NULL" for k in self.key)
        top = f"max(s.{qi(cursor)})" if cursor else "NULL"
        rows, new_keys, null_keys, top_value = self.conn.execute(
            f"SELECT count(*), coalesce(sum(NOT EXISTS (SELECT 1 FROM {self.dst} AS m "
            f"WHERE {self._key_match()})), 0), coalesce(sum({nulls}), 0), {top} "
            f"FROM {self.src} AS s WHERE {where}",
            params,
        ).fetchone()
        if null_keys:
            raise PipelineError(f"{null_keys} source row(s) have NULL in key columns {self.key}")
        return rows, new_keys, top_value

    def _check_duplicates(self, where: str, params: list[Any]) -> None:
        """Two source rows with one key make the upsert's outcome order-dependent: refuse."""
        if key_is_unique(self.conn, self.plan.source, self.key, SRC):
            return
        keys = ", ".join(f"s.{qi(k)}" for k in self.key)
        dup = self.conn.execute(
            f"SELECT {keys} FROM {self.src} AS s WHERE {where} GROUP BY {keys} "
            "HAVING count(*) > 1 LIMIT 1",
            params,
        ).fetchone()
        if dup is not None:
            raise PipelineError(
                f"source rows share key {dict(zip(self.key, dup, strict=True))} on key columns "
                f"{self.key}; declare columns that identify one row"
            )

    def _apply(self, where: str, params: list[Any], new_keys: int) -> None:
        """Insert new keys and update only rows whose values differ; count both exactly."""
        names = ", ".join(qi(c) for c in self.columns)
        selected = ", ".join(f"s.{qi(c)}" for c in self.columns)
        key_lower = {k.lower() for k in self.key}
        others = [c for c in self.columns if c.lower() not in key_lower]
        if others:
            sets = ", ".join(f"{qi(c)} = excluded.{qi(c)}" for c in others)
            differs = " OR ".join(f"m.{qi(c)} IS NOT excluded.{qi(c)}" for c in others)
            action = f"DO UPDATE SET {sets} WHERE {differs}"
        else:
            action = "DO NOTHING"
        conflict = ", ".join(qi(k) for k in self.key)
        cur = self.conn.execute(
            f"INSERT INTO {self.dst} AS m ({names}) SELECT {selected} FROM {self.src} AS s "
            f"WHERE {where} ON CONFLICT ({conflict}) {action}",
            params,
        )
        self.stats.rows_inserted += new_keys
        self.stats.rows_updated += cur.rowcount - new_keys
