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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_helpers import LEASE, FakeClock

from rocky_dagster.ledger import Decision, Ledger, Outcome, process

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


def _proc_state(pid: int) -> str | None:
    """The process state letter from /proc/<pid>/stat (field 3); None once it is reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    return text[text.rindex(")") + 2 :].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_re_entry_proceeds_while_the_killed_holder_is_an_unreaped_zombie(
    ledger: Ledger, holder: subprocess.Popen[str], clock: FakeClock
):
    """A killed process stays in the process table (state Z) until its parent waits for it;
    its pid still answers, but it runs nothing, so the run's next attempt may re-enter."""
    before = ledger.get("k")
    holder.send_signal(signal.SIGKILL)  # killed, and not waited for: the fixture reaps it later
    for _ in range(2000):  # bounded poll: the kernel makes it a zombie promptly
        if _proc_state(holder.pid) == "Z":
            break
        time.sleep(0.005)
    assert _proc_state(holder.pid) == "Z", "the holder did not become a zombie"
    clock.advance(seconds=5)

    again = ledger.claim("k", "run-1")

    assert _proc_state(holder.pid) == "Z"  # still unreaped while the claim was decided
    assert again.decision == Decision.PROCEED
    assert again.fence > before.fence and again.generation == before.generation
    assert "gone" in ledger.history("k")[-1].detail


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_re_entry_proceeds_when_the_holders_pid_now_names_another_process(
    ledger: Ledger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    """A recorded holder whose pid is running again but with another start time is a new
    process that reused the pid: the holder is gone. With its own start time it is alive."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        identity = process._identify(live.pid)
        assert identity.startswith("proc:"), identity
        head, start = identity.rsplit("/", 1)

        monkeypatch.setattr(ledger, "_process", lambda: identity, raising=False)
        ledger.claim("alive", "run-1")
        monkeypatch.setattr(ledger, "_process", lambda: f"{head}/{int(start) + 1}", raising=False)
        first = ledger.claim("reused", "run-1")
        monkeypatch.undo()
        clock.advance(seconds=5)

        assert ledger.claim("alive", "run-1").decision == Decision.SKIPPED_IN_FLIGHT
        again = ledger.claim("reused", "run-1")
        assert again.decision == Decision.PROCEED
        assert again.fence > first.fence and again.generation == first.generation
        assert "gone" in ledger.history("reused")[-1].detail
    finally:
        live.kill()
        live.wait()
