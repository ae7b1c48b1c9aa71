"""A live process of a run that holds a key (the re-entry tests kill it or let it be).

    python ledger_holder_worker.py URL KEY RUN_ID CLOCK_ISO

Claims KEY for RUN_ID on a clock frozen at CLOCK_ISO (the test's fake clock), prints
`held FENCE` once the claim committed, then sleeps until it is killed.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

from ledger_helpers import CONFIG

from rocky_dagster.ledger import open_ledger


def main(url: str, key: str, run_id: str, now: str) -> None:
    at = datetime.fromisoformat(now)
    ledger = open_ledger(url, CONFIG, clock=lambda: at)
    claim = ledger.claim(key, run_id)
    print(f"held {claim.fence} {claim.decision.value}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(*sys.argv[1:5])
