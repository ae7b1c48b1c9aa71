"""One guarded step's lifecycle: claim → heartbeat → body → store outputs → stamp / fail.

Every guarded thing (`idempotent_op`, `idempotent_asset`, the pipeline ops, `quality_checks`)
runs its body inside `StepGuard.lifecycle()`::

    guard = StepGuard(context, ledger_resource, key_fn=..., fingerprint=...)
    with guard.lifecycle() as step:
        if not step.should_run:
            ...  # replay (skipped_completed) or yield nothing (skipped_in_flight)
            return
        yield from outputs_with(step.metadata())  # Dagster stores each one before resuming us
    # leaving the block normally means every output was stored: the claim is stamped succeeded

Leaving by an exception settles the claim: ``failed``, released (a cancel), or kept for an op
retry of the same run. When storing an output fails (an IO manager raising after the body
returned), Dagster never resumes the wrapper's generator and closes it instead: the
`GeneratorExit` is a failure, and Dagster's recorded step exception says whether a retry
follows. So a job is correct with no hooks attached; the ledger hooks and the run-status
sensors are backstops for what a step cannot do itself (a ledger write that failed, a killed
process).

While the body runs, a daemon thread also watches the step's run (`heartbeat.StepWatch`): when
its run worker is gone or the instance marked the run finished, it interrupts the body and the
step releases its claims ("stopped: ..."); when a heartbeat finds a claim lost, it interrupts the
body and the step fails "lost its claim".

A step holds one `KeyClaim` per ledger key, each with one explicit `ClaimState`: an op or a
single asset holds one (N = 1), a multi-asset step one per selected asset, a pipeline's checks
one per check. Every guarded path emits what its body produced through `StepGuard.emit`
(record the summary, check the claim is not lost, attach the claim's metadata), and the body
reaches its own guard through its context (`step_guard`, `proceeding_asset_keys`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetKey,
    AssetObservation,
    DagsterExecutionInterruptedError,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
)

from rocky_dagster import _compat
from rocky_dagster.ledger import (
    Claim,
    Decision,
    FingerprintMismatchError,
    InvalidArgumentError,
    Ledger,
    LedgerError,
    Outcome,
    State,
)
from rocky_dagster.ledger.model import encode_result
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.step.backfills import skip_replay
from rocky_dagster.step.heartbeat import Heartbeat, StepWatch, Stop
from rocky_dagster.step.key_inheritance import (
    KeyFn,
    job_key_fn,
    resolve_claim_key,
    tags_with_inherited_key,
)
from rocky_dagster.step.keys import KEY_TAG, KeySource, ResolvedKey, is_forced, resolve_key
from rocky_dagster.step.presentation import (
    DECISION_KEY,
    FAILED,
    RUN_TAGS,
    UNGUARDED,
    claim_metadata,
    decision_message,
    replay_value,
    replayed_metadata,
    unguarded_message,
)
from rocky_dagster.step.reconcile import FINISHED_STATUSES, reconcile_key

__all__ = [
    "UNGUARDED",
    "ClaimState",
    "KeyClaim",
    "KeyFn",
    "StepGuard",
    "proceeding_asset_keys",
    "replay_value",
    "running_claim",
    "step_guard",
    "take_active",
    "with_claim_metadata",
]


class ClaimState(StrEnum):
    """Where one key's claim is in the step's lifecycle."""

    NEW = "new"
    """Not asked yet."""
    UNGUARDED = "unguarded"
    """No key: the body runs without the ledger."""
    SKIPPED = "skipped"
    """The ledger said skip (done, or held by a live run): the body does not run."""
    RUNNING = "running"
    """Claimed and heartbeating: the body runs and its outputs are being stored."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"
    """Given back on a cancel: claimable at once."""
    RETRYING = "retrying"
    """Kept for an op retry of this run, which re-enters the claim."""
    LOST = "lost"
    """Another run took the key over (this run's lease had expired)."""
    UNSETTLED = "unsettled"
    """A ledger write failed: the hooks, the run-status sensors or the lease settle it."""

    @property
    def settled(self) -> bool:
        return self not in (ClaimState.NEW, ClaimState.RUNNING, ClaimState.UNSETTLED)


_ACTIVE: dict[tuple[str, str], StepGuard] = {}
_ACTIVE_LOCK = threading.Lock()


def step_guard(context: Any) -> StepGuard | None:
    """The guard of the step `context` runs in (None: not a guarded step of this process).

    Registered for the step (run id + step key) from its claim until every claim is settled, so
    its body, its helpers and the ledger hook reach it through the context they are given."""
    op_ctx = getattr(context, "op_execution_context", context)
    with _ACTIVE_LOCK:
        return _ACTIVE.get((op_ctx.run_id, _compat.step_key(op_ctx)))


def running_claim(context: Any) -> Claim | None:
    """The claim the running step holds and works under (None: unguarded or not running).

    A pipeline hands it to ``run(claim=...)``, so its warehouse writes commit together with
    the claim's effect marker (exactly once per key generation, even against a zombie)."""
    guard = step_guard(context)
    if guard is None:
        return None
    running = [c.claim for c in guard.claims if c.state == ClaimState.RUNNING and c.claim]
    if len(running) != 1 or getattr(running[0], "generation", None) is None:
        return None  # several claims (see pipeline_assets.effect_claim), or no generation
    return running[0]


def proceeding_asset_keys(context: Any) -> frozenset[AssetKey]:
    """The selected assets this run must produce: those whose ledger key proceeded (or that
    have no key). Call it in the body of an `idempotent_multi_asset`.

    Examples:
        .. code-block:: python

            @idempotent_multi_asset(specs=[AssetSpec("a"), AssetSpec("b")], can_subset=True)
            def both(context):
                for key in proceeding_asset_keys(context):
                    yield MaterializeResult(asset_key=key, metadata={"rows": build(key)})
    """
    guard = step_guard(context)
    if guard is None:
        raise RuntimeError(
            "proceeding_asset_keys(context) is for the body of an idempotent_multi_asset (or a "
            "pipeline_assets step) while it runs"
        )
    return frozenset(guard.proceeding_keys())


def take_active(run_id: str, step_key: str) -> StepGuard | None:
    """The guard of a step of this process whose claims are not all settled, removed."""
    with _ACTIVE_LOCK:
        return _ACTIVE.pop((run_id, step_key), None)


class KeyClaim:
    """One ledger key's claim within a step, from the claim to its one settling write."""

    def __init__(self, resolved: ResolvedKey, *, asset: AssetKey | None = None) -> None:
        self.resolved = resolved
        self.asset = asset
        self.asset_key = asset.to_user_string() if asset is not None else None
        self.state = ClaimState.NEW if resolved.guarded else ClaimState.UNGUARDED
        self.claim: Claim | None = None
        self.reaped_run_id: str | None = None
        self.summary: dict[str, Any] | None = None
        self.body_done = False
        self.heartbeat: Heartbeat | None = None

    @property
    def key(self) -> str:
        return str(self.resolved.ledger_key)

    @property
    def decision(self) -> str:
        return self.claim.decision.value if self.claim is not None else UNGUARDED

    @property
    def should_run(self) -> bool:
        return self.state in (ClaimState.UNGUARDED, ClaimState.RUNNING)

    def stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    @property
    def lost(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.lost


class StepGuard:
    """The claims of one guarded step and their lifecycle (see the module doc)."""

    def __init__(
        self,
        context: Any,
        resource: IdempotencyLedger,
        *,
        key_fn: KeyFn | None = None,
        fingerprint: str | None = None,
        pipeline: str | None = None,
        asset_keys: Sequence[AssetKey | str] | None = None,
        key_fn_subjects: Mapping[AssetKey, AssetKey] | None = None,
        skip_event: bool = False,
        resource_key: str = RESOURCE_KEY,
        input_state: Callable[[], str | None] | None = None,
        key_by_inputs: bool = True,
    ) -> None:
        """`asset_keys`: the assets the step materializes, one claim each, keyed
        ``<base>/<asset key>`` (a single asset is one; None: one claim for the step, keyed
        ``<base>/<step key>``). `key_fn`: ``key_fn(context)`` or ``key_fn(context, asset_key)``.
        `key_fn_subjects`: the asset a claim's `key_fn` is asked about, when the claim is not
        an asset's own (an asset check's claim asks about the asset it checks). `skip_event`:
        the step yields nothing when it skips (an asset-check op), so every skip is reported as
        a step engine event with its metadata. `resource_key`: where the ledger was bound (for
        the error naming it). `key_by_inputs`: an asset with no other key is keyed by what it
        reads (its upstream versions and `input_state()`, the state of what it reads from
        outside Dagster; see `asset_inputs_key`); False: it runs unguarded."""
        if not isinstance(resource, IdempotencyLedger):
            raise Failure(
                description=(
                    f"resource '{resource_key}' is a {type(resource).__name__}, not an "
                    f"IdempotencyLedger: bind resources={{'{resource_key}': IdempotencyLedger(...)}} "
                    "in Definitions or the job"
                ),
                allow_retries=False,
            )
        self.context = context
        self.op_ctx = getattr(context, "op_execution_context", context)
        self.resource = resource
        self.key_fn = key_fn
        self.fingerprint = fingerprint
        self.pipeline = pipeline
        self.asset_keys: list[AssetKey] | None = (
            None if asset_keys is None else [_asset_key(k) for k in asset_keys]
        )
        self.key_fn_subjects = dict(key_fn_subjects or {})
        self.skip_event = skip_event
        self.input_state = input_state
        self.key_by_inputs = key_by_inputs
        self.run_id: str = self.op_ctx.run_id
        self.step_key: str = _compat.step_key(self.op_ctx)
        self.ledger: Ledger | None = None
        self.claims: list[KeyClaim] = []
        self.by_asset: dict[AssetKey, KeyClaim] = {}
        self.watch: StepWatch | None = None

    # --- the one lifecycle ---------------------------------------------------------------------

    @contextmanager
    def lifecycle(self) -> Iterator[StepGuard]:
        """Claim on entry; on exit stamp (normal exit: outputs stored) or settle the failure."""
        try:
            self.claim()
        except BaseException as exc:
            self._disarm()
            self.fail(exc)  # the claims taken before a later key failed to resolve
            raise
        try:
            yield self
        except BaseException as exc:
            error = self._leave(exc)
            if error is exc:
                raise
            raise error from exc
        error = self._leave(None)
        if error is not None:
            raise error

    def _leave(self, exc: BaseException | None) -> BaseException | None:
        """Settle every claim as the step leaves its body; returns what the step raises.

        `exc`: what the body, or storing its outputs, raised (None: every output is stored).
        The watch is disarmed first, so nothing interrupts the step while it settles.
        """
        stop, late = self._disarm()
        if stop is not None and stop.interrupted and late is None and not _interrupt(exc):
            late = _absorb_interrupt()  # sent, not seen yet: let it land here, not in a write
        if late is not None and (stop is None or not stop.interrupted):
            exc = exc or late  # someone else's interrupt, landing as the body ended
        if exc is None:
            if stop is not None and not stop.lost:
                self.op_ctx.log.info(
                    f"rocky_dagster: step '{self.step_key}' finished its body before it could be "
                    f"stopped ({stop.why}); its outputs are stored, so its claim is stamped"
                )
            self.succeed()  # a lost claim raises "lost its claim" here
            return None
        if stop is None:
            self.fail(exc)
            return exc
        if stop.lost:
            error = exc
            try:
                self.check_not_lost("a heartbeat found the claim lost, and the body was stopped")
            except Failure as failure:
                error = failure
            self.fail(error)
            return exc if isinstance(exc, GeneratorExit) else error
        self.fail(exc, stopped=stop)
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt)):
            return exc
        return DagsterExecutionInterruptedError(
            f"rocky_dagster: step '{self.step_key}' stopped: {stop.why}"
        )

    def _disarm(self) -> tuple[Stop | None, BaseException | None]:
        """Disarm the step's watch: (why it stopped the step, or None; an interrupt that landed
        while disarming, or None)."""
        if self.watch is None:
            return None, None
        late: BaseException | None = None
        while True:
            try:
                return self.watch.disarm(), late
            except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
                late = exc  # the watch's own interrupt, sent just before the step disarmed it

    @property
    def primary(self) -> KeyClaim:
        """The step's claim (ops and single assets hold exactly one)."""
        return self.claims[0]

    @property
    def state(self) -> ClaimState:
        return self.primary.state

    @property
    def should_run(self) -> bool:
        return any(c.should_run for c in self.claims)

    @property
    def guarded(self) -> bool:
        return any(c.state != ClaimState.UNGUARDED for c in self.claims)

    @property
    def claim_result(self) -> Claim | None:
        return self.primary.claim if self.claims else None

    @property
    def resolved(self) -> ResolvedKey | None:
        return self.primary.resolved if self.claims else None

    @property
    def decision(self) -> str:
        return self.primary.decision

    # --- claim -------------------------------------------------------------------------------

    def claim(self) -> Claim | None:
        """Resolve every key and claim it; returns the first claim, None when unguarded.

        The guard is registered for its step first, so the body (`proceeding_asset_keys`,
        `running_claim`) and the hooks reach it."""
        with _ACTIVE_LOCK:
            _ACTIVE[(self.run_id, self.step_key)] = self
        tags = tags_with_inherited_key(self.op_ctx)
        force = is_forced(tags)
        key_fn = self.key_fn or job_key_fn(self.op_ctx)
        unguarded: list[KeyClaim] = []
        for asset in self.asset_keys if self.asset_keys is not None else [None]:
            resolved = resolve_claim_key(
                self.context,
                self.op_ctx,
                self.step_key,
                tags,
                key_fn=key_fn,
                asset=asset,
                subject=self.key_fn_subjects.get(asset, asset) if asset is not None else None,
                input_state=self.input_state,
                key_by_inputs=self.key_by_inputs,
            )
            held = KeyClaim(resolved, asset=asset)
            self.claims.append(held)
            if asset is not None:
                self.by_asset[asset] = held
            if not resolved.guarded:
                unguarded.append(held)
                continue
            self._claim_key(held, force=force)
            # the base goes on the run (and so on its retries) only when it names the whole
            # run: an op's own key_fn names that op's work, an asset partition that asset's
            run_wide = resolved.source.run_wide and not (
                resolved.source == KeySource.KEY_FN and self.key_fn is not None
            )
            assert held.claim is not None
            RUN_TAGS.note(
                self.op_ctx,
                self.run_id,
                held.claim.decision.value,
                {KEY_TAG: str(resolved.base)} if run_wide else None,
            )
        if unguarded:
            self.op_ctx.log.warning(self._unguarded_message(unguarded))
            RUN_TAGS.note(self.op_ctx, self.run_id, UNGUARDED)
        return self.primary.claim if self.claims else None

    def _unguarded_message(self, unguarded: list[KeyClaim]) -> str:
        if len(self.claims) == 1:
            return unguarded_message(self.step_key, asset=unguarded[0].asset is not None)
        names = ", ".join(str(held.asset_key) for held in unguarded)
        return (
            f"rocky_dagster: asset(s) {names} of step '{self.step_key}' have no idempotency key "
            "(no key_fn, no 'rocky/idempotency_key' or 'dagster/run_key' run tag, no "
            "partition): they run UNGUARDED, without the ledger"
        )

    @property
    def proceeding(self) -> list[KeyClaim]:
        """The claims whose work must be done (a multi-asset produces only these assets)."""
        return [c for c in self.claims if c.should_run]

    def proceeding_keys(self) -> list[AssetKey]:
        """The assets the body must produce (their key proceeded, or they have none)."""
        return [held.asset for held in self.proceeding if held.asset is not None]

    def claim_for(self, asset_key: AssetKey | str) -> KeyClaim:
        """The claim of one selected asset (or check) of the step."""
        held = self.by_asset.get(_asset_key(asset_key))
        if held is None:
            raise KeyError(f"step '{self.step_key}' holds no claim for asset {asset_key!r}")
        return held

    def _claim_key(self, held: KeyClaim, *, force: bool) -> None:
        key = held.key
        try:
            if self.ledger is None:
                self.ledger = self.resource.open()
            claim = self._ask(key, force)
            if (
                claim.decision == Decision.SKIPPED_IN_FLIGHT
                and claim.held_by_run_id
                and claim.held_by_run_id != self.run_id
                and self._reap(held, claim.held_by_run_id)
            ):
                claim = self._ask(key, force)
        except FingerprintMismatchError as exc:
            raise Failure(
                description=f"rocky_dagster: {exc}",
                metadata={"rocky/ledger_key": key},
                allow_retries=False,
            ) from exc
        except InvalidArgumentError as exc:
            raise Failure(
                description=f"rocky_dagster: cannot claim step '{self.step_key}': {exc}",
                metadata={"rocky/key_source": held.resolved.source.value},
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
        if claim.decision == Decision.SKIPPED_IN_FLIGHT and claim.held_by_run_id == self.run_id:
            raise self._own_attempt_holds(held, claim)
        held.claim = claim
        if claim.should_run and claim.fence is not None:
            held.state = ClaimState.RUNNING
            interval = self.ledger.config.heartbeat_interval_seconds
            if self.watch is None:
                self.watch = StepWatch(
                    self._run_gone_check(),
                    interval,
                    interruptible=threading.current_thread() is threading.main_thread(),
                )
                self.watch.start()
            held.heartbeat = Heartbeat(self.ledger, key, claim.fence, interval, self.watch)
            held.heartbeat.start()
        else:
            held.state = ClaimState.SKIPPED
        self._log_decision(held)

    def _own_attempt_holds(self, held: KeyClaim, claim: Claim) -> Failure:
        """This run's own earlier attempt of the step holds the key, in a process the ledger
        cannot check (another container or host): a Celery task or Dask future delivered
        again after its worker was lost. Skipping would let the run succeed without the work,
        and the run's success would stamp the key done; working would run it twice if that
        attempt is alive. So the step fails: a retry whose delay outlasts the lease adopts the
        claim; without one the run fails and its claim is settled as failed."""
        return Failure(
            description=(
                f"rocky_dagster: ledger key '{held.key}' is held by an earlier attempt of step "
                f"'{self.step_key}' in this same run, in a process not checkable from here, until "
                f"at least {claim.lease_expires_at}; "
                "it may still be working or its worker may be gone, so this attempt neither "
                "skips nor works: it fails. A RetryPolicy with a delay longer than the "
                "resource's lease_seconds retries after the lease ends and adopts the claim"
            ),
            metadata={
                "rocky/ledger_key": held.key,
                "rocky/decision": claim.decision.value,
            },
            allow_retries=True,
        )

    def _run_gone_check(self) -> Callable[[], str | None]:
        """The watch thread's test of whether this step's run is gone (see `StepWatch`).

        In a multiprocess executor's step process the run worker started this process: it is
        gone when the pipe it holds is closed (spawn and forkserver), or when this process was
        reparented (spawn, where it is the parent). The instance is asked whether it marked the
        run finished (an ephemeral instance lives in this process only: nobody else can mark it).
        """
        worker = _compat.run_worker_process(self.run_id)
        ppid = os.getppid() if worker is not None else None
        instance = self.op_ctx.instance
        ask_instance = not instance.is_ephemeral
        run_id = self.run_id

        def check() -> str | None:
            if worker is not None and (
                not worker.is_alive() or (ppid == worker.pid and os.getppid() != ppid)
            ):
                return f"its run worker (pid {worker.pid}) is gone"
            if ask_instance:
                run = instance.get_run_by_id(run_id)
                if run is not None and run.status in FINISHED_STATUSES:
                    return f"the instance marked run {run_id} {run.status.value}"
            return None

        return check

    def _ask(self, key: str, force: bool) -> Claim:
        assert self.ledger is not None
        return self.ledger.claim(
            key, self.run_id, pipeline=self.pipeline, fingerprint=self.fingerprint, force=force
        )

    def _reap(self, held: KeyClaim, holder_id: str) -> bool:
        """Settle the key on the spot when its holder run is finished in Dagster; True if so.

        A holder unknown to this instance is left alone: it may be alive in another deployment
        that shares the ledger, and its lease settles it either way.
        """
        assert self.ledger is not None
        holder = self.op_ctx.instance.get_run_by_id(holder_id)
        if holder is None or holder.status not in FINISHED_STATUSES:
            return False
        reconcile_key(
            self.ledger,
            held.key,
            holder_id,
            holder.status,
            reason=f"holder run {holder_id} is {holder.status.value}; reaped by run {self.run_id}",
        )
        held.reaped_run_id = holder_id
        self.op_ctx.log.info(
            f"rocky_dagster: ledger key '{held.key}' was held by run {holder_id}, which is "
            f"{holder.status.value} in Dagster: its claim was settled on the spot; claiming again"
        )
        return True

    def _log_decision(self, held: KeyClaim) -> None:
        assert held.claim is not None
        message = decision_message(held.claim, self.run_id)
        if message is None:
            return
        decision = held.claim.decision
        if decision == Decision.SKIPPED_IN_FLIGHT or (
            held.state == ClaimState.SKIPPED and self.skip_event
        ):
            # no output carries this step's metadata, so the line itself does (run link included)
            self._report(message, held)
            return
        if decision == Decision.ADOPTED_STALE:
            self.op_ctx.log.warning(message)
        else:
            self.op_ctx.log.info(message)

    # --- while the body runs -------------------------------------------------------------------

    def check_not_lost(self, why: str = "a heartbeat found the claim taken over") -> None:
        """Raise before outputs are stored when another run took a claim over."""
        for held in self.claims:
            if held.state == ClaimState.RUNNING and held.lost:
                held.stop_heartbeat()
                held.state = ClaimState.LOST
                self._unregister_if_settled()
                raise self._lost_failure(held, why)

    def record_summary(self, summary: dict[str, Any] | None, held: KeyClaim | None = None) -> None:
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
        target = held or self.primary
        target.summary = summary
        target.body_done = True

    def emit(self, event: Any, summary: dict[str, Any] | None, held: KeyClaim | None = None) -> Any:
        """What every guarded path does with one produced output (an `Output`, a
        `MaterializeResult`, an `AssetCheckResult`): record the summary its claim keeps, make
        sure the claim was not lost meanwhile (before Dagster stores it), and return the event
        carrying the claim's metadata."""
        self.record_summary(summary, held)
        self.check_not_lost()
        return with_claim_metadata(event, self.metadata(held))

    # --- assets ---------------------------------------------------------------------------------

    def observe_skips(self, context: Any, *, downstream: bool = True) -> None:
        """One observation per skipped asset: its decision and the run behind it.

        With `downstream`, the assets downstream of a skip in this run hear why too: Dagster
        does not start a step whose upstream asset yielded nothing, so this step says it for
        them (when the run's key names them too), or warns that one of them still has work.
        """
        skipped = [held for held in self.claims if not held.should_run and held.asset]
        for held in skipped:
            assert held.claim is not None and held.asset is not None
            context.log_event(
                AssetObservation(
                    asset_key=held.asset,
                    partition=held.resolved.partition,
                    description=decision_message(held.claim, self.run_id)
                    or f"rocky_dagster: materialization skipped ({held.decision})",
                    metadata=self.metadata(held),
                )
            )
        if downstream and skipped:
            self._observe_downstream(context, [h.asset for h in skipped if h.asset is not None])

    def replays(self, context: Any) -> Iterator[MaterializeResult]:
        """A materialization per skipped asset whose key is done, replaying the recorded one:
        in a backfill run (so the backfill counts it) or when the resource says
        `replay_skips` (so the catalog shows the skip); nothing elsewhere. See `backfills`."""
        everywhere = self.resource.replay_skips
        for held in self.claims:
            if held.should_run or held.asset is None or held.claim is None:
                continue
            replay = skip_replay(
                context,
                held.asset,
                held.resolved.partition,
                held.decision,
                self.metadata(held),
                everywhere=everywhere,
            )
            if replay is not None:
                yield replay

    def _observe_downstream(self, context: Any, skipped: list[AssetKey]) -> None:
        base = next((h.resolved for h in self.claims if h.resolved.source.run_wide), None)
        if base is None or self.ledger is None or base.source == KeySource.KEY_FN:
            return  # no run-wide key: the downstream steps' own keys are unknown here
        try:
            selection = _compat.run_asset_selection(context)
            seen, todo = set(self.by_asset), list(skipped)
            while todo:
                for child in _compat.asset_children(context, todo.pop()):
                    if child in seen or child not in selection:
                        continue
                    seen.add(child)
                    todo.append(child)
                    self._observe_for(context, child, base, skipped)
        except Exception as exc:  # people's information only: never fail the step over it
            self.op_ctx.log.warning(f"rocky_dagster: could not report downstream skips: {exc}")

    def _observe_for(
        self, context: Any, child: AssetKey, base: ResolvedKey, upstream: list[AssetKey]
    ) -> None:
        assert self.ledger is not None
        name = child.to_user_string()
        key = resolve_key(
            {KEY_TAG: str(base.base)}, name, partition=base.partition, asset_key=name
        ).ledger_key
        entry = self.ledger.get(str(key))
        names = ", ".join(k.to_user_string() for k in upstream)
        if entry is not None and entry.state == State.SUCCEEDED:
            context.log_event(
                AssetObservation(
                    asset_key=child,
                    partition=base.partition,
                    description=(
                        f"rocky_dagster: materialization skipped (skipped_completed); its step "
                        f"does not start because upstream {names} skipped"
                    ),
                    metadata={
                        DECISION_KEY: MetadataValue.text("skipped_completed"),
                        "rocky/ledger_key": MetadataValue.text(str(key)),
                        "rocky/prior_run_id": MetadataValue.dagster_run(entry.run_id),
                    },
                )
            )
        else:
            self.op_ctx.log.warning(
                f"rocky_dagster: asset '{name}' is not done under ledger key '{key}', but "
                f"Dagster will not start its step because upstream {names} was already done and "
                f"yielded nothing: re-execute this run from failure, or launch '{name}' on its "
                "own with the same key"
            )

    def stamp(self, asset_key: AssetKey | str) -> None:
        """Stamp one asset's claim now (its result is stored), before the step ends."""
        held = self.claim_for(asset_key)
        if held.state == ClaimState.RUNNING:
            self._stamp(held)

    def give_back(self, asset_key: AssetKey | str, why: str) -> None:
        """Release a proceeding asset's claim the body did not produce: the next run does it."""
        held = self.claim_for(asset_key)
        if held.state != ClaimState.RUNNING:
            return
        held.stop_heartbeat()
        claim = held.claim
        assert claim is not None and claim.fence is not None and self.ledger is not None
        try:
            self.ledger.release(claim.key, run_id=self.run_id, fence=claim.fence, reason=why)
        except LedgerError as exc:
            # Left in flight under a run that then succeeded, the claim would be stamped
            # succeeded by the SUCCESS sensor or the next run's reap: work never done would
            # count as done. Failing the step lets the FAILURE path settle it instead.
            held.state = ClaimState.UNSETTLED
            raise Failure(
                description=(
                    f"rocky_dagster: could not release ledger key '{claim.key}', which this run "
                    f"did not produce ({exc}); the step fails so that its run cannot be taken "
                    "as having done that work (the run-status sensor or the lease settles it)"
                ),
            ) from exc
        held.state = ClaimState.RELEASED

    # --- settling ------------------------------------------------------------------------------

    def succeed(self) -> None:
        """Stamp every running claim succeeded: the step's outputs are stored by now."""
        for held in self.claims:
            if held.state == ClaimState.RUNNING:
                self._stamp(held)
        self._unregister_if_settled()

    def _stamp(self, held: KeyClaim) -> None:
        held.stop_heartbeat()
        claim = held.claim
        assert claim is not None and claim.fence is not None and self.ledger is not None
        if held.lost:
            held.state = ClaimState.LOST
            raise self._lost_failure(held, "a heartbeat found the claim taken over")
        try:
            result = self.ledger.finalize(
                claim.key, claim.fence, Outcome.SUCCEEDED, result=held.summary
            )
        except LedgerError as exc:
            # the work is done and stored: the hook, the SUCCESS sensor or the next run's reap
            # stamps it (a finished SUCCESS holder is settled as succeeded)
            held.state = ClaimState.UNSETTLED
            held.body_done = True
            self.op_ctx.log.warning(
                f"rocky_dagster: could not stamp ledger key '{claim.key}' succeeded ({exc}); the "
                "success hook or the run-status sensor will"
            )
            return
        if not result.applied:
            held.state = ClaimState.LOST
            raise self._lost_failure(held, f"finalize was refused ({result.reason.value})")
        held.state = ClaimState.SUCCEEDED

    def fail(self, exc: BaseException, *, stopped: Stop | None = None) -> None:
        """Settle every running claim after the body, or storing its outputs, raised `exc`
        (`stopped`: the step's watch stopped it because its run is gone: release them)."""
        if isinstance(exc, GeneratorExit):
            # Dagster closed the generator without resuming it: storing an output failed (or
            # the step was abandoned). The step's recorded exception says why.
            exc = _compat.step_exception(self.op_ctx) or Exception("storing outputs failed")
        for held in self.claims:
            if held.state == ClaimState.RUNNING:
                self._settle_failure(held, exc, stopped)
        self._unregister_if_settled()

    def _settle_failure(
        self, held: KeyClaim, exc: BaseException, stopped: Stop | None = None
    ) -> None:
        held.stop_heartbeat()
        claim = held.claim
        assert claim is not None and claim.fence is not None and self.ledger is not None
        report = lambda message: self._report(message, held)  # noqa: E731
        try:
            if stopped is not None or _interrupt(exc):
                # the work neither succeeded nor failed: free the key for the next run
                if stopped is not None:
                    what = f"step '{self.step_key}' stopped: {stopped.why}"
                    reason = f"run {self.run_id}: {what}"
                else:
                    what = "run interrupted"
                    reason = f"run {self.run_id} was interrupted (canceled) during the work"
                released = self.ledger.release(
                    claim.key, run_id=self.run_id, fence=claim.fence, reason=reason
                )
                held.state = ClaimState.RELEASED
                report(
                    f"rocky_dagster: {what}; "
                    + (
                        f"released ledger key '{claim.key}'"
                        if released
                        else f"ledger key '{claim.key}' was already released or taken over "
                        "(nothing left to release)"
                    )
                )
            elif _compat.will_retry(self.op_ctx, exc):
                # parked: the retry (maybe another process) may re-enter it, as no process
                # of this run works on it any more; an unparked live claim it would skip
                kept = self.ledger.keep_for_retry(claim.key, claim.fence)
                held.state = ClaimState.RETRYING
                report(
                    f"rocky_dagster: attempt {self.op_ctx.retry_number + 1} failed; keeping the "
                    f"claim on '{claim.key}' for the retry (same run: it re-enters the claim)"
                    if kept
                    else f"rocky_dagster: attempt {self.op_ctx.retry_number + 1} failed; the "
                    f"claim on '{claim.key}' was already taken over or settled (nothing to keep)"
                )
            else:
                result = self.ledger.finalize(claim.key, claim.fence, Outcome.FAILED)
                held.state = ClaimState.FAILED
                RUN_TAGS.note(self.op_ctx, self.run_id, FAILED)
                report(
                    f"rocky_dagster: step failed; ledger key '{claim.key}' finalized failed "
                    f"({_after_failure(self.ledger)})"
                    if result.applied
                    else f"rocky_dagster: step failed; ledger key '{claim.key}' was not changed "
                    f"({result.reason.value}: another run or an operator settled it first)"
                )
        except LedgerError as err:
            held.state = ClaimState.UNSETTLED
            self.op_ctx.log.warning(
                f"rocky_dagster: could not settle ledger key '{claim.key}' after the failure "
                f"({err}); the failure hook or run-status sensor will"
            )

    def _report(self, message: str, held: KeyClaim) -> None:
        """A line in the step's log carrying the claim's metadata (a step with no output)."""
        try:
            _compat.report_engine_event(
                self.op_ctx.instance, message, self.op_ctx.run, self.metadata(held), self.step_key
            )
        except Exception:
            self.op_ctx.log.info(message)

    def settle_from_hook(self, outcome: Outcome, log: Any) -> None:
        """A hook's backstop: settle what the step could not (one-shot and fenced)."""
        assert self.ledger is not None
        for held in self.claims:
            if held.state not in (ClaimState.RUNNING, ClaimState.UNSETTLED):
                continue
            if outcome == Outcome.SUCCEEDED and not held.body_done:
                continue
            held.stop_heartbeat()
            claim = held.claim
            assert claim is not None and claim.fence is not None
            result = self.ledger.finalize(
                claim.key,
                claim.fence,
                outcome,
                result=held.summary if outcome == Outcome.SUCCEEDED else None,
            )
            held.state = ClaimState.SUCCEEDED if outcome == Outcome.SUCCEEDED else ClaimState.FAILED
            log.info(
                f"rocky_dagster: hook finalized ledger key '{claim.key}' {outcome.value} "
                f"({result.reason.value})"
            )

    def _unregister_if_settled(self) -> None:
        if any(not c.state.settled for c in self.claims):
            return  # running or unsettled: the hook may still need this guard
        with _ACTIVE_LOCK:
            if _ACTIVE.get((self.run_id, self.step_key)) is self:
                del _ACTIVE[(self.run_id, self.step_key)]

    def _lost_failure(self, held: KeyClaim, why: str) -> Failure:
        claim = held.claim
        assert claim is not None and self.ledger is not None
        return Failure(
            description=(
                f"rocky_dagster: step '{self.step_key}' lost its claim on ledger key "
                f"'{claim.key}' (fence {claim.fence}) while it ran: {why}. "
                f"{self._lost_because(claim.key, claim.fence)}, so this run's work is NOT "
                f"recorded. See: rocky-dagster ledger history '{claim.key}'."
            ),
            metadata=self.metadata(held),
            allow_retries=False,
        )

    def _lost_because(self, key: str, fence: int | None) -> str:
        """What became of a lost claim, from the key's entry now (for the failure message)."""
        assert self.ledger is not None
        try:
            entry = self.ledger.get(key)
        except LedgerError as exc:
            return f"The ledger cannot say what became of it ({exc})"
        if entry is None:
            return "It was released or reset (an operator, or a sensor for a finished run)"
        if entry.fence != fence:
            return (
                f"Run {entry.run_id} holds the key now (fence {entry.fence}): the lease expired "
                "and it was adopted, or it was forced"
            )
        if entry.released:
            return "It was released (an operator, or a sensor for a finished run)"
        if entry.state != State.IN_FLIGHT:
            return f"It was settled {entry.state.value} by someone else (a sensor or an operator)"
        return "Its in_flight_ttl_hours cap passed, so its lease can no longer be renewed"

    # --- what people see -----------------------------------------------------------------------

    def metadata(self, held: KeyClaim | None = None) -> dict[str, Any]:
        """The claim's step metadata (decision, key, fence, linked runs; replayed values)."""
        held = held or self.primary
        meta = claim_metadata(
            held.resolved,
            held.claim,
            ledger_url=self.ledger.url if self.ledger is not None else None,
            reaped_run_id=held.reaped_run_id,
        )
        if held.claim is not None and held.claim.decision == Decision.SKIPPED_COMPLETED:
            meta.update(replayed_metadata(held.claim.result))
        return meta


def _asset_key(value: AssetKey | str) -> AssetKey:
    return value if isinstance(value, AssetKey) else AssetKey.from_user_string(value)


def with_claim_metadata(event: Any, meta: Mapping[str, Any]) -> Any:
    """`event` (an `Output`, a `MaterializeResult` or an `AssetCheckResult`) with `meta` added
    to its own metadata."""
    if isinstance(event, Output):
        return event.with_metadata({**event.metadata, **meta})
    if isinstance(event, MaterializeResult):
        return MaterializeResult(
            asset_key=event.asset_key,
            metadata={**(event.metadata or {}), **meta},
            check_results=event.check_results,
            data_version=event.data_version,
            tags=event.tags,
            value=event.value,
        )
    if isinstance(event, AssetCheckResult):
        return AssetCheckResult(
            asset_key=event.asset_key,
            check_name=event.check_name,
            passed=event.passed,
            severity=event.severity,
            metadata={**(event.metadata or {}), **meta},
            description=event.description,
        )
    raise TypeError(f"rocky_dagster: cannot attach claim metadata to a {type(event).__name__}")


def _interrupt(exc: BaseException | None) -> bool:
    return isinstance(exc, (DagsterExecutionInterruptedError, KeyboardInterrupt))


def _absorb_interrupt() -> BaseException | None:
    """Let an interrupt the watch just sent land now (it is raised at the next bytecode, or
    wakes this sleep), rather than in the middle of a ledger write; returns it if it did."""
    try:
        time.sleep(0.01)
    except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
        return exc
    return None


def _after_failure(ledger: Ledger) -> str:
    if ledger.config.dedup_on.value == "success":
        return "claimable again at once under dedup_on='success'"
    return "final under dedup_on='any'"


def recorded_outputs(claim: Claim, output_names: list[str]) -> Mapping[str, Any]:
    """What a `skipped_completed` step yields per output: the recorded values, marked replayed."""
    if len(output_names) == 1:
        return {output_names[0]: replay_value(claim)}
    recorded = claim.result or {}
    values: dict[str, Any] = {}
    for name in output_names:
        if name not in recorded:
            continue  # that output was not produced by the run that succeeded
        value = recorded[name]
        if isinstance(value, dict):
            value = {**value, "replayed": True, "prior_run_id": claim.prior_run_id}
        values[name] = value
    return values
