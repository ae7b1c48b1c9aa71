"""A keyed job for the Dagster-on-PostgreSQL tests, importable by the multiprocess executor's
step processes (they load it from this file).

The guarded op talks to the ledger API directly (claim → work → finalize), so the test proves
the storage path on its own; once `rocky_dagster.idempotent_op` settles it can replace the
body. The ledger URL comes from `EnvVar`, as docs/running-across-machines.md recommends.
"""

import os
import time
from pathlib import Path
from typing import Any

from dagster import (
    ConfigurableResource,
    EnvVar,
    OpExecutionContext,
    job,
    multiprocess_executor,
    op,
)

from rocky_dagster.ledger import EventKind, Ledger, Outcome, open_ledger

KEY_TAG = "rocky/idempotency_key"
WAIT_TAG = "test/wait_for_rival"
WORK_DIR_ENV = "ROCKY_TEST_WORK_DIR"


class LedgerAt(ConfigurableResource):
    url: str

    def open(self) -> Ledger:
        return open_ledger(self.url)


def _wait_for_rival(ledger: Ledger, key: str, run_id: str, seconds: float = 180.0) -> None:
    """Hold the claim until another run has been turned away by it (makes the overlap certain)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(
            e.kind == EventKind.SKIPPED_IN_FLIGHT and e.run_id != run_id
            for e in ledger.history(key)
        ):
            return
        time.sleep(0.1)


@op
def guarded_work(context: OpExecutionContext, ledger: LedgerAt) -> dict[str, Any]:
    key = f"{context.run.tags[KEY_TAG]}/{context.op_handle}"
    with ledger.open() as store:
        claim = store.claim(key, context.run_id, pipeline="guarded_work")
        context.log.info(f"ledger decision for {key}: {claim.decision.value} (pid {os.getpid()})")
        if not claim.should_run:
            return {"decision": claim.decision.value, "worked": False}
        assert claim.fence is not None
        if context.run.tags.get(WAIT_TAG):
            _wait_for_rival(store, key, context.run_id)
        work_dir = Path(os.environ[WORK_DIR_ENV])
        (work_dir / f"{context.run_id}.done").write_text(key)
        store.finalize(key, claim.fence, Outcome.SUCCEEDED, result={"rows": 1})
        return {"decision": claim.decision.value, "worked": True}


@op
def downstream(context: OpExecutionContext, summary: dict[str, Any]) -> None:
    context.log.info(f"upstream said {summary} (pid {os.getpid()})")


@job(
    executor_def=multiprocess_executor,
    resource_defs={"ledger": LedgerAt(url=EnvVar("ROCKY_LEDGER_URL"))},
)
def keyed_job() -> None:
    downstream(guarded_work())
