"""Hooks settling a step's claim: an optional in-process backstop of a guarded step.

A guarded step settles its own claim: stamped once its outputs are stored, failed when the body
or storing an output raised. These hooks (which Dagster runs in the step's process, after the
step) settle what the step could not: a stamp that failed because the ledger was briefly
unwritable. Without them the SUCCESS run-status sensor, or the next run's on-the-spot reap of
a finished holder, records that step `succeeded` later. They act only on a claim the same step
of the same run registered in this process, so a `skipped_in_flight` step (which holds nothing)
can never release another run's claim.

`ledger_job` attaches no hooks unless asked (``ledger_job(hooks=ledger_hooks)``): each hook
adds an event per step, which measured more than the claim and stamp themselves on trivial
ops (see benchmarks/dagster_overhead.py). `with_ledger` attaches them to an existing job, asset
job or assets. `ledger_hooks` holds one hook that settles on either outcome (one event per
step instead of a success/failure pair); `ledger_success_hook` / `ledger_failure_hook` are the
same logic split by outcome.

Hooks are best-effort (they never fire on a cancel or a killed process, and an error inside one
is only logged): `ledger_run_status_sensors` and the lease back them.
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster import (
    DagsterEvent,
    HookContext,
    HookDefinition,
    HookExecutionResult,
    failure_hook,
    success_hook,
)

from rocky_dagster._compat import event_list_hook
from rocky_dagster.ledger import LedgerError, Outcome
from rocky_dagster.step.guard import take_active


def _settle(context: HookContext, outcome: Outcome) -> None:
    guard = take_active(context.run_id, context.step_key)
    if guard is None:
        return  # settled by the step itself, or the step held no claim
    try:
        guard.settle_from_hook(outcome, context.log)
    except LedgerError as exc:
        context.log.warning(
            f"rocky_dagster: hook could not settle the claim of step '{context.step_key}' "
            f"({exc}); the run-status sensor or the lease will"
        )


@success_hook(name="ledger_success_hook")
def ledger_success_hook(context: HookContext) -> None:
    """Stamp ``succeeded`` a claim the step could not stamp itself (outputs are stored by now)."""
    _settle(context, Outcome.SUCCEEDED)


@failure_hook(name="ledger_failure_hook")
def ledger_failure_hook(context: HookContext) -> None:
    """Finalize ``failed`` a claim the failed step left in flight (runs after the last retry)."""
    _settle(context, Outcome.FAILED)


@event_list_hook(name="ledger_hook")
def ledger_hook(context: HookContext, event_list: Sequence[DagsterEvent]) -> HookExecutionResult:
    """Settle a claim the step left unsettled, by the step's outcome (success or failure)."""
    for event in event_list:
        if event.is_step_success:
            _settle(context, Outcome.SUCCEEDED)
            break
        if event.is_step_failure:
            _settle(context, Outcome.FAILED)
            break
    return HookExecutionResult(hook_name="ledger_hook", is_skipped=False)


ledger_hooks: frozenset[HookDefinition] = frozenset({ledger_hook})
"""The hooks to attach: ``@job(hooks=ledger_hooks)``, ``define_asset_job(hooks=...)``, ..."""
