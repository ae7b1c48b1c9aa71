"""One contender of the ledger race test (run as a script, one process each).

    python ledger_race_worker.py '{"url": ..., "worker": 3, "claims": 300, "keys": 100,
                                   "ready": DIR, "start": FILE, "out": FILE}'

Opens the ledger, says it is ready, waits for the start file, then claims random keys; every
claim it wins it holds briefly (heartbeating once) and finalizes, mostly as a failure so that
keys live through several generations.
Writes one JSON record per claim to `out`; an exception is recorded, never raised, so the
parent sees every error (a "database is locked" above all).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from rocky_dagster.ledger import Outcome, open_ledger


def main(spec: dict[str, Any]) -> int:
    worker = spec["worker"]
    records: list[dict[str, Any]] = []
    ledger = open_ledger(spec["url"])
    try:
        ledger.stats()  # the schema exists and the store answers before we say we are ready
        Path(spec["ready"], str(worker)).touch()
        start = Path(spec["start"])
        while not start.exists():
            time.sleep(0.002)
        rng = random.Random(worker)
        for i in range(spec["claims"]):
            key = f"race/{rng.randrange(spec['keys']):03d}"
            run_id = f"w{worker:02d}-{i:04d}"
            record: dict[str, Any] = {"key": key, "run_id": run_id}
            try:
                claim = ledger.claim(key, run_id)
                record.update(
                    decision=claim.decision.value,
                    fence=claim.fence,
                    prior=claim.prior_run_id,
                    held_by=claim.held_by_run_id,
                )
                if claim.should_run:
                    assert claim.fence is not None
                    time.sleep(0.002)  # the work: others contend for the key meanwhile
                    record["heartbeat"] = ledger.heartbeat(key, claim.fence)
                    outcome = Outcome.SUCCEEDED if rng.random() < 0.25 else Outcome.FAILED
                    result = {"by": run_id} if outcome == Outcome.SUCCEEDED else None
                    done = ledger.finalize(key, claim.fence, outcome, result=result)
                    record.update(outcome=outcome.value, applied=done.applied)
            except Exception as exc:  # reported to the parent, which fails the test
                record["error"] = f"{type(exc).__name__}: {exc}"
            records.append(record)
    finally:
        ledger.close()
        Path(spec["out"]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
