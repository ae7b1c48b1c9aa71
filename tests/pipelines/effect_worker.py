"""Run one pipeline with a claim in its own process, for the zombie/adopter tests.

    python effect_worker.py '{"config": {...}, "claim": {...}, "barrier": DIR}'

Prints one JSON line: {"ok": true, "already_applied": ..., "summary": ...} or
{"ok": false, "error": "<exception class name>", "message": "..."}.

With `barrier` (a directory), a load pipeline announces where it is, so a test can order two
workers for certain: it touches ``<run_id>.entering`` as it enters its write transaction, and
just before committing (its rows written, the write lock held) it touches
``<run_id>.holding`` and waits there until the test creates ``<run_id>.release``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocky_dagster.pipelines import PipelineError, load, pipeline_from_dict
from rocky_dagster.pipelines.base import PipelineEffect

BARRIER_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Holder:
    """A claim as the ledger hands it out (the EffectClaim protocol)."""

    key: str
    generation: int | None
    fence: int | None
    run_id: str
    should_run: bool = True


def _install_barrier(directory: Path, run_id: str) -> None:
    """Announce the write transaction and hold it open before commit (test seams only)."""
    enter, commit = load.write_transaction, PipelineEffect.commit

    @contextmanager
    def announced(conn: Any) -> Iterator[None]:
        (directory / f"{run_id}.entering").touch()
        with enter(conn):
            yield

    def held(self: PipelineEffect, conn: Any, result: Any) -> None:
        (directory / f"{run_id}.holding").touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_SECONDS
        while not (directory / f"{run_id}.release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never released the barrier")
            time.sleep(0.01)
        commit(self, conn, result)

    load.write_transaction = announced  # type: ignore[assignment]
    PipelineEffect.commit = held  # type: ignore[method-assign]


def main() -> int:
    spec = json.loads(sys.argv[1])
    pipeline = pipeline_from_dict(spec["config"])
    if spec.get("barrier"):
        _install_barrier(Path(spec["barrier"]), spec["claim"]["run_id"])
    try:
        result = pipeline.run(claim=Holder(**spec["claim"]))
    except PipelineError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        return 0
    out = {"ok": True, "already_applied": result.already_applied, "summary": result.summary()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
