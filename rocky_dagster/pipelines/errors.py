"""Errors a pipeline raises; all derive from PipelineError so callers can catch one type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import PipelineResult


class PipelineError(Exception):
    """A pipeline run failed; the warehouse was left as it was before the run."""


class PipelineConfigError(PipelineError, ValueError):
    """A config could not be loaded (bad YAML, not a mapping, unknown pipeline type)."""


class SchemaConflictError(PipelineError):
    """Source and warehouse disagree on a column's type; copying would change stored values."""


class ModelGraphError(PipelineError):
    """SQL models form a cycle or reference a table that neither a model nor the warehouse has."""


class LoadError(PipelineError):
    """A file could not be loaded; `path` and `line` point at the offending input."""

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        where = path if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class QualityChecksFailed(PipelineError):
    """At least one error-severity check failed; `result` lists every check that ran."""

    def __init__(self, result: PipelineResult) -> None:
        failed = [c for c in result.checks if not c.passed and c.severity == "error"]
        names = ", ".join(f"{c.table or '-'}.{c.name}" for c in failed)
        super().__init__(f"{len(failed)} error-severity quality check(s) failed: {names}")
        self.result = result
