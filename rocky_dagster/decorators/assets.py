"""`idempotent_asset`: an ``@asset`` materialized at most once per key and partition.

The key comes from a `key_fn`, the run's ``rocky/idempotency_key`` tag or ``dagster/run_key``,
and otherwise — for a partitioned asset — from ``<asset key>/<partition key>``, so a backfill
launched twice materializes each partition once. A skipped asset yields no materialization
(its downstream assets in the run are skipped too) and logs an `AssetObservation` carrying the
decision, the ledger key and the run that holds or completed it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, overload

from dagster import AssetsDefinition, MaterializeResult, Output, asset

from rocky_dagster.decorators.ops import FingerprintFn, guarded_signature, present_as
from rocky_dagster.resource import RESOURCE_KEY
from rocky_dagster.step.guard import KeyFn, StepGuard
from rocky_dagster.step.key_inheritance import CLAIMS_PER_ASSET
from rocky_dagster.step.keys import CLAIMS_TAG, GUARDED_OP_TAG


@overload
def idempotent_asset(fn: Callable[..., Any]) -> AssetsDefinition: ...


@overload
def idempotent_asset(
    fn: None = None,
    *,
    key_fn: KeyFn | None = None,
    fingerprint_fn: FingerprintFn | None = None,
    resource_key: str = RESOURCE_KEY,
    **asset_kwargs: Any,
) -> Callable[[Callable[..., Any]], AssetsDefinition]: ...


def idempotent_asset(
    fn: Callable[..., Any] | None = None,
    *,
    key_fn: KeyFn | None = None,
    fingerprint_fn: FingerprintFn | None = None,
    resource_key: str = RESOURCE_KEY,
    **asset_kwargs: Any,
) -> AssetsDefinition | Callable[[Callable[..., Any]], AssetsDefinition]:
    """``@asset`` guarded by the idempotency ledger (resource ``ledger``).

    Accepts every ``@asset`` argument (`partitions_def`, `deps`, `key_prefix`, `group_name`,
    `check_specs`, `retry_policy`, ...) except `output_required`, which is always False so a
    skip can yield nothing. The body may return a value, an `Output` or a `MaterializeResult`,
    or yield events, exactly as in ``@asset``.

    Args:
        key_fn: ``key_fn(context) -> str | None``, the asset's own base key (None: defer to the
            run tags, then the partition).
        fingerprint_fn: ``fingerprint_fn(context) -> str | None`` for the mismatch check.
        resource_key: the resource key of the `IdempotencyLedger` (default ``"ledger"``); a
            body parameter of that name receives it too.
    """
    if "output_required" in asset_kwargs:
        raise TypeError("idempotent_asset sets output_required=False itself; do not pass it")

    def decorate(body: Callable[..., Any]) -> AssetsDefinition:
        if inspect.iscoroutinefunction(body) or inspect.isasyncgenfunction(body):
            raise TypeError(f"idempotent_asset {body.__name__!r}: async bodies are not supported")
        signature, takes_context, passes_ledger = guarded_signature(body, True, resource_key)

        def guarded(context: Any, **kwargs: Any) -> Iterator[Any]:
            resource = kwargs[resource_key] if passes_ledger else kwargs.pop(resource_key)
            asset_key = context.asset_key
            guard = StepGuard(
                context,
                resource,
                key_fn=key_fn,
                fingerprint=fingerprint_fn(context) if fingerprint_fn else None,
                pipeline=asset_key.to_user_string(),
                asset_keys=[asset_key],
                resource_key=resource_key,
            )
            with guard.lifecycle() as step:
                if not step.should_run:
                    step.observe_skips(context, downstream=False)
                    yield from step.replays(context)
                    return
                result = body(context, **kwargs) if takes_context else body(**kwargs)
                yield from _emit(context, result, step)

        present_as(guarded, body, signature)
        op_tags = {
            **(asset_kwargs.pop("op_tags", None) or {}),
            GUARDED_OP_TAG: "true",
            CLAIMS_TAG: CLAIMS_PER_ASSET,
        }
        return asset(output_required=False, op_tags=op_tags, **asset_kwargs)(guarded)

    if fn is not None:
        return decorate(fn)
    return decorate


def _emit(context: Any, result: Any, guard: StepGuard) -> Iterator[Any]:
    """Yield the body's result with the decision's metadata; record what a skip will replay:
    the asset, its partition and the scalar metadata the body reported (rows, tables, ...)."""
    summary: dict[str, Any] = {
        "asset_key": context.asset_key.to_user_string(),
        "partition": guard.resolved.partition if guard.resolved else None,
    }

    def emit(event: Any) -> Any:
        summary.update(_scalars(getattr(event, "metadata", None)))
        return guard.emit(event, dict(summary))

    if inspect.isgenerator(result):
        for event in result:
            yield emit(event) if isinstance(event, (Output, MaterializeResult)) else event
        return
    yield emit(result if isinstance(result, (Output, MaterializeResult)) else Output(result))


def _scalars(metadata: Any) -> dict[str, Any]:
    """The plain numbers and strings of a result's metadata (what a replay can show)."""
    found: dict[str, Any] = {}
    for name, value in (metadata or {}).items():
        raw = getattr(value, "value", value)
        if isinstance(raw, (bool, int, float, str)) and not name.startswith("rocky/"):
            found[name] = raw
    return found
