"""Many processes claim the same keys at once: one winner per key generation, no lock errors.

Real processes (one interpreter each, started together on a start file) claim random keys
among few, and finalize what they win, mostly as failures so that each key goes through
several generations under dedup_on=success. The backend is the `ledger_url` parameter;
`ROCKY_RACE_PROCESSES` overrides the process count (default 8, 16 on PostgreSQL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from ledger_helpers import replay

from rocky_dagster.ledger import Ledger, State, open_ledger

WORKER = Path(__file__).with_name("ledger_race_worker.py")
CLAIMS_PER_PROCESS = 300
KEYS = 100
WAIT_SECONDS = 300


def run_race(url: str, workdir: Path, processes: int, claims: int, keys: int) -> list[dict]:
    """Start `processes` workers together; return every claim record they made."""
    ready, start = workdir / "ready", workdir / "start"
    ready.mkdir()
    procs = []
    for worker in range(processes):
        spec = {
            "url": url,
            "worker": worker,
            "claims": claims,
            "keys": keys,
            "ready": str(ready),
            "start": str(start),
            "out": str(workdir / f"out-{worker}.jsonl"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(list(ready.iterdir())) < processes:
            crashed = [p for p in procs if p.poll() is not None]
            assert not crashed, f"a worker died before the start: {crashed[0].communicate()[0]}"
            assert time.monotonic() < deadline, "workers never got ready"
            time.sleep(0.01)
        start.touch()
        for proc in procs:
            output, _ = proc.communicate(timeout=WAIT_SECONDS)
            assert proc.returncode == 0, output
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = []
    for worker in range(processes):
        lines = (workdir / f"out-{worker}.jsonl").read_text().splitlines()
        assert len(lines) == claims
        records.extend(json.loads(line) for line in lines)
    return records


def check_race(ledger: Ledger, records: list[dict], keys: int) -> None:
    errors = [r["error"] for r in records if "error" in r]
    assert not [e for e in errors if "locked" in e.lower()], errors[:5]
    assert not errors, errors[:5]

    decisions = Counter(r["decision"] for r in records)
    assert set(decisions) <= {"proceed", "skipped_in_flight", "skipped_completed"}, decisions
    assert decisions["skipped_in_flight"] > 0, "no contention: the race never happened"
    winners = [r for r in records if r["decision"] == "proceed"]
    assert all(r["applied"] and r["heartbeat"] for r in winners), [
        r for r in winners if not (r["applied"] and r["heartbeat"])
    ][:5]
    fences = [r["fence"] for r in winners]
    assert len(set(fences)) == len(fences), "a fence was handed out twice"

    by_key: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    total_generations = 0
    for key, mine in by_key.items():
        events = ledger.history(key)
        state, run_id, fence, generations = replay(events)
        total_generations += generations
        # the log agrees with what the workers were told, claim by claim
        claimed = sorted((e.run_id, e.fence) for e in events if e.kind.value == "claimed")
        won = sorted((r["run_id"], r["fence"]) for r in mine if r["decision"] == "proceed")
        assert claimed == won, key
        for kind in ("skipped_in_flight", "skipped_completed"):
            logged = sorted(e.run_id for e in events if e.kind.value == kind)
            assert logged == sorted(r["run_id"] for r in mine if r["decision"] == kind), key
        finalized = sorted(
            (e.run_id, e.kind.value) for e in events if e.kind.value in ("succeeded", "failed")
        )
        assert finalized == sorted((r["run_id"], r["outcome"]) for r in mine if "outcome" in r)
        claimed_fences = [e.fence for e in events if e.kind.value == "claimed"]
        assert claimed_fences == sorted(claimed_fences), "fences went backwards on one key"
        entry = ledger.get(key)
        assert (entry.state.value, entry.run_id, entry.fence) == (state, run_id, fence)
        assert entry.state != State.IN_FLIGHT  # every winner finalized
    assert total_generations == len(winners)
    assert total_generations > len(by_key), "keys should go through several generations"
    stats = ledger.stats()
    assert stats.events == len(records) + len(winners)  # one per claim, one per finalize
    assert stats.entries == len(by_key) <= keys


def test_concurrent_claims_have_one_winner_per_key_generation(ledger_url: str, tmp_path: Path):
    default = 16 if ledger_url.startswith("postgres") else 8
    processes = int(os.environ.get("ROCKY_RACE_PROCESSES", default))

    records = run_race(ledger_url, tmp_path, processes, CLAIMS_PER_PROCESS, KEYS)

    with open_ledger(ledger_url) as ledger:
        check_race(ledger, records, KEYS)
