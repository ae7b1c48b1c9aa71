"""A run killed mid-write (SIGKILL) leaves an intact ledger and a claim another run adopts.

The killed process holds one claim and is in the middle of a claim/finalize loop. Afterwards:
the SQLite file passes `PRAGMA integrity_check`, every write the process reported as committed
is there, nothing is half-written, and a new run adopts the dead claim once its lease is over
(the adopting ledger's injected clock is a few seconds ahead, instead of sleeping).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rocky_dagster.ledger import Decision, Outcome, State, open_ledger

WORKER = Path(__file__).with_name("ledger_crash_worker.py")
LOOPS_BEFORE_KILL = 40


def kill_mid_loop(url: str) -> tuple[int, set[int], set[int]]:
    """Run the worker, SIGKILL it inside its loop; (held fence, loops claimed, loops done)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[list[str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())
            if lines[-1][0] == "done" and int(lines[-1][1]) >= LOOPS_BEFORE_KILL:
                proc.send_signal(signal.SIGKILL)
                break
        lines.extend(line.split() for line in proc.stdout)  # what it printed before dying
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    held = int(lines[0][1])
    assert lines[0][0] == "held"
    claimed = {int(words[1]) for words in lines if words[0] == "claimed"}
    done = {int(words[1]) for words in lines if words[0] == "done"}
    return held, claimed, done


def test_a_killed_run_leaves_an_intact_ledger_and_an_adoptable_claim(ledger_url: str):
    held_fence, claimed, done = kill_mid_loop(ledger_url)

    if ledger_url.startswith("sqlite:///"):
        conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()

    with open_ledger(ledger_url) as ledger:
        held = ledger.get("crash/held")
        assert (held.state, held.run_id, held.fence) == (State.IN_FLIGHT, "crasher", held_fence)
        loops = {
            int(e.key.rsplit("/", 1)[1]): e for e in ledger.entries(limit=10_000) if "loop" in e.key
        }
        # every reported commit survived; the one write in progress is all there or not at all
        assert done <= {i for i, e in loops.items() if e.state == State.SUCCEEDED}
        assert claimed <= set(loops)
        assert set(loops) <= claimed | {max(claimed) + 1}
        for i, entry in loops.items():
            if entry.state == State.SUCCEEDED:
                assert entry.result == {"i": i, "pad": "x" * 500}
            else:
                assert entry.state == State.IN_FLIGHT and i not in done
        assert len(ledger.history("crash/held")) == 1

    later = lambda: datetime.now(UTC) + timedelta(seconds=5)  # noqa: E731 -- past the 1 s lease
    with open_ledger(ledger_url, {"lease_seconds": 1}, clock=later) as adopter:
        adopted = adopter.claim("crash/held", "adopter")
        assert adopted.decision == Decision.ADOPTED_STALE
        assert adopted.prior_run_id == "crasher" and adopted.fence > held_fence
        assert adopter.finalize("crash/held", adopted.fence, Outcome.SUCCEEDED).applied
        for entry in adopter.entries(State.IN_FLIGHT):  # the loop key it died on, if any
            assert adopter.claim(entry.key, "adopter").decision == Decision.ADOPTED_STALE
        assert {e.run_id for e in adopter.entries(State.IN_FLIGHT)} <= {"adopter"}
