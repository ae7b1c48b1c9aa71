"""What a run reports: JSON-able, because it becomes the ledger's result summary and Dagster metadata."""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, computed_field

Severity = Literal["error", "warn"]
_SUMMARY_TABLES = 50
_SUMMARY_NAMES = 20


def utcnow() -> datetime:
    return datetime.now(UTC)


def _deprecated_rows_written(owner: str) -> None:
    warnings.warn(
        f"{owner}.rows_written is deprecated: it always counted inserted + updated + deleted "
        "rows (a rebuild counts each row twice), not rows written; use rows_changed",
        DeprecationWarning,
        stacklevel=3,
    )


class TableStats(BaseModel):
    """Row counts for one warehouse table; rows_changed > 0 is what makes a re-done run visible."""

    rows_read: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = Field(0, description="Deleted, or for snapshots: invalidated versions.")
    duration_seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rows_changed(self) -> int:
        """Inserted + updated + deleted: a table rebuilt in place counts each row twice."""
        return self.rows_inserted + self.rows_updated + self.rows_deleted

    @property
    def rows_written(self) -> int:
        """Deprecated alias of `rows_changed` (the name promised something it never counted)."""
        _deprecated_rows_written("TableStats")
        return self.rows_changed


class CheckResult(BaseModel):
    """Outcome of one quality check; maps one-to-one onto a Dagster AssetCheckResult."""

    name: str
    table: str | None
    kind: str
    column: str | None = None
    severity: Severity = "error"
    passed: bool
    failing_rows: int = 0
    sample_rows: list[dict[str, Any]] = Field(default_factory=list, max_length=5)
    description: str = ""
    error: str | None = Field(None, description="Set when the check's SQL itself failed.")
    details: dict[str, Any] = Field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Flat JSON-able metadata for an AssetCheckResult (no Dagster types here)."""
        meta: dict[str, Any] = {
            "kind": self.kind,
            "table": self.table,
            "column": self.column,
            "severity": self.severity,
            "failing_rows": self.failing_rows,
            "description": self.description,
            "sample_rows": self.sample_rows,
            **self.details,
        }
        if self.error:
            meta["error"] = self.error
        return {k: v for k, v in meta.items() if v is not None}


class FileRecord(BaseModel):
    """One input file of a load run and what happened to it."""

    path: str
    size: int
    sha256: str
    rows: int = 0
    status: Literal["loaded", "skipped"]
    reason: str | None = None


class PipelineResult(BaseModel):
    """Everything one run did. `tables_touched` lists the warehouse tables the run processed
    (targets; for quality, the tables checked), whether or not rows changed."""

    pipeline_type: str
    tables: dict[str, TableStats] = Field(default_factory=dict)
    tables_touched: list[str] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)
    files: list[FileRecord] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    duration_seconds: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)
    already_applied: bool = Field(
        False,
        description="True when an earlier holder of the claim's key generation had already "
        "committed this work: the run applied nothing and this is the result it recorded.",
    )
    _clock: float = PrivateAttr(default_factory=time.perf_counter)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rows_read(self) -> int:
        return sum(t.rows_read for t in self.tables.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rows_changed(self) -> int:
        """Rows inserted + updated + deleted over every table (see TableStats.rows_changed)."""
        return sum(t.rows_changed for t in self.tables.values())

    @property
    def rows_written(self) -> int:
        """Deprecated alias of `rows_changed`."""
        _deprecated_rows_written("PipelineResult")
        return self.rows_changed

    def table(self, name: str) -> TableStats:
        """Stats of a table, registering it as touched on first use."""
        if name not in self.tables:
            self.tables[name] = TableStats()
            self.tables_touched.append(name)
        return self.tables[name]

    def finish(self) -> PipelineResult:
        self.finished_at = utcnow()
        self.duration_seconds = round(time.perf_counter() - self._clock, 6)
        return self

    def summary(self) -> dict[str, Any]:
        """A few-KB dict of totals and per-table counts, for the ledger and Dagster metadata."""
        names = sorted(self.tables)
        failed = [c for c in self.checks if not c.passed]
        return {
            "pipeline_type": self.pipeline_type,
            "rows_read": self.rows_read,
            "rows_changed": self.rows_changed,
            "tables_touched": len(self.tables_touched),
            "tables": {
                name: {
                    "read": s.rows_read,
                    "inserted": s.rows_inserted,
                    "updated": s.rows_updated,
                    "deleted": s.rows_deleted,
                    "changed": s.rows_changed,
                }
                for name in names[:_SUMMARY_TABLES]
                for s in [self.tables[name]]
            },
            "tables_truncated": max(0, len(names) - _SUMMARY_TABLES),
            "checks": {
                "total": len(self.checks),
                "passed": len(self.checks) - len(failed),
                "failed_error": sum(c.severity == "error" for c in failed),
                "failed_warn": sum(c.severity == "warn" for c in failed),
                "failed_names": [c.name for c in failed[:_SUMMARY_NAMES]],
            },
            "files": {
                "loaded": sum(f.status == "loaded" for f in self.files),
                "skipped": sum(f.status == "skipped" for f in self.files),
            },
            "duration_seconds": self.duration_seconds,
        }
