"""Run one pipeline with a claim in its own process, for the zombie/adopter tests.

    python effect_worker.py '{"config": {...}, "claim": {...}}'

Prints one JSON line: {"ok": true, "already_applied": ..., "summary": ...} or
{"ok": false, "error": "<exception class name>", "message": "..."}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rocky_dagster.pipelines import PipelineError, pipeline_from_dict


@dataclass(frozen=True)
class Holder:
    """A claim as the ledger hands it out (the EffectClaim protocol)."""

    key: str
    generation: int | None
    fence: int | None
    run_id: str
    should_run: bool = True


def main() -> int:
    spec = json.loads(sys.argv[1])
    pipeline = pipeline_from_dict(spec["config"])
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
