"""A forked child gets its own ledger connection (SQLite) or pool (PostgreSQL).

Dagster's run worker and multiprocess executor may fork with a ledger open. The parent's
connection is not the child's: if the child kept using it, the parent closing its ledger
(SQLite checkpoints and removes the WAL file when its last connection closes) would leave
the child writing where no other process reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

from rocky_dagster.ledger import Decision, Outcome, open_ledger

READ_STATE = """
import sys
from rocky_dagster.ledger import open_ledger
ledger = open_ledger(sys.argv[1])
entry = ledger.get("k")
print(None if entry is None else entry.state.value)
ledger.close()
"""


def _wait(pid: int, timeout: float = 120.0) -> int:
    """The child's exit code; it is killed (and the test fails) past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child did not finish within {timeout} s")


def test_a_forked_child_claims_and_finalizes_after_the_parent_closed_its_ledger(ledger_url: str):
    ledger = open_ledger(ledger_url)
    assert ledger.get("k") is None  # the parent's connection is open when it forks
    wait, release = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: claim and finalize only once the parent has closed its ledger
        code = 1
        try:
            os.close(release)
            os.read(wait, 1)
            claim = ledger.claim("k", "child-run")
            assert claim.decision == Decision.PROCEED and claim.fence is not None
            assert ledger.finalize("k", claim.fence, Outcome.SUCCEEDED).applied
            code = 0  # and no close(): a committed finalize must be visible as it stands
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wait)
    ledger.close()
    os.write(release, b"go")
    os.close(release)

    assert _wait(pid) == 0, "the child's claim or finalize failed (see its traceback above)"
    fresh = subprocess.run(
        [sys.executable, "-c", READ_STATE, ledger_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert fresh.stdout.strip() == "succeeded", fresh
