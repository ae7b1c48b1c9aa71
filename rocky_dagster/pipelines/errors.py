"""Errors a pipeline raises; all derive from PipelineError so callers can catch one type
(and PipelineError from `rocky_dagster.errors.RockyDagsterError`, the root of every error).

An error carries where it happened (`pipeline`, `table`, `path`, `line`) as attributes and in
its message, so an operator reading a failed step sees what to fix without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import RockyDagsterError

if TYPE_CHECKING:
    from .results import PipelineResult


class PipelineError(RockyDagsterError):
    """A pipeline run failed; the warehouse was left as it was before the run (a
    `RockyDagsterError`).

    `pipeline` is the pipeline type, `table` the warehouse table (or view, or model) and
    `path` / `line` the input file and line, each None where there is none.
    """

    def __init__(
        self,
        message: str,
        *,
        pipeline: str | None = None,
        table: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.pipeline = pipeline
        self.table = table
        self.path = path
        self.line = line

    def locate(
        self,
        *,
        pipeline: str | None = None,
        table: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> PipelineError:
        """Fill in the place fields that are still unknown (inner frames know more)."""
        self.pipeline = self.pipeline or pipeline
        self.table = self.table or table
        self.path = self.path or path
        self.line = self.line if self.line is not None else line
        return self

    def __str__(self) -> str:
        where = []
        if self.pipeline:
            where.append(f"{self.pipeline} pipeline")
        if self.table and f"{self.table!r}" not in self.message:
            where.append(f"table {self.table!r}")
        if self.path and self.path not in self.message:
            where.append(self.path if self.line is None else f"{self.path}, line {self.line}")
        elif self.line is not None and f"line {self.line}" not in self.message:
            where.append(f"line {self.line}")
        return ": ".join([*where, self.message])

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only fields survive pickling (Dagster and multiprocessing pickle errors)
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type[PipelineError], message: str, state: dict[str, Any]) -> PipelineError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class PipelineConfigError(PipelineError, ValueError):
    """A config could not be loaded (bad YAML, not a mapping, unknown pipeline type)."""


class SchemaConflictError(PipelineError):
    """Source and warehouse disagree on a column's type; copying would change stored values."""


class ModelGraphError(PipelineError):
    """SQL models form a cycle or reference a table that neither a model nor the warehouse has."""


class FenceLostError(PipelineError):
    """A later holder of this claim's key generation already committed the work, or a newer
    generation did: this holder lost its claim, and its run wrote nothing."""


class ClaimRefusedError(PipelineError):
    """The claim passed to `run(claim=...)` does not allow running (should_run is false, or it
    lacks an integer fence / generation)."""


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
