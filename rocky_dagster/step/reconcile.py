"""Settle the in-flight claims of a run Dagster says is finished (docs/contract.md, "Dead holders").

Shared by the run-status sensors (whole runs, after the fact) and by a claim that meets another
run's in-flight claim (one key, on the spot, so a run retry that starts before any sensor has
reacted can proceed). Every write is fenced by the entry's own fence and run id, so a claim that
changed hands meanwhile is never touched.

| holder run status | what its in-flight claims become |
|---|---|
| FAILURE  | finalized ``failed`` (claimable at once under dedup_on='success') |
| CANCELED | released (the work neither succeeded nor failed: claimable at once under any policy) |
| SUCCESS  | finalized ``succeeded`` (the step succeeded; only its stamp was lost) |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import DagsterRunStatus

from rocky_dagster.ledger import Entry, Ledger, Outcome, State

FINISHED_STATUSES = frozenset(
    {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
)
"""Statuses after which a run can no longer heartbeat, finalize or release anything itself."""

_BATCH = 200


@dataclass
class Reconciled:
    """What reconciling one run did, for logs."""

    run_id: str
    status: DagsterRunStatus
    settled: list[str] = field(default_factory=list)
    """Keys whose claim this call finalized or released."""
    untouched: list[str] = field(default_factory=list)
    """Keys that changed hands or state between the read and the write."""

    def describe(self) -> str:
        action = _ACTION[self.status]
        if not self.settled and not self.untouched:
            return f"run {self.run_id} ({self.status.value}) held no in-flight claims"
        text = f"{action} {len(self.settled)} in-flight claim(s) of run {self.run_id} ({self.status.value})"
        if self.settled:
            text += ": " + ", ".join(self.settled[:10]) + (" …" if len(self.settled) > 10 else "")
        if self.untouched:
            text += f"; {len(self.untouched)} had changed hands meanwhile and were left alone"
        return text


_ACTION = {
    DagsterRunStatus.FAILURE: "finalized as failed",
    DagsterRunStatus.CANCELED: "released",
    DagsterRunStatus.SUCCESS: "stamped as succeeded",
}


def settle_entry(ledger: Ledger, entry: Entry, status: DagsterRunStatus, *, reason: str) -> bool:
    """Finalize or release one in-flight entry of a finished run; False if it changed meanwhile."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"status must be one of {sorted(s.value for s in FINISHED_STATUSES)}")
    if entry.state != State.IN_FLIGHT:
        return False
    if status == DagsterRunStatus.CANCELED:
        return ledger.release(entry.key, run_id=entry.run_id, fence=entry.fence, reason=reason)
    outcome = Outcome.SUCCEEDED if status == DagsterRunStatus.SUCCESS else Outcome.FAILED
    return ledger.finalize(entry.key, entry.fence, outcome, reason=reason).applied


def reconcile_key(
    ledger: Ledger, key: str, run_id: str, status: DagsterRunStatus, *, reason: str
) -> bool:
    """Settle `key` if it is still in flight under `run_id`; True when this call changed it."""
    entry = ledger.get(key)
    if entry is None or entry.run_id != run_id or entry.state != State.IN_FLIGHT:
        return False
    return settle_entry(ledger, entry, status, reason=reason)


def reconcile_run(
    ledger: Ledger, run_id: str, status: DagsterRunStatus, *, reason: str
) -> Reconciled:
    """Settle every in-flight claim `run_id` still holds, per the table in this module's doc."""
    done = Reconciled(run_id, status)
    seen: set[tuple[str, int]] = set()
    while True:
        batch = [
            e
            for e in ledger.entries(State.IN_FLIGHT, run_id=run_id, limit=_BATCH)
            if (e.key, e.fence) not in seen
        ]
        if not batch:
            return done
        for entry in batch:
            seen.add((entry.key, entry.fence))
            if settle_entry(ledger, entry, status, reason=reason):
                done.settled.append(entry.key)
            else:
                done.untouched.append(entry.key)
