"""One step's conversation with the ledger: resolve the key, claim, heartbeat, settle.

`StepGuard` is what `idempotent_op` and `idempotent_asset` wrap around a body. It never writes
SQL (only the `Ledger` API) and keeps the claim it holds in a per-process registry keyed by
(run id, step key), because Dagster runs a step's hooks in the step's own process after its
outputs are stored: the hooks find the fence there instead of re-deriving the key.

Settling happens in the wrapper itself where it can (right after the outputs are stored, so a
job without the ledger hooks is still correct); the hooks and the run-status sensors are the
backstops for what a wrapper cannot see (a failed ledger write, a killed process, a cancel).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from dagster import (
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    Failure,
    MetadataValue,
)

from . import _compat
from .keys import (
    KEY_TAG,
    RUN_KEY_TAG,
    KeySource,
    ResolvedKey,
    decision_run_tag,
    decision_tag,
    is_forced,
    resolve_key,
)
from .ledger import (
    Claim,
    Decision,
    FingerprintMismatchError,
    InvalidArgumentError,
    Ledger,
    LedgerError,
    Outcome,
)
from .ledger.model import encode_result
from .reconcile import FINISHED_STATUSES, reconcile_key
from .resource import IdempotencyLedger

KeyFn = Callable[[Any], "str | None"]
"""``key_fn(context) -> key | None``: a user's own base key for the run (None: no opinion)."""

UNGUARDED = "unguarded"
"""The decision shown for a step that had no key and ran without the ledger."""

_JOB_KEY_FNS: dict[str, KeyFn] = {}
_ACTIVE: dict[tuple[str, str], StepGuard] = {}
_ACTIVE_LOCK = threading.Lock()


def register_job_key_fn(job_name: str, key_fn: KeyFn) -> None:
    """Give every guarded step of job `job_name` a base key from `key_fn` (see `ledger_job`)."""
    _JOB_KEY_FNS[job_name] = key_fn


def take_active(run_id: str, step_key: str) -> StepGuard | None:
    """The claim a step of this process still holds unsettled, removed from the registry."""
    with _ACTIVE_LOCK:
        return _ACTIVE.pop((run_id, step_key), None)


class Heartbeat:
    """Extends one claim's lease every `interval` seconds; notices when the claim was lost."""

    def __init__(self, ledger: Ledger, key: str, fence: int, interval: float) -> None:
        self.ledger = ledger
        self.key = key
        self.fence = fence
        self.interval = max(interval, 0.05)
        self.next_due = time.monotonic() + self.interval
        self.lost = False
        self.last_error: Exception | None = None

    def start(self) -> None:
        _HEARTBEATER.add(self)

    def stop(self) -> None:
        _HEARTBEATER.remove(self)

    def beat(self) -> None:
        self.next_due = time.monotonic() + self.interval
        try:
            alive = self.ledger.heartbeat(self.key, self.fence)
        except Exception as exc:  # an outage: keep trying, the lease covers a short one
            self.last_error = exc
            return
        if not alive:
            self.lost = True
            _HEARTBEATER.remove(self)


class _Heartbeater:
    """One daemon thread per process beating every running claim when it is due.

    Cheaper than a thread per step (nothing to start or join on the hot path), and a step that
    finishes simply drops out of the set. The thread is woken only when a new claim is due
    before the thread would look anyway: a step's claim is due a quarter lease after it starts,
    later than anything already scheduled, so back-to-back steps never wake it (waking it costs
    a thread switch per step).
    """

    def __init__(self) -> None:
        self._beats: dict[int, Heartbeat] = {}
        self._wake = threading.Condition()
        self._pid = -1
        self._looks_at = math.inf
        """When the thread looks at the beats next: inf while it waits for a notify, -inf while
        it is awake (it rescans before it sleeps again)."""

    def add(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats[id(beat)] = beat
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid = os.getpid()
                self._looks_at = -math.inf
                threading.Thread(target=self._run, name="rocky-heartbeat", daemon=True).start()
            elif beat.next_due < self._looks_at:
                self._wake.notify()

    def remove(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats.pop(id(beat), None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [b for b in self._beats.values() if b.next_due <= now]
                if not due:
                    if self._beats:
                        self._looks_at = min(b.next_due for b in self._beats.values())
                        self._wake.wait(self._looks_at - now)
                    else:
                        self._looks_at = math.inf
                        self._wake.wait()
                    self._looks_at = -math.inf
                    continue
            for beat in due:
                with self._wake:
                    if id(beat) not in self._beats:
                        continue  # stopped meanwhile
                beat.beat()


_HEARTBEATER = _Heartbeater()


class StepGuard:
    """Claim-to-settle lifecycle of one guarded step (an op or an asset)."""

    def __init__(
        self,
        context: Any,
        resource: IdempotencyLedger,
        *,
        key_fn: KeyFn | None = None,
        fingerprint: str | None = None,
        pipeline: str | None = None,
        asset_key: str | None = None,
    ) -> None:
        if not isinstance(resource, IdempotencyLedger):
            raise Failure(
                description=(
                    f"resource 'ledger' is a {type(resource).__name__}, not an IdempotencyLedger: "
                    "bind resources={'ledger': IdempotencyLedger(...)} in Definitions or the job"
                ),
                allow_retries=False,
            )
        self.context = context
        self.op_ctx = getattr(context, "op_execution_context", context)
        self.resource = resource
        self.key_fn = key_fn
        self.fingerprint = fingerprint
        self.pipeline = pipeline
        self.asset_key = asset_key
        self.run_id: str = self.op_ctx.run_id
        self.step_key: str = _compat.step_key(self.op_ctx)
        self.resolved: ResolvedKey | None = None
        self.claim_result: Claim | None = None
        self.reaped: tuple[str, DagsterRunStatus, bool] | None = None
        self.ledger: Ledger | None = None
        self.summary: dict[str, Any] | None = None
        self.body_done = False
        self._heartbeat: Heartbeat | None = None
        self._settled = False

    # --- claim ---------------------------------------------------------------------------------

    def claim(self) -> Claim | None:
        """Resolve the key and claim it; None when the step has no key and runs unguarded."""
        own_tags = dict(self.op_ctx.run.tags)
        tags = self._inherit_key_tags(own_tags)
        resolved = self._resolve(tags)
        self.resolved = resolved
        if not resolved.guarded:
            self._tag({decision_tag(self.step_key): UNGUARDED}, own_tags)
            self.op_ctx.log.warning(
                f"rocky_dagster: step '{self.step_key}' has no idempotency key (no key_fn, no "
                f"'{KEY_TAG}' or '{RUN_KEY_TAG}' run tag{', no partition' if self.asset_key else ''}"
                "): it runs UNGUARDED, without the ledger"
            )
            return None
        assert resolved.ledger_key is not None and resolved.base is not None
        key = resolved.ledger_key
        try:
            self.ledger = self.resource.open()
            claim = self._claim_once(key, tags)
            if (
                claim.decision == Decision.SKIPPED_IN_FLIGHT
                and claim.held_by_run_id
                and claim.held_by_run_id != self.run_id
                and self._reap(key, claim.held_by_run_id)
            ):
                claim = self._claim_once(key, tags)
        except FingerprintMismatchError as exc:
            raise Failure(
                description=f"rocky_dagster: {exc}",
                metadata={"rocky/ledger_key": key},
                allow_retries=False,
            ) from exc
        except InvalidArgumentError as exc:
            raise Failure(
                description=f"rocky_dagster: cannot claim step '{self.step_key}': {exc}",
                metadata={"rocky/key_source": resolved.source.value},
                allow_retries=False,
            ) from exc
        except LedgerError as exc:
            raise Failure(
                description=(
                    f"rocky_dagster: cannot use the ledger, so step '{self.step_key}' did no work "
                    f"(fail closed): {exc}"
                ),
                metadata={"rocky/ledger_key": key},
            ) from exc
        self.claim_result = claim
        new_tags = {
            decision_tag(self.step_key): claim.decision.value,
            decision_run_tag(self.step_key): (
                claim.held_by_run_id
                if claim.decision == Decision.SKIPPED_IN_FLIGHT
                else claim.prior_run_id
                if claim.decision == Decision.SKIPPED_COMPLETED
                else self.run_id
            )
            or self.run_id,
        }
        # the base goes on the run (and so on its retries) only when it names the whole run: an
        # op's own key_fn names that op's work, an asset partition that asset's
        run_wide = resolved.source in (KeySource.TAG, KeySource.RUN_KEY) or (
            resolved.source == KeySource.KEY_FN and self.key_fn is None
        )
        if run_wide:
            new_tags[KEY_TAG] = resolved.base
        self._tag(new_tags, own_tags)
        self._log_decision(claim)
        return claim

    def _inherit_key_tags(self, own_tags: dict[str, str]) -> dict[str, str]:
        """The run's tags, plus its parent's key tags when a re-execution did not copy them.

        Dagster's daemon and UI copy every parent tag into a retry, but a Python-API
        re-execution (`ReexecutionOptions`) copies none; the lineage fields say whose key it is.
        """
        if own_tags.get(KEY_TAG) or own_tags.get(RUN_KEY_TAG):
            return own_tags
        run = self.op_ctx.run
        for ancestor_id in dict.fromkeys(r for r in (run.parent_run_id, run.root_run_id) if r):
            ancestor = self.op_ctx.instance.get_run_by_id(ancestor_id)
            if ancestor is None:
                continue
            found = {t: ancestor.tags[t] for t in (KEY_TAG, RUN_KEY_TAG) if ancestor.tags.get(t)}
            if found:
                return {**own_tags, **found}
        return own_tags

    def _resolve(self, tags: Mapping[str, str]) -> ResolvedKey:
        key_fn = self.key_fn or _JOB_KEY_FNS.get(self.op_ctx.job_name)
        user_key = None
        if key_fn is not None:
            user_key = key_fn(self.context)
            if user_key is not None and not isinstance(user_key, str):
                raise Failure(
                    description=(
                        f"rocky_dagster: key_fn of step '{self.step_key}' returned "
                        f"{type(user_key).__name__}; it must return a str key or None"
                    ),
                    allow_retries=False,
                )
        try:
            return resolve_key(
                tags,
                self.step_key,
                user_key=user_key,
                partition=self._partition(),
                asset_key=self.asset_key,
            )
        except InvalidArgumentError as exc:
            raise Failure(
                description=f"rocky_dagster: bad idempotency key for '{self.step_key}': {exc}",
                allow_retries=False,
            ) from exc

    def _partition(self) -> str | None:
        ctx = self.op_ctx
        if ctx.has_partition_key:
            return str(ctx.partition_key)
        if ctx.has_partition_key_range:
            rng = ctx.partition_key_range
            return f"{rng.start}...{rng.end}"
        return None

    def _claim_once(self, key: str, tags: Mapping[str, str]) -> Claim:
        assert self.ledger is not None
        return self.ledger.claim(
            key,
            self.run_id,
            pipeline=self.pipeline,
            fingerprint=self.fingerprint,
            force=is_forced(tags),
        )

    def _reap(self, key: str, holder_id: str) -> bool:
        """Settle `key` on the spot when its holder run is finished in Dagster; True if it did.

        A holder unknown to this instance is left alone: it may be alive in another deployment
        that shares the ledger, and its lease settles it either way.
        """
        assert self.ledger is not None
        holder = self.op_ctx.instance.get_run_by_id(holder_id)
        if holder is None or holder.status not in FINISHED_STATUSES:
            return False
        settled = reconcile_key(
            self.ledger,
            key,
            holder_id,
            holder.status,
            reason=f"holder run {holder_id} is {holder.status.value}; reaped by run {self.run_id}",
        )
        self.reaped = (holder_id, holder.status, settled)
        self.op_ctx.log.info(
            f"rocky_dagster: ledger key '{key}' was held by run {holder_id}, which is "
            f"{holder.status.value} in Dagster: its claim was settled on the spot; claiming again"
        )
        return True

    # --- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin the work: register the claim for the hooks and start heartbeating."""
        claim = self.claim_result
        if claim is None or claim.fence is None or self.ledger is None:
            return
        self._heartbeat = Heartbeat(
            self.ledger, claim.key, claim.fence, self.ledger.config.heartbeat_interval_seconds
        )
        self._heartbeat.start()
        with _ACTIVE_LOCK:
            _ACTIVE[(self.run_id, self.step_key)] = self

    @property
    def guarded(self) -> bool:
        return self.claim_result is not None and self.claim_result.fence is not None

    @property
    def lost(self) -> bool:
        return self._heartbeat is not None and self._heartbeat.lost

    def check_not_lost(self) -> None:
        """Raise before outputs are stored when another run took the claim over."""
        if self.lost:
            self._stop_heartbeat()
            self._unregister()
            self._settled = True
            raise self._lost_failure("a heartbeat found the claim taken over")

    def record_summary(self, summary: dict[str, Any] | None) -> None:
        """Validate what will be kept with the success (and replayed to later runs)."""
        try:
            encode_result(summary)
        except InvalidArgumentError as exc:
            raise Failure(
                description=(
                    f"rocky_dagster: step '{self.step_key}' returned a result the ledger cannot "
                    f"keep: {exc}. Guarded ops return a small JSON summary (counts, table names, "
                    "paths); pass large data through the warehouse or an IO manager."
                ),
                allow_retries=False,
            ) from exc
        self.summary = summary
        self.body_done = True

    def succeed(self) -> None:
        """Stamp the claim succeeded; called once the step's outputs are stored."""
        if not self.guarded or self._settled:
            return
        self._stop_heartbeat()
        if self.lost:
            self._settled = True
            self._unregister()
            raise self._lost_failure("a heartbeat found the claim taken over")
        claim = self.claim_result
        assert claim is not None and claim.fence is not None and self.ledger is not None
        try:
            result = self.ledger.finalize(
                claim.key, claim.fence, Outcome.SUCCEEDED, result=self.summary
            )
        except LedgerError as exc:
            # the work is done and stored: leave the stamp to the success hook / SUCCESS sensor
            self.op_ctx.log.warning(
                f"rocky_dagster: could not stamp ledger key '{claim.key}' succeeded ({exc}); the "
                "success hook or the run-status sensor will retry"
            )
            return
        self._settled = True
        self._unregister()
        if not result.applied:
            raise self._lost_failure(f"finalize was refused ({result.reason.value})")

    def fail(self, exc: BaseException) -> None:
        """Settle the claim after the body (or storing its outputs) raised."""
        if not self.guarded or self._settled:
            return
        self._stop_heartbeat()
        claim = self.claim_result
        assert claim is not None and claim.fence is not None and self.ledger is not None
        log = self.op_ctx.log
        try:
            if isinstance(exc, (DagsterExecutionInterruptedError, KeyboardInterrupt)):
                released = self.ledger.release(
                    claim.key,
                    run_id=self.run_id,
                    fence=claim.fence,
                    reason=f"run {self.run_id} was interrupted (canceled) during the work",
                )
                log.info(
                    f"rocky_dagster: run interrupted; released ledger key '{claim.key}'"
                    if released
                    else f"rocky_dagster: run interrupted; ledger key '{claim.key}' was already "
                    "released or taken over (nothing left to release)"
                )
            elif self._will_retry(exc):
                log.info(
                    f"rocky_dagster: attempt {self.op_ctx.retry_number + 1} failed; keeping the "
                    f"claim on '{claim.key}' for the retry (same run: it re-enters the claim)"
                )
            else:
                result = self.ledger.finalize(claim.key, claim.fence, Outcome.FAILED)
                log.info(
                    f"rocky_dagster: step failed; ledger key '{claim.key}' finalized failed "
                    f"({_after_failure(self.ledger)})"
                    if result.applied
                    else f"rocky_dagster: step failed; ledger key '{claim.key}' was not changed "
                    f"({result.reason.value}: another run or an operator settled it first)"
                )
        except LedgerError as err:
            log.warning(
                f"rocky_dagster: could not settle ledger key '{claim.key}' after the failure "
                f"({err}); the failure hook or run-status sensor will retry"
            )
            return
        self._settled = True
        self._unregister()

    def settle_from_hook(self, outcome: Outcome, log: Any) -> None:
        """A hook's backstop: settle what the wrapper could not (one-shot and fenced)."""
        if self._settled or not self.guarded:
            return
        self._stop_heartbeat()
        claim = self.claim_result
        assert claim is not None and claim.fence is not None and self.ledger is not None
        if outcome == Outcome.SUCCEEDED and not self.body_done:
            return
        result = self.ledger.finalize(
            claim.key,
            claim.fence,
            outcome,
            result=self.summary if outcome == Outcome.SUCCEEDED else None,
        )
        self._settled = True
        log.info(
            f"rocky_dagster: hook finalized ledger key '{claim.key}' {outcome.value} "
            f"({result.reason.value})"
        )

    def _will_retry(self, exc: BaseException) -> bool:
        return _compat.will_retry(self.op_ctx, exc)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _unregister(self) -> None:
        with _ACTIVE_LOCK:
            if _ACTIVE.get((self.run_id, self.step_key)) is self:
                del _ACTIVE[(self.run_id, self.step_key)]

    def _lost_failure(self, why: str) -> Failure:
        claim = self.claim_result
        assert claim is not None and self.ledger is not None
        entry = self.ledger.get(claim.key)
        holder = f" Run {entry.run_id} holds it now (fence {entry.fence})." if entry else ""
        return Failure(
            description=(
                f"rocky_dagster: step '{self.step_key}' lost its claim on ledger key "
                f"'{claim.key}' (fence {claim.fence}) while it ran: {why}. Its lease expired and "
                f"another run took the key over, so this run's work is NOT recorded.{holder} "
                f"See: rocky-dagster ledger history '{claim.key}'."
            ),
            metadata=self.metadata(),
            allow_retries=False,
        )

    # --- what people see -------------------------------------------------------------------------

    @property
    def decision(self) -> str:
        return self.claim_result.decision.value if self.claim_result else UNGUARDED

    def metadata(self) -> dict[str, Any]:
        """Step metadata: decision, key, fence, prior/holding run (linked), lease and expiry."""
        resolved = self.resolved
        meta: dict[str, Any] = {"rocky/decision": MetadataValue.text(self.decision)}
        if resolved is None or not resolved.guarded:
            meta["rocky/guarded"] = MetadataValue.bool(False)
            return meta
        claim = self.claim_result
        meta["rocky/ledger_key"] = MetadataValue.text(str(resolved.ledger_key))
        meta["rocky/key_source"] = MetadataValue.text(resolved.source.value)
        if self.ledger is not None:
            meta["rocky/ledger"] = MetadataValue.text(self.ledger.url)
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
            meta["rocky/lease_expires_at"] = _timestamp(claim.lease_expires_at)
        if claim.expires_at is not None:
            meta["rocky/expires_at"] = _timestamp(claim.expires_at)
        if self.reaped is not None:
            meta["rocky/reaped_run_id"] = MetadataValue.dagster_run(self.reaped[0])
        return meta

    def _tag(self, tags: dict[str, str], current: Mapping[str, str]) -> None:
        """Set run tags (overwriting: retries inherit their parent's), skipping what is there."""
        tags = {k: v for k, v in tags.items() if current.get(k) != v}
        if not tags:
            return
        try:
            _compat.add_run_tags(self.op_ctx.instance, self.run_id, tags)
        except Exception as exc:  # tags are for people; never fail the work over them
            self.op_ctx.log.warning(f"rocky_dagster: could not set run tags {tags}: {exc}")

    def _log_decision(self, claim: Claim) -> None:
        key = claim.key
        log = self.op_ctx.log
        if claim.decision == Decision.PROCEED:
            why = ""
            if claim.forced:
                why = f" (FORCED override of the record of run {claim.prior_run_id})"
            elif claim.prior_run_id == self.run_id:
                why = " (re-entered by an op retry of this run)"
            elif claim.prior_run_id:
                why = f" (after run {claim.prior_run_id})"
            log.info(
                f"rocky_dagster: claimed ledger key '{key}' (fence {claim.fence}){why}; running"
            )
        elif claim.decision == Decision.ADOPTED_STALE:
            log.warning(
                f"rocky_dagster: took over ledger key '{key}' (fence {claim.fence}) from run "
                f"{claim.prior_run_id}, whose lease had expired; running"
            )
        elif claim.decision == Decision.SKIPPED_COMPLETED:
            until = f" until {claim.expires_at.isoformat()}" if claim.expires_at else ""
            log.info(
                f"rocky_dagster: SKIPPED - ledger key '{key}' already completed in run "
                f"{claim.prior_run_id} (recorded{until}); no work done, its recorded result is "
                "replayed"
            )
        else:
            lease = f" (lease until {claim.lease_expires_at.isoformat()})"
            message = (
                f"rocky_dagster: SKIPPED - ledger key '{key}' is being worked on by run "
                f"{claim.held_by_run_id}{lease if claim.lease_expires_at else ''}; no work done "
                "here and this step's downstream steps are skipped"
            )
            # no output carries this step's metadata, so the line itself does (run link included)
            try:
                _compat.report_engine_event(
                    self.op_ctx.instance, message, self.op_ctx.run, self.metadata(), self.step_key
                )
            except Exception:
                log.warning(message)


def _timestamp(value: datetime) -> MetadataValue:
    return MetadataValue.timestamp(value)


def _after_failure(ledger: Ledger) -> str:
    if ledger.config.dedup_on.value == "success":
        return "claimable again at once under dedup_on='success'"
    return "final under dedup_on='any'"


def replay_value(claim: Claim) -> dict[str, Any]:
    """The output of a `skipped_completed` step: the recorded summary, marked as replayed."""
    recorded = dict(claim.result or {})
    return {**recorded, "replayed": True, "prior_run_id": claim.prior_run_id}
