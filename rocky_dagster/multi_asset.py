"""Guarding a step that materializes several assets: one ledger key per selected asset.

`idempotent_multi_asset` wraps a ``@multi_asset`` (can_subset included); `pipeline_assets` is
built on the same `AssetsGuard`. The step claims ``<base key>/<asset key>`` (the partition
folded in) for each selected asset; assets whose key is done or held elsewhere are *skipped*:
they materialize nothing and carry an `AssetObservation` with the decision and the run that did
(or does) the work. The body learns which assets it must produce from
`proceeding_asset_keys(context)` — and the context it receives already reports only those in
``selected_asset_keys``, so a body written for subsetting (dbt, sling, dlt style) needs no
change. Each produced asset's claim is stamped once its materialization is stored; a proceeding
asset the body did not produce is released, so the next run does it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    multi_asset,
)

from . import _compat
from .backfills import backfill_replay
from .guard import KeyClaim, StepGuard
from .key_inheritance import job_key_fn, partition_of, tags_with_inherited_key
from .keys import GUARDED_OP_TAG, KEY_TAG, KeySource, is_forced, resolve_key
from .ledger import Claim, InvalidArgumentError
from .presentation import DECISION_KEY, RUN_TAGS, UNGUARDED
from .resource import IdempotencyLedger

AssetKeyFn = Callable[..., "str | None"]
"""``key_fn(context, asset_key) -> str | None`` (or ``key_fn(context)``): a base key per asset."""

_PROCEEDING: dict[tuple[str, str], frozenset[AssetKey]] = {}
_PROCEEDING_LOCK = threading.Lock()


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
    op_ctx = getattr(context, "op_execution_context", context)
    with _PROCEEDING_LOCK:
        found = _PROCEEDING.get((op_ctx.run_id, _step_key(op_ctx)))
    if found is None:
        raise RuntimeError(
            "proceeding_asset_keys(context) is for the body of an idempotent_multi_asset (or a "
            "pipeline_assets step) while it runs"
        )
    return found


def _step_key(op_ctx: Any) -> str:
    return _compat.step_key(op_ctx)


class AssetsGuard(StepGuard):
    """The claims of one multi-asset step, one per selected asset (see the module doc)."""

    def __init__(
        self,
        context: Any,
        resource: IdempotencyLedger,
        *,
        asset_keys: Sequence[AssetKey],
        key_fn: AssetKeyFn | None = None,
        fingerprint: str | None = None,
        pipeline: str | None = None,
        key_fn_subjects: Mapping[AssetKey, AssetKey] | None = None,
    ) -> None:
        """`key_fn_subjects`: the asset a claim's `key_fn` is asked about, when the claim is
        not an asset's own (an asset check's claim asks about the asset it checks)."""
        super().__init__(context, resource, fingerprint=fingerprint, pipeline=pipeline)
        self.asset_keys = list(asset_keys)
        self.asset_key_fn = key_fn
        self.key_fn_subjects = dict(key_fn_subjects or {})
        self.by_asset: dict[AssetKey, KeyClaim] = {}

    def claim(self) -> Claim | None:
        """Claim every selected asset's key; the proceeding set is published for the body."""
        tags = tags_with_inherited_key(self.op_ctx)
        force = is_forced(tags)
        partition = partition_of(self.op_ctx)
        key_fn = self.asset_key_fn or job_key_fn(self.op_ctx.job_name)
        unguarded: list[str] = []
        for asset_key in self.asset_keys:
            name = asset_key.to_user_string()
            subject = self.key_fn_subjects.get(asset_key, asset_key)
            user_key = _call_key_fn(key_fn, self.context, subject) if key_fn else None
            try:
                resolved = resolve_key(
                    tags, name, user_key=user_key, partition=partition, asset_key=name
                )
            except InvalidArgumentError as exc:
                raise Failure(
                    description=f"rocky_dagster: bad idempotency key for asset '{name}': {exc}",
                    allow_retries=False,
                ) from exc
            held = KeyClaim(resolved, asset_key=name)
            self.claims.append(held)
            self.by_asset[asset_key] = held
            if not resolved.guarded:
                unguarded.append(name)
                continue
            self._claim_key(held, force=force)
            assert held.claim is not None
            run_wide = resolved.source in (KeySource.TAG, KeySource.RUN_KEY)
            RUN_TAGS.note(
                self.op_ctx,
                self.run_id,
                held.claim.decision.value,
                {KEY_TAG: str(resolved.base)} if run_wide else None,
            )
        if unguarded:
            self.op_ctx.log.warning(
                f"rocky_dagster: asset(s) {', '.join(unguarded)} of step '{self.step_key}' have "
                "no idempotency key (no key_fn, no 'rocky/idempotency_key' or 'dagster/run_key' "
                "run tag, no partition): they run UNGUARDED, without the ledger"
            )
            RUN_TAGS.note(self.op_ctx, self.run_id, UNGUARDED)
        with _PROCEEDING_LOCK:
            _PROCEEDING[(self.run_id, self.step_key)] = frozenset(self.proceeding_keys())
        return None

    def proceeding_keys(self) -> list[AssetKey]:
        return [key for key in self.asset_keys if self.by_asset[key].should_run]

    def skipped_keys(self) -> list[AssetKey]:
        return [key for key in self.asset_keys if not self.by_asset[key].should_run]

    def observe_skips(self, context: Any) -> None:
        """One observation per skipped asset: its decision and the run behind it.

        Dagster does not start a step whose upstream asset yielded nothing, so the assets
        downstream of a skip in this run never get to say why: this step says it for them
        (when the run's key names them too), or warns that one of them still has work to do.
        """
        partition = partition_of(self.op_ctx)
        for asset_key in self.skipped_keys():
            held = self.by_asset[asset_key]
            context.log_event(
                AssetObservation(
                    asset_key=asset_key,
                    partition=partition,
                    description=f"rocky_dagster: materialization skipped ({held.decision})",
                    metadata=self.metadata(held),
                )
            )
        self._observe_downstream(context, partition)

    def backfill_replays(self, context: Any) -> Iterator[MaterializeResult]:
        """In a backfill run, a materialization per skipped asset whose key is done, so the
        backfill counts it (see `backfills`); nothing elsewhere."""
        partition = partition_of(self.op_ctx)
        for asset_key in self.skipped_keys():
            held = self.by_asset[asset_key]
            replay = backfill_replay(
                context, asset_key, partition, held.decision, self.metadata(held)
            )
            if replay is not None:
                yield replay

    def _observe_downstream(self, context: Any, partition: str | None) -> None:
        skipped = self.skipped_keys()
        if not skipped or self.ledger is None:
            return
        base = next(
            (
                held.resolved
                for held in self.claims
                if held.resolved.source in (KeySource.TAG, KeySource.RUN_KEY)
            ),
            None,
        )
        if base is None:
            return  # no run-wide key: the downstream steps' own keys are unknown here
        try:
            selection = _compat.run_asset_selection(context)
            seen, todo = set(self.asset_keys), list(skipped)
            while todo:
                for child in _compat.asset_children(context, todo.pop()):
                    if child in seen or child not in selection:
                        continue
                    seen.add(child)
                    todo.append(child)
                    self._observe_for(context, child, str(base.base), partition, skipped)
        except Exception as exc:  # people's information only: never fail the step over it
            self.op_ctx.log.warning(f"rocky_dagster: could not report downstream skips: {exc}")

    def _observe_for(
        self,
        context: Any,
        child: AssetKey,
        base: str,
        partition: str | None,
        upstream: list[AssetKey],
    ) -> None:
        assert self.ledger is not None
        key = resolve_key(
            {KEY_TAG: base},
            child.to_user_string(),
            partition=partition,
            asset_key=child.to_user_string(),
        ).ledger_key
        entry = self.ledger.get(str(key))
        names = ", ".join(k.to_user_string() for k in upstream)
        if entry is not None and entry.state.value == "succeeded":
            context.log_event(
                AssetObservation(
                    asset_key=child,
                    partition=partition,
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
                f"rocky_dagster: asset '{child.to_user_string()}' is not done under ledger key "
                f"'{key}', but Dagster will not start its step because upstream {names} was "
                "already done and yielded nothing: re-execute this run from failure, or launch "
                f"'{child.to_user_string()}' on its own with the same key"
            )

    def stamp(self, asset_key: AssetKey) -> None:
        """Stamp one asset's claim now (its result is stored), before the step ends."""
        held = self.by_asset[asset_key]
        if held.state.value == "running":
            self._stamp(held)

    def give_back(self, asset_key: AssetKey, why: str) -> None:
        """Release a proceeding asset's claim the body did not produce: the next run does it."""
        held = self.by_asset[asset_key]
        if held.state.value != "running" or held.claim is None or self.ledger is None:
            return
        held.stop_heartbeat()
        assert held.claim.fence is not None
        self.ledger.release(held.key, run_id=self.run_id, fence=held.claim.fence, reason=why)
        from .guard import ClaimState

        held.state = ClaimState.RELEASED

    def forget(self) -> None:
        with _PROCEEDING_LOCK:
            _PROCEEDING.pop((self.run_id, self.step_key), None)


def _call_key_fn(key_fn: AssetKeyFn, context: Any, asset_key: AssetKey) -> str | None:
    """Call a per-asset ``key_fn(context, asset_key)``, or a run-wide ``key_fn(context)``."""
    try:
        takes_asset = len(inspect.signature(key_fn).parameters) >= 2
    except (TypeError, ValueError):
        takes_asset = False
    value = key_fn(context, asset_key) if takes_asset else key_fn(context)
    if value is not None and not isinstance(value, str):
        raise Failure(
            description=(
                f"rocky_dagster: key_fn returned {type(value).__name__} for asset "
                f"'{asset_key.to_user_string()}'; it must return a str key or None"
            ),
            allow_retries=False,
        )
    return value


class _ProceedingContext:
    """The step's context, reporting only the proceeding assets as selected: a body written
    for subsetting then produces exactly what the ledger let through."""

    def __init__(self, context: AssetExecutionContext, proceeding: frozenset[AssetKey]) -> None:
        self._context = context
        self._proceeding = proceeding

    @property
    def selected_asset_keys(self) -> frozenset[AssetKey]:
        return self._proceeding

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def idempotent_multi_asset(
    *,
    specs: Sequence[Any],
    name: str | None = None,
    can_subset: bool = False,
    partitions_def: Any = None,
    group_name: str | None = None,
    op_tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    retry_policy: Any = None,
    code_version: str | None = None,
    key_fn: AssetKeyFn | None = None,
    fingerprint_fn: Callable[[Any], str | None] | None = None,
) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """``@multi_asset`` guarded by the idempotency ledger (resource ``ledger``), per asset.

    Every spec is made skippable (a done asset materializes nothing). The body receives a
    context whose ``selected_asset_keys`` are the assets it must produce (also given by
    `proceeding_asset_keys`) and yields a `MaterializeResult` (or `Output`) for each; the
    body does not run at all when every selected asset skipped.

    Args:
        specs: the `AssetSpec` s, as for ``@multi_asset``.
        key_fn: ``key_fn(context, asset_key) -> str | None`` (or ``key_fn(context)``): a base
            key per asset; e.g. `input_versions_key`. Default: the run's tags, then partition.
        fingerprint_fn: ``fingerprint_fn(context) -> str | None`` for the mismatch check.

    Examples:
        .. code-block:: python

            @idempotent_multi_asset(specs=[AssetSpec("orders"), AssetSpec("customers")],
                                    can_subset=True)
            def shop(context):
                for key in context.selected_asset_keys:  # only the ones to produce
                    yield MaterializeResult(asset_key=key, metadata={"rows": copy(key)})
    """

    def decorate(body: Callable[..., Any]) -> AssetsDefinition:
        if inspect.iscoroutinefunction(body) or inspect.isasyncgenfunction(body):
            raise TypeError(f"idempotent_multi_asset {body.__name__!r}: async bodies unsupported")
        skippable = [spec.replace_attributes(skippable=True) for spec in specs]
        tags = {**(op_tags or {}), GUARDED_OP_TAG: "true"}

        @multi_asset(
            specs=skippable,
            name=name or body.__name__,
            can_subset=can_subset,
            partitions_def=partitions_def,
            group_name=group_name,
            op_tags=tags,
            description=description or body.__doc__,
            retry_policy=retry_policy,
            code_version=code_version,
        )
        def _guarded(context, ledger: IdempotencyLedger) -> Iterator[Any]:
            selected = sorted(context.selected_asset_keys, key=lambda k: k.to_user_string())
            guard = AssetsGuard(
                context,
                ledger,
                asset_keys=selected,
                key_fn=key_fn,
                fingerprint=fingerprint_fn(context) if fingerprint_fn else None,
                pipeline=name or body.__name__,
            )
            try:
                with guard.lifecycle():
                    guard.observe_skips(context)
                    yield from guard.backfill_replays(context)
                    proceeding = frozenset(guard.proceeding_keys())
                    if not proceeding:
                        return
                    produced: set[AssetKey] = set()
                    result = body(_ProceedingContext(context, proceeding))
                    events = result if inspect.isgenerator(result) else _as_events(result)
                    for event in events:
                        key = _materialized_key(event, context)
                        if key is None:
                            yield event
                            continue
                        if key not in proceeding:
                            raise Failure(
                                description=(
                                    f"rocky_dagster: the body produced asset "
                                    f"'{key.to_user_string()}', whose ledger key was not "
                                    "claimed by this run (it skipped, or was not selected); "
                                    "produce only proceeding_asset_keys(context)"
                                ),
                                allow_retries=False,
                            )
                        held = guard.by_asset[key]
                        guard.record_summary(_summary(key, event), held)
                        guard.check_not_lost()
                        produced.add(key)
                        yield _with_metadata(event, guard.metadata(held))
                    for key in sorted(proceeding - produced, key=lambda k: k.to_user_string()):
                        guard.give_back(
                            key, f"run {context.run.run_id} did not produce {key.to_user_string()}"
                        )
            finally:
                guard.forget()

        return _guarded

    return decorate


def _as_events(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, (list, tuple)):
        return list(result)
    return [result]


def _materialized_key(event: Any, context: AssetExecutionContext) -> AssetKey | None:
    if isinstance(event, MaterializeResult):
        if event.asset_key is None:
            raise Failure(
                description="a multi-asset body must name asset_key= in each MaterializeResult",
                allow_retries=False,
            )
        return AssetKey.from_coercible(event.asset_key)
    if isinstance(event, Output):
        return context.asset_key_for_output(event.output_name)
    return None


def _with_metadata(event: Any, meta: Mapping[str, Any]) -> Any:
    if isinstance(event, MaterializeResult):
        return MaterializeResult(
            asset_key=event.asset_key,
            metadata={**(event.metadata or {}), **meta},
            check_results=event.check_results,
            data_version=event.data_version,
            tags=event.tags,
            value=event.value,
        )
    return event.with_metadata({**event.metadata, **meta})


def _summary(key: AssetKey, event: Any) -> dict[str, Any]:
    """What the ledger keeps with an asset's success: its key and its plain metadata values."""
    summary: dict[str, Any] = {"asset_key": key.to_user_string()}
    for label, value in (getattr(event, "metadata", None) or {}).items():
        raw = getattr(value, "value", value)
        if isinstance(raw, (str, int, float, bool)) or raw is None:
            summary[label] = raw
    return summary
