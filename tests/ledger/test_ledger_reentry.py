"""Same-run re-entry: two live processes of one run never both proceed on one key.

A claim by the run that holds the key proceeds as a re-entry (new fence, same generation,
same `claimed_at`) only when the earlier attempt is known finished: kept for its retry
(`keep_for_retry`), or its process gone. Otherwise it is skipped until the lease ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_helpers import LEASE, FakeClock

from rocky_dagster.ledger import Decision, Ledger, Outcome

WORKER = Path(__file__).with_name("ledger_holder_worker.py")


@pytest.fixture
def holder(ledger_url: str, clock: FakeClock) -> Iterator[subprocess.Popen[str]]:
    """A live process of run-1 holding key `k` (claimed on the test's clock)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), ledger_url, "k", "run-1", clock.now.isoformat()],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("held "), line
        assert line.split()[2] == "proceed"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_live_process_of_the_same_run_keeps_the_key(
    ledger: Ledger, holder: subprocess.Popen[str], clock: FakeClock
):
    before = ledger.get("k")

    claim = ledger.claim("k", "run-1")

    assert claim.decision == Decision.SKIPPED_IN_FLIGHT
    assert claim.fence is None and claim.held_by_run_id == "run-1"
    assert ledger.get("k") == before
    assert "another live attempt of the same run" in ledger.history("k")[-1].detail


def test_re_entry_proceeds_once_the_holding_process_is_gone(
    ledger: Ledger, holder: subprocess.Popen[str], clock: FakeClock
):
    before = ledger.get("k")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    clock.advance(seconds=5)

    again = ledger.claim("k", "run-1")

    assert again.decision == Decision.PROCEED
    assert again.fence > before.fence and again.generation == before.generation
    entry = ledger.get("k")
    assert entry.claimed_at == before.claimed_at
    assert "gone" in ledger.history("k")[-1].detail


def test_a_claim_kept_for_the_retry_is_re_entered_at_once(ledger: Ledger, clock: FakeClock):
    first = ledger.claim("k", "run-1")
    clock.advance(seconds=5)

    assert ledger.keep_for_retry("k", first.fence) is True
    again = ledger.claim("k", "run-1")

    assert again.decision == Decision.PROCEED
    assert again.fence > first.fence and again.generation == first.generation
    assert ledger.get("k").claimed_at == first.lease_expires_at - LEASE
    assert [e.kind.value for e in ledger.history("k")] == ["claimed", "kept_for_retry", "claimed"]
    # the re-entered claim is live again: a third claim (another thread) is skipped
    assert ledger.claim("k", "run-1").decision == Decision.SKIPPED_IN_FLIGHT
    stale = ledger.finalize("k", first.fence, Outcome.SUCCEEDED)
    assert not stale.applied
    assert ledger.finalize("k", again.fence, Outcome.SUCCEEDED).applied


def test_keep_for_retry_only_parks_the_named_live_claim(ledger: Ledger, clock: FakeClock):
    assert ledger.keep_for_retry("k", 1) is False  # no entry
    first = ledger.claim("k", "run-1")
    assert ledger.keep_for_retry("k", first.fence + 1000) is False  # another fence
    done = ledger.claim("d", "run-1")
    ledger.finalize("d", done.fence, Outcome.FAILED)
    assert ledger.keep_for_retry("d", done.fence) is False  # finalized
    assert ledger.claim("k", "run-1").decision == Decision.SKIPPED_IN_FLIGHT


def test_the_same_process_without_parking_is_skipped(ledger: Ledger, clock: FakeClock):
    first = ledger.claim("k", "run-1")
    before = ledger.get("k")

    again = ledger.claim("k", "run-1")  # another thread, or an attempt that never settled

    assert again.decision == Decision.SKIPPED_IN_FLIGHT and again.fence is None
    assert ledger.get("k") == before
    assert ledger.heartbeat("k", first.fence)


def test_a_holder_on_another_machine_is_skipped_until_its_lease_ends(
    ledger: Ledger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    # a process of run-1 on another boot (machine or reboot): its liveness is unknown here
    monkeypatch.setattr(
        ledger, "_process", lambda: "proc:another-boot/4026531836/12345/999", raising=False
    )
    first = ledger.claim("k", "run-1")
    monkeypatch.undo()
    clock.advance(seconds=30)

    assert ledger.claim("k", "run-1").decision == Decision.SKIPPED_IN_FLIGHT

    clock.advance(seconds=30)  # the lease ends
    adopted = ledger.claim("k", "run-1")
    assert adopted.decision == Decision.ADOPTED_STALE
    assert adopted.generation == first.generation
