"""The errors an effect raises: `PipelineError` and the two claim errors beneath it.

They live here, beside the lowest code that raises them, because the pipelines build on the
effects and not the other way round. The pipelines' own errors derive from `PipelineError`;
the pipelines package and `rocky_dagster.errors` export these three under the same names.
"""

from __future__ import annotations

from typing import Any

from ..errors import RockyDagsterError


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


class FenceLostError(PipelineError):
    """A later holder of this claim's key generation already committed the work, or a newer
    generation did: this holder lost its claim, and its run wrote nothing."""


class ClaimRefusedError(PipelineError):
    """The claim passed to `run(claim=...)` does not allow running (should_run is false, or it
    lacks an integer fence / generation)."""
