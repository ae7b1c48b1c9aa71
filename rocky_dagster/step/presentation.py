"""What people see of a guarded step's decision: metadata, the log line, the run's one summary.

- **Step metadata** (on the step's outputs, its asset observation, or — for a skip with no output
  — a step engine event): the decision, ledger key, fence, the run behind the decision as a run
  link, and for a replay the recorded summary's values, one entry each (``rocky/replayed/rows``).
- **One log line** for the decisions worth reading: skips, adoptions, forced runs, unguarded
  steps. A plain ``proceed`` adds no event (its metadata says it).
- **Two run tags at most**, whatever the number of steps: ``rocky/idempotency_key`` (the base
  key) and ``rocky/outcome`` (`OUTCOME_TAG`), one of ``worked`` (every guarded step did its
  work), ``skipped`` (every step skipped: the work was done or under way elsewhere), ``mixed``,
  ``unguarded`` (no step had a key), ``none`` (a re-execution that decided nothing),
  ``failed`` (a guarded step failed, or the run finished FAILURE) or ``canceled``. It is
  written when the run's value changes (once, twice when it becomes ``mixed``), never per
  step, and settled by the run-status sensors when the run finishes, so a re-execution never
  keeps showing the summary it copied from its parent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from dagster import DagsterEventType, DagsterInstance, MetadataValue

from rocky_dagster import _compat
from rocky_dagster.ledger import Claim, Decision
from rocky_dagster.step.keys import OUTCOME_TAG, ResolvedKey

UNGUARDED = "unguarded"
"""The decision shown for a step that had no key and ran without the ledger."""

DECISION_KEY = "rocky/decision"
REPLAYED_PREFIX = "rocky/replayed/"

WORKED, SKIPPED, MIXED, NONE = "worked", "skipped", "mixed", "none"
FAILED, CANCELED = "failed", "canceled"
"""A run a guarded step of which failed (or that finished FAILURE); one canceled."""
OUTCOMES = (WORKED, SKIPPED, MIXED, UNGUARDED, NONE, FAILED, CANCELED)
"""Every value of the ``rocky/outcome`` run tag."""

_KIND = {
    Decision.PROCEED.value: WORKED,
    Decision.ADOPTED_STALE.value: WORKED,
    Decision.SKIPPED_COMPLETED.value: SKIPPED,
    Decision.SKIPPED_IN_FLIGHT.value: SKIPPED,
    UNGUARDED: UNGUARDED,
    FAILED: FAILED,
}


# --- step metadata ---------------------------------------------------------------------------


def claim_metadata(
    resolved: ResolvedKey | None,
    claim: Claim | None,
    *,
    ledger_url: str | None = None,
    reaped_run_id: str | None = None,
) -> dict[str, Any]:
    """Decision, key, fence, the run behind the decision (linked) and the expiry that matters.

    A finished record shows its retention expiry (until when it dedups); only a live holder's
    lease is shown, since a finished claim's lease no longer means anything.
    """
    decision = claim.decision.value if claim is not None else UNGUARDED
    meta: dict[str, Any] = {DECISION_KEY: MetadataValue.text(decision)}
    if resolved is None or not resolved.guarded:
        meta["rocky/guarded"] = MetadataValue.bool(False)
        return meta
    meta["rocky/ledger_key"] = MetadataValue.text(str(resolved.ledger_key))
    meta["rocky/key_source"] = MetadataValue.text(resolved.source.value)
    if ledger_url is not None:
        meta["rocky/ledger"] = MetadataValue.text(ledger_url)
    if claim is None:
        return meta
    if claim.fence is not None:
        meta["rocky/fence"] = MetadataValue.int(claim.fence)
    if claim.forced:
        meta["rocky/forced"] = MetadataValue.bool(True)
    if claim.prior_run_id:
        meta["rocky/prior_run_id"] = MetadataValue.dagster_run(claim.prior_run_id)
    if claim.held_by_run_id:
        meta["rocky/held_by_run_id"] = MetadataValue.dagster_run(claim.held_by_run_id)
        if claim.lease_expires_at is not None:
            meta["rocky/holder_lease_expires_at"] = _timestamp(claim.lease_expires_at)
    if claim.decision == Decision.SKIPPED_COMPLETED and claim.expires_at is not None:
        meta["rocky/expires_at"] = _timestamp(claim.expires_at)
    if reaped_run_id is not None:
        meta["rocky/reaped_run_id"] = MetadataValue.dagster_run(reaped_run_id)
    return meta


def replayed_metadata(recorded: Any) -> dict[str, Any]:
    """The values a skip replays, one metadata entry each (``rocky/replayed/<name>``)."""
    if not isinstance(recorded, Mapping):
        return {}
    meta: dict[str, Any] = {}
    for name, value in recorded.items():
        entry = _metadata_value(value)
        if entry is not None:
            meta[f"{REPLAYED_PREFIX}{name}"] = entry
    return meta


def _metadata_value(value: Any) -> Any:
    if isinstance(value, bool):
        return MetadataValue.bool(value)
    if isinstance(value, int):
        return MetadataValue.int(value)
    if isinstance(value, float):
        return MetadataValue.float(value)
    if isinstance(value, str):
        return MetadataValue.text(value)
    if value is None:
        return None
    return MetadataValue.json(value)


def replay_value(claim: Claim) -> dict[str, Any]:
    """The output of a `skipped_completed` step: the recorded summary, marked as replayed."""
    recorded = dict(claim.result or {})
    return {**recorded, "replayed": True, "prior_run_id": claim.prior_run_id}


def _timestamp(value: datetime) -> MetadataValue:
    return MetadataValue.timestamp(value)


# --- the decision log line -------------------------------------------------------------------


def decision_message(claim: Claim, run_id: str) -> str | None:
    """The log line for a decision worth a line, or None (a plain proceed)."""
    key = claim.key
    if claim.decision == Decision.PROCEED:
        if claim.forced:
            return (
                f"rocky_dagster: FORCED - ledger key '{key}' (fence {claim.fence}) runs again, "
                f"overriding the record of run {claim.prior_run_id}"
            )
        return None
    if claim.decision == Decision.ADOPTED_STALE:
        return (
            f"rocky_dagster: took over ledger key '{key}' (fence {claim.fence}) from run "
            f"{claim.prior_run_id}, whose lease had expired; running"
        )
    if claim.decision == Decision.SKIPPED_COMPLETED:
        until = f" until {claim.expires_at.isoformat()}" if claim.expires_at else ""
        return (
            f"rocky_dagster: SKIPPED - ledger key '{key}' already completed in run "
            f"{claim.prior_run_id} (recorded{until}); no work done, its recorded result is "
            "replayed"
        )
    lease = f" (lease until {claim.lease_expires_at.isoformat()})" if claim.lease_expires_at else ""
    return (
        f"rocky_dagster: SKIPPED - ledger key '{key}' is being worked on by run "
        f"{claim.held_by_run_id}{lease}; no work done here and this step's downstream steps "
        "are skipped"
    )


def unguarded_message(step_key: str, *, asset: bool) -> str:
    from rocky_dagster.step.keys import KEY_TAG, RUN_KEY_TAG

    if asset:
        return (
            f"rocky_dagster: step '{step_key}' has no idempotency key (no key_fn, no '{KEY_TAG}' "
            f"or '{RUN_KEY_TAG}' run tag, no partition, no upstream asset to key it by): it runs "
            "UNGUARDED, without the ledger. Key it with key_fn=..., a partitions_def, deps on "
            f"the assets it reads, or a '{KEY_TAG}' tag on the launch"
        )
    return (
        f"rocky_dagster: step '{step_key}' has no idempotency key (no key_fn, no '{KEY_TAG}' or "
        f"'{RUN_KEY_TAG}' run tag): it runs UNGUARDED, without the ledger"
    )


# --- the run's summary tag -------------------------------------------------------------------


def outcome_of(decisions: Iterable[str]) -> str:
    """The run's ``rocky/outcome`` from its steps' decisions (see the module doc)."""
    kinds = {_KIND.get(d, MIXED) for d in decisions}
    if not kinds:
        return NONE
    if FAILED in kinds:
        return FAILED  # whatever else the run did, it did not finish its work
    return kinds.pop() if len(kinds) == 1 else MIXED


class _RunTagWriter:
    """Writes a run's ``rocky/outcome`` (and key tag) only when its value changes.

    A process remembers the decisions its own steps made per run, so an in-process run writes
    its tags once (twice if it turns ``mixed``) whatever its op count. A step process of the
    multiprocess executor starts from the tags on the run; a re-execution's first step in a
    process does not merge with what the run copied from its parent. What a process cannot see
    (parallel step processes deciding differently) the run-status sensors settle at the end.
    """

    _MAX_RUNS = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = {}

    def note(
        self, op_ctx: Any, run_id: str, decision: str, extra: Mapping[str, str] | None = None
    ) -> None:
        run = op_ctx.run
        current = run.tags
        with self._lock:
            seen = self._seen.get(run_id)
            if seen is None:
                if len(self._seen) >= self._MAX_RUNS:
                    self._seen.clear()
                written = current.get(OUTCOME_TAG)
                copied = run.parent_run_id is not None  # its tags may be its parent's
                seen = self._seen[run_id] = (
                    set() if copied or written is None else _recorded(op_ctx, run_id, written)
                )
            else:
                written = outcome_of(seen)
            seen.add(decision)
            value = outcome_of(seen)
        tags = {k: v for k, v in (extra or {}).items() if current.get(k) != v}
        if value != written:
            tags[OUTCOME_TAG] = value
        if not tags:
            return
        try:
            _compat.add_run_tags(op_ctx.instance, run_id, tags)
        except Exception as exc:  # tags are for people; never fail the work over them
            op_ctx.log.warning(f"rocky_dagster: could not set run tags {tags}: {exc}")


_SEED: dict[str | None, tuple[str, ...]] = {
    WORKED: (Decision.PROCEED.value,),
    SKIPPED: (Decision.SKIPPED_COMPLETED.value,),
    UNGUARDED: (UNGUARDED,),
    MIXED: (Decision.PROCEED.value, Decision.SKIPPED_COMPLETED.value),
    FAILED: (FAILED,),
}
"""Decisions standing for a summary already on the run (written by another step process)."""

RUN_TAGS = _RunTagWriter()


def _recorded(op_ctx: Any, run_id: str, written: str) -> set[str]:
    """The decisions this run's steps have recorded so far, standing for a ``rocky/outcome``
    already on the run: another step process wrote it, or the launch copied it from another
    run (the Launchpad copies tags), and only this run's event log tells which."""
    try:
        seen = set(step_decisions(op_ctx.instance, run_id).values())
        if written == FAILED and _has_step_failure(op_ctx.instance, run_id):
            seen.add(FAILED)
        return seen
    except Exception as exc:  # tags are for people: never fail the work over them
        op_ctx.log.warning(f"rocky_dagster: could not read run {run_id}'s decisions: {exc}")
        return set(_SEED.get(written, ()))


def _has_step_failure(instance: DagsterInstance, run_id: str) -> bool:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE, limit=1)
    return bool(records.records)


_FINISHED_AS = {"FAILURE": FAILED, "CANCELED": CANCELED}
"""A finished run's status that names its outcome, whatever its steps decided."""

_DECISION_EVENTS = {
    DagsterEventType.STEP_OUTPUT,
    DagsterEventType.ENGINE_EVENT,
    DagsterEventType.ASSET_OBSERVATION,
    DagsterEventType.ASSET_CHECK_EVALUATION,
}


def step_decisions(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key → the ledger decision that step showed in run `run_id` (from its metadata).

    Read from the run's event log: the output, asset observation, check evaluation or engine
    event carrying ``rocky/decision``. Steps that are not guarded are absent.

    Examples:
        .. code-block:: python

            result = my_job.execute_in_process(tags={KEY_TAG: "2024-06-01"})
            step_decisions(instance, result.run_id)  # {"load": "proceed", "publish": ...}
    """
    found: dict[str, str] = {}
    for record in instance.get_records_for_run(run_id, of_type=_DECISION_EVENTS).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        value = _compat.event_metadata(event).get(DECISION_KEY)
        if value is not None:
            found[entry.step_key] = str(getattr(value, "value", value))
    return found


def settle_outcome_tag(instance: DagsterInstance, run_id: str) -> str | None:
    """Set a finished run's ``rocky/outcome`` from its own steps' decisions — ``failed`` or
    ``canceled`` when a run with guarded steps finished so; the value written, or
    None when the tag already said it (or the run has no guarded step and no such tag)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return None
    decisions = step_decisions(instance, run_id)
    current = run.tags.get(OUTCOME_TAG)
    if not decisions and current is None:
        return None
    finished_as = _FINISHED_AS.get(run.status.value) if decisions else None
    value = finished_as or outcome_of(decisions.values())
    if value == current:
        return None
    _compat.add_run_tags(instance, run_id, {OUTCOME_TAG: value})
    return value
