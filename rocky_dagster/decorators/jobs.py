"""`ledger_job` and `with_ledger`: a job for guarded steps; the ledger hooks as an opt-in backstop.

A guarded step settles its own claim (after its outputs are stored, or when storing them fails)
and the run-status sensors settle what it cannot, so `ledger_job` attaches no hooks by default:
measured on 20 trivial ops, the hook's per-step event cost more than the whole claim and stamp.
Pass ``hooks=ledger_hooks`` (or use `with_ledger`) for the one thing they still buy: a stamp
that failed because the ledger was briefly unwritable is retried by the hook moments later, in
the step's own process, instead of by the SUCCESS sensor or the next run's reap.

Neither binds a default ``ledger`` resource on its own: a job-level resource would silently
shadow the one given to ``Definitions(resources={"ledger": ...})`` (Dagster binds top-level
resources only to jobs that lack them), and the run-status sensors use the Definitions one. Give
the ledger once in Definitions, or pass ``ledger=`` for a self-contained job.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar, overload

from dagster import AssetsDefinition, GraphDefinition, HookDefinition, JobDefinition, job

from rocky_dagster._compat import (
    UnresolvedAssetJobDefinition,
    asset_job_with_hooks,
    carry_job_key_fn,
    keyed_hook,
)
from rocky_dagster.decorators.hooks import ledger_hooks
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.step.key_inheritance import KeyFn

T = TypeVar("T", JobDefinition, UnresolvedAssetJobDefinition, AssetsDefinition)


@overload
def ledger_job(fn: Callable[..., Any] | GraphDefinition) -> JobDefinition: ...


@overload
def ledger_job(
    fn: None = None,
    *,
    name: str | None = None,
    key_fn: KeyFn | None = None,
    ledger: Any = None,
    resource_key: str = RESOURCE_KEY,
    hooks: AbstractSet[HookDefinition] | None = None,
    **job_kwargs: Any,
) -> Callable[[Callable[..., Any] | GraphDefinition], JobDefinition]: ...


def ledger_job(
    fn: Callable[..., Any] | GraphDefinition | None = None,
    *,
    name: str | None = None,
    key_fn: KeyFn | None = None,
    ledger: Any = None,
    resource_key: str = RESOURCE_KEY,
    hooks: AbstractSet[HookDefinition] | None = None,
    **job_kwargs: Any,
) -> JobDefinition | Callable[[Callable[..., Any] | GraphDefinition], JobDefinition]:
    """``@job`` (or ``graph.to_job``) with an optional ledger and a key for the whole job.

    Args:
        key_fn: ``key_fn(context) -> str | None`` giving every guarded step of the job its base
            key (an op's own key_fn still wins). It travels with the job definition, so two
            jobs of one name (two code locations or Definitions) keep their own.
        ledger: bind this `IdempotencyLedger` as the job's ledger resource; leave None to take
            the one from ``Definitions(resources=...)``.
        resource_key: the key `ledger` is bound under (default ``"ledger"``; the steps' own
            ``resource_key`` must name the same).
        hooks: hooks to attach; ``hooks=ledger_hooks`` adds the ledger's backstop hook (see the
            module doc: off by default, since the step and the run-status sensors settle
            every claim without it).
        **job_kwargs: anything else ``@job`` / ``to_job`` accepts (config, tags, executor_def,
            op_retry_policy, partitions_def, resource_defs, ...).
    """

    def build(target: Callable[..., Any] | GraphDefinition) -> JobDefinition:
        resource_defs: dict[str, Any] = dict(job_kwargs.pop("resource_defs", None) or {})
        if ledger is not None:
            cls = (
                ledger
                if isinstance(ledger, IdempotencyLedger)
                else getattr(ledger, "resource_cls", None)
            )
            if not (isinstance(ledger, IdempotencyLedger) or _is_ledger_class(cls)):
                raise TypeError(
                    "ledger_job: ledger must be an IdempotencyLedger (or "
                    f"IdempotencyLedger.configure_at_launch()), got {type(ledger).__name__}"
                )
            resource_defs[resource_key] = ledger
        all_hooks = set(hooks or ())
        if isinstance(target, GraphDefinition):
            if key_fn is not None:
                target = target.copy()  # the key_fn rides on this job's own graph
            built = target.to_job(
                name=name, hooks=all_hooks, resource_defs=resource_defs or None, **job_kwargs
            )
        else:
            built = job(
                name=name, hooks=all_hooks, resource_defs=resource_defs or None, **job_kwargs
            )(target)
        if key_fn is not None:
            carry_job_key_fn(built.graph, key_fn)
        return built

    if fn is not None:
        return build(fn)
    return build


def _is_ledger_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, IdempotencyLedger)


@overload
def with_ledger(target: T, *, key_fn: KeyFn | None = None) -> T: ...


@overload
def with_ledger(target: list[T] | tuple[T, ...], *, key_fn: KeyFn | None = None) -> list[T]: ...


def with_ledger(target: Any, *, key_fn: KeyFn | None = None) -> Any:
    """Attach the ledger's backstop hook to a job, an asset job (``define_asset_job``) or assets.

    Hooks on assets also fire under ``materialize()`` and the UI's implicit asset job. `key_fn`
    (jobs only) gives the job's guarded steps a base key, as in `ledger_job`; it rides on the
    hook attached here, so it travels with the job.
    """
    if key_fn is not None and isinstance(target, AssetsDefinition):
        raise TypeError("with_ledger: key_fn applies to jobs; pass it to idempotent_asset")
    hooks = set(ledger_hooks) if key_fn is None else {keyed_hook(h, key_fn) for h in ledger_hooks}
    if isinstance(target, JobDefinition):
        hooked: Any = target.with_hooks(hooks)
    elif isinstance(target, UnresolvedAssetJobDefinition):
        hooked = asset_job_with_hooks(target, hooks)
    elif isinstance(target, AssetsDefinition):
        hooked = target.with_hooks(hooks)
    elif isinstance(target, (list, tuple)):  # after the Dagster types: records are tuples
        return [with_ledger(t, key_fn=key_fn) for t in target]
    else:
        raise TypeError(
            "with_ledger takes a JobDefinition, an asset job from define_asset_job, an "
            f"AssetsDefinition, or a list of them; got {type(target).__name__}"
        )
    return hooked
