"""Errors a pipeline raises; all derive from PipelineError so callers can catch one type
(and PipelineError from `rocky_dagster.errors.RockyDagsterError`, the root of every error).

An error carries where it happened (`pipeline`, `table`, `path`, `line`) as attributes and in
its message, so an operator reading a failed step sees what to fix without a traceback.
`PipelineError` and the claim errors are defined in `rocky_dagster.effects.errors` (the effects,
which the pipelines build on, raise them too) and exported here as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..effects.errors import ClaimRefusedError, FenceLostError, PipelineError

if TYPE_CHECKING:
    from .results import PipelineResult

__all__ = [
    "ClaimRefusedError",
    "FenceLostError",
    "KeyChangeError",
    "LoadError",
    "ModelGraphError",
    "PipelineConfigError",
    "PipelineError",
    "QualityChecksFailed",
    "SchemaConflictError",
    "ViewValidationError",
    "WarehouseError",
]


class PipelineConfigError(PipelineError, ValueError):
    """A config could not be loaded (bad YAML, not a mapping, unknown pipeline type)."""


class SchemaConflictError(PipelineError):
    """Source and warehouse disagree on a column's type; copying would change stored values."""


class ModelGraphError(PipelineError):
    """SQL models form a cycle or reference a table that neither a model nor the warehouse has."""


class KeyChangeError(PipelineError):
    """`key_columns` changed and the rows already in the warehouse are not unique on the new key."""


class ViewValidationError(PipelineError):
    """A view no longer compiles after the run (e.g. it selects a column a model dropped)."""


class WarehouseError(PipelineError):
    """SQLite refused a statement of the run (constraint, lock, disk, malformed SQL)."""


class LoadError(PipelineError):
    """A file could not be loaded; `path` and `line` point at the offending input."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        pipeline: str | None = None,
        table: str | None = None,
    ) -> None:
        super().__init__(message, pipeline=pipeline, table=table, path=path, line=line)


class QualityChecksFailed(PipelineError):
    """At least one error-severity check failed; `result` lists every check that ran."""

    def __init__(self, result: PipelineResult) -> None:
        failed = [c for c in result.checks if not c.passed and c.severity == "error"]
        names = ", ".join(f"{c.table or '-'}.{c.name}" for c in failed)
        tables = sorted({c.table for c in failed if c.table})
        super().__init__(
            f"{len(failed)} error-severity quality check(s) failed: {names}",
            pipeline="quality",
            table=tables[0] if len(tables) == 1 else None,
        )
        self.result = result
