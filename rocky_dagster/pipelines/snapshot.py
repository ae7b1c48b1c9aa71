"""Snapshot: SCD type 2 history of a warehouse table.

Each key has at most one current version (`is_current = 1`, `valid_to` NULL; a partial
unique index enforces it). A change closes the current version and opens a new one; a run
that finds no change writes nothing.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from ..effects import EffectClaim
from .base import PipelineConfig, as_list, check_identifier, failure_context, write_transaction
from .errors import PipelineError
from .results import PipelineResult, TableStats, utcnow
from .sql import (
    INTERNAL_PREFIX,
    Column,
    align_columns,
    count_rows,
    create_like,
    key_is_unique,
    object_type,
    qi,
    table_columns,
)

SCD_COLUMNS = ("valid_from", "valid_to", "is_current")
CHANGED = "_rocky_snapshot_changed"


class SnapshotStrategy(StrEnum):
    """How a changed row is recognised."""

    TIMESTAMP = "timestamp"
    """The source's `updated_at` moved forward; the new version is valid from that value."""
    CHECK = "check"
    """A check column differs; the new version is valid from the run's time."""


class SnapshotPipeline(PipelineConfig):
    """Record the history of `source_table` into `target_table`, keyed by `unique_key`."""

    pipeline_type: ClassVar[str] = "snapshot"

    source_table: str = Field(description="Warehouse table (or view) whose rows are snapshotted.")
    target_table: str = Field(description="Snapshot table; created on the first run.")
    unique_key: list[str] = Field(min_length=1, description="Column(s) identifying a source row.")
    strategy: SnapshotStrategy | None = Field(
        None, description="'timestamp' or 'check'; inferred from updated_at / check_columns."
    )
    updated_at: str | None = Field(None, description="Timestamp strategy: the change column.")
    check_columns: list[str] | Literal["all"] | None = Field(
        None, description="Check strategy: columns compared, or 'all' non-key columns."
    )
    invalidate_hard_deletes: bool = Field(
        False, description="Close the current version of keys that vanished from the source."
    )

    _lists = field_validator("unique_key", mode="before")(as_list)

    @field_validator("source_table", "target_table")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_identifier(value, "table name")

    @model_validator(mode="before")
    @classmethod
    def _infer_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("strategy") is None:
            if data.get("updated_at") and not data.get("check_columns"):
                data = {**data, "strategy": "timestamp"}
            elif data.get("check_columns") and not data.get("updated_at"):
                data = {**data, "strategy": "check"}
        return data

    @model_validator(mode="after")
    def _strategy_fields(self) -> Self:
        if self.strategy is None:
            raise ValueError(
                "strategy: give updated_at (timestamp strategy) or check_columns (check strategy)"
            )
        if self.strategy == SnapshotStrategy.TIMESTAMP and not self.updated_at:
            raise ValueError("updated_at: required when strategy is 'timestamp'")
        if self.strategy == SnapshotStrategy.CHECK and not self.check_columns:
            raise ValueError("check_columns: required when strategy is 'check' (a list, or 'all')")
        if self.source_table.lower() == self.target_table.lower():
            raise ValueError("target_table: must differ from source_table")
        return self

    def run(
        self, *, now: datetime | None = None, claim: EffectClaim | None = None
    ) -> PipelineResult:
        """Apply one snapshot step in one transaction. `now` stamps check-strategy versions
        and invalidations (default: current UTC time)."""
        effect = self._effect(claim)
        moment = (now or utcnow()).astimezone(UTC).isoformat()
        result = PipelineResult(pipeline_type=self.pipeline_type)
        with self._session() as (conn, _db), write_transaction(conn):
            recorded = effect.begin(conn)
            if recorded is not None:
                return recorded
            started = time.perf_counter()
            stats = result.table(self.target_table)
            with failure_context(
                f"snapshot of {self.source_table!r} into {self.target_table!r}",
                table=self.target_table,
            ):
                added = _Snapshot(self, conn, stats, moment).apply()
            stats.duration_seconds = round(time.perf_counter() - started, 6)
            result.details = {"added_columns": added, "snapshot_time": moment}
            effect.commit(conn, result.finish())
        return result


class _Snapshot:
    """One snapshot step; all SQL runs inside the caller's transaction."""

    def __init__(
        self, cfg: SnapshotPipeline, conn: sqlite3.Connection, stats: TableStats, moment: str
    ) -> None:
        self.cfg, self.conn, self.stats, self.moment = cfg, conn, stats, moment
        self.src = f"main.{qi(cfg.source_table)}"
        self.dst = f"main.{qi(cfg.target_table)}"
        self.key = cfg.unique_key

    def apply(self) -> list[str]:
        columns = self._source_columns()
        added = self._prepare_target(columns)
        self.stats.rows_read = count_rows(self.conn, self.cfg.source_table)
        self._check_source()
        names = [c.name for c in columns]
        match = " AND ".join(f"t.{qi(k)} = s.{qi(k)}" for k in self.key)
        valid_from = (
            f"s.{qi(self.cfg.updated_at)}"
            if self.cfg.strategy == SnapshotStrategy.TIMESTAMP and self.cfg.updated_at
            else "?"
        )
        params = [] if valid_from != "?" else [self.moment]
        key_cols = ", ".join(f"s.{qi(k)}" for k in self.key)
        self.conn.execute(f"DROP TABLE IF EXISTS temp.{CHANGED}")
        self.conn.execute(
            f"CREATE TEMP TABLE {CHANGED} AS SELECT {key_cols}, {valid_from} AS rocky_from "
            f"FROM {self.src} AS s JOIN {self.dst} AS t ON {match} AND t.is_current = 1 "
            f"WHERE {self._changed(names)}",
            params,
        )
        c_match = " AND ".join(f"c.{qi(k)} = t.{qi(k)}" for k in self.key)
        self.stats.rows_updated = self.conn.execute(
            f"UPDATE {self.dst} AS t SET is_current = 0, valid_to = (SELECT c.rocky_from FROM "
            f"temp.{CHANGED} AS c WHERE {c_match}) WHERE is_current = 1 AND EXISTS "
            f"(SELECT 1 FROM temp.{CHANGED} AS c WHERE {c_match})"
        ).rowcount
        if self.cfg.invalidate_hard_deletes:
            self.stats.rows_deleted = self.conn.execute(
                f"UPDATE {self.dst} AS t SET is_current = 0, valid_to = ? WHERE is_current = 1 "
                f"AND NOT EXISTS (SELECT 1 FROM {self.src} AS s WHERE {match})",
                (self.moment,),
            ).rowcount
        cols = ", ".join(qi(n) for n in names)
        selected = ", ".join(f"s.{qi(n)}" for n in names)
        self.stats.rows_inserted = self.conn.execute(
            f"INSERT INTO {self.dst} ({cols}, valid_from, valid_to, is_current) "
            f"SELECT {selected}, {valid_from}, NULL, 1 FROM {self.src} AS s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {self.dst} AS t WHERE {match} AND t.is_current = 1)",
            params,
        ).rowcount
        self.conn.execute(f"DROP TABLE temp.{CHANGED}")
        return added

    def _source_columns(self) -> list[Column]:
        columns = table_columns(self.conn, self.cfg.source_table)
        if not columns:
            raise PipelineError(
                f"source_table: {self.cfg.source_table!r} is not in the warehouse",
                table=self.cfg.source_table,
            )
        names = {c.name.lower() for c in columns}
        clash = [c for c in SCD_COLUMNS if c in names]
        if clash:
            raise PipelineError(f"source_table: has columns {clash} that the snapshot reserves")
        wanted = [*self.key, *([self.cfg.updated_at] if self.cfg.updated_at else [])]
        if isinstance(self.cfg.check_columns, list):
            wanted += self.cfg.check_columns
        missing = [w for w in wanted if w.lower() not in names]
        if missing:
            raise PipelineError(
                f"columns {missing} are not in source table {self.cfg.source_table!r} "
                f"(it has {[c.name for c in columns]})"
            )
        return columns

    def _prepare_target(self, columns: list[Column]) -> list[str]:
        kind = object_type(self.conn, self.cfg.target_table)
        scd = [
            Column("valid_from", "TEXT"),
            Column("valid_to", "TEXT"),
            Column("is_current", "INTEGER"),
        ]
        if kind is None:
            create_like(self.conn, self.cfg.target_table, [*columns, *scd], [])
            added: list[str] = []
        elif kind == "view":
            raise PipelineError(f"target_table: {self.cfg.target_table!r} is a view")
        else:
            added = align_columns(
                self.conn, self.cfg.target_table, columns, context="snapshot source"
            )
            present = {c.name.lower() for c in table_columns(self.conn, self.cfg.target_table)}
            if not all(c in present for c in SCD_COLUMNS):
                raise PipelineError(f"target_table: {self.cfg.target_table!r} is not a snapshot")
        keys = ", ".join(qi(k) for k in self.key)
        index = qi(f"{INTERNAL_PREFIX}current_{self.cfg.target_table}")
        self.conn.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS main.{index} ON {qi(self.cfg.target_table)} "
            f"({keys}) WHERE is_current = 1"
        )
        return added

    def _check_source(self) -> None:
        """NULL or duplicate keys (and NULL timestamps) make versions ambiguous: refuse them."""
        nulls = [*self.key]
        if self.cfg.strategy == SnapshotStrategy.TIMESTAMP and self.cfg.updated_at:
            nulls.append(self.cfg.updated_at)
        condition = " OR ".join(f"{qi(n)} IS NULL" for n in nulls)
        bad = self.conn.execute(f"SELECT count(*) FROM {self.src} WHERE {condition}").fetchone()[0]
        if bad:
            raise PipelineError(f"{bad} source row(s) have NULL in {nulls}")
        if key_is_unique(self.conn, self.cfg.source_table, self.key, "main"):
            return
        keys = ", ".join(qi(k) for k in self.key)
        dup = self.conn.execute(
            f"SELECT {keys} FROM {self.src} GROUP BY {keys} HAVING count(*) > 1 LIMIT 1"
        ).fetchone()
        if dup is not None:
            raise PipelineError(
                f"unique_key: source rows share key {dict(zip(self.key, dup, strict=True))}"
            )

    def _changed(self, names: list[str]) -> str:
        if self.cfg.strategy == SnapshotStrategy.TIMESTAMP and self.cfg.updated_at:
            col = qi(self.cfg.updated_at)
            return f"s.{col} > t.{col}"
        keys = {k.lower() for k in self.key}
        checked = (
            [n for n in names if n.lower() not in keys]
            if self.cfg.check_columns == "all"
            else list(self.cfg.check_columns or [])
        )
        if not checked:
            return "0"
        return " OR ".join(f"s.{qi(c)} IS NOT t.{qi(c)}" for c in checked)
