"""Guarding a step that materializes several assets: one ledger key per selected asset.

`idempotent_multi_asset` wraps a ``@multi_asset`` (can_subset included); `pipeline_assets` is
built on the same `StepGuard`. The step claims ``<base key>/<asset key>`` (the partition
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    Output,
    multi_asset,
)

from rocky_dagster.resource import RESOURCE_KEY
from rocky_dagster.step.guard import StepGuard, proceeding_asset_keys
from rocky_dagster.step.key_inheritance import CLAIMS_PER_ASSET
from rocky_dagster.step.keys import CLAIMS_TAG, GUARDED_OP_TAG

__all__ = ["AssetKeyFn", "idempotent_multi_asset", "proceeding_asset_keys"]

AssetKeyFn = Callable[..., "str | None"]
"""``key_fn(context, asset_key) -> str | None`` (or ``key_fn(context)``): a base key per asset."""


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
    resource_key: str = RESOURCE_KEY,
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
        resource_key: the resource key of the `IdempotencyLedger` (default ``"ledger"``).

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
        tags = {**(op_tags or {}), GUARDED_OP_TAG: "true", CLAIMS_TAG: CLAIMS_PER_ASSET}

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
            required_resource_keys={resource_key},
        )
        def _guarded(context) -> Iterator[Any]:
            guard = StepGuard(
                context,
                getattr(context.resources, resource_key),
                asset_keys=sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()),
                key_fn=key_fn,
                fingerprint=fingerprint_fn(context) if fingerprint_fn else None,
                pipeline=name or body.__name__,
                resource_key=resource_key,
            )
            with guard.lifecycle():
                guard.observe_skips(context)
                yield from guard.replays(context)
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
                                f"'{key.to_user_string()}', whose ledger key was not claimed "
                                "by this run (it skipped, or was not selected); produce only "
                                "proceeding_asset_keys(context)"
                            ),
                            allow_retries=False,
                        )
                    produced.add(key)
                    yield guard.emit(event, _summary(key, event), guard.claim_for(key))
                for key in sorted(proceeding - produced, key=lambda k: k.to_user_string()):
                    guard.give_back(
                        key, f"run {context.run.run_id} did not produce {key.to_user_string()}"
                    )

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


def _summary(key: AssetKey, event: Any) -> dict[str, Any]:
    """What the ledger keeps with an asset's success: its key and its plain metadata values."""
    summary: dict[str, Any] = {"asset_key": key.to_user_string()}
    for label, value in (getattr(event, "metadata", None) or {}).items():
        raw = getattr(value, "value", value)
        if isinstance(raw, (str, int, float, bool)) or raw is None:
            summary[label] = raw
    return summary
