"""A run that dies without warning (the ledger crash test SIGKILLs it).

    python ledger_crash_worker.py URL

Claims `crash/held` and keeps it, then claims and finalizes keys in a tight loop until it is
killed, so the kill lands in the middle of ledger writes. Each line it prints is printed only
after the write it reports has committed: `held FENCE`, `claimed I FENCE`, `done I`.
"""

from __future__ import annotations

import sys

from rocky_dagster.ledger import Outcome, open_ledger

LEASE_SECONDS = 1


def main(url: str) -> None:
    ledger = open_ledger(url, {"lease_seconds": LEASE_SECONDS})
    held = ledger.claim("crash/held", "crasher", pipeline="crash")
    print(f"held {held.fence}", flush=True)
    i = 0
    while True:
        key = f"crash/loop/{i:06d}"
        claim = ledger.claim(key, "crasher")
        print(f"claimed {i} {claim.fence}", flush=True)
        ledger.finalize(key, claim.fence, Outcome.SUCCEEDED, result={"i": i, "pad": "x" * 500})
        print(f"done {i}", flush=True)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1])
