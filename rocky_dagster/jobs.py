"""`ledger_job` and `with_ledger`: jobs that carry the ledger hooks without anyone remembering them.

Neither binds a default ``ledger`` resource on its own: a job-level resource would silently
shadow the one given to ``Definitions(resources={"ledger": ...})`` (Dagster binds top-level
resources only to jobs that lack them), and the run-status sensors use the Definitions one. Give
the ledger once in Definitions, or pass ``ledger=`` for a self-contained job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from dagster import AssetsDefinition, GraphDefinition, HookDefinition, JobDefinition, job

from ._compat import UnresolvedAssetJobDefinition, copy_record
from .guard import KeyFn, register_job_key_fn
from .hooks import ledger_hooks
from .resource import RESOURCE_KEY, IdempotencyLedger

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
    hooks: set[HookDefinition] | None = None,
    **job_kwargs: Any,
) -> Callable[[Callable[..., Any] | GraphDefinition], JobDefinition]: ...


def ledger_job(
    fn: Callable[..., Any] | GraphDefinition | None = None,
    *,
    name: str | None = None,
    key_fn: KeyFn | None = None,
    ledger: Any = None,
    hooks: set[HookDefinition] | None = None,
    **job_kwargs: Any,
) -> JobDefinition | Callable[[Callable[..., Any] | GraphDefinition], JobDefinition]:
    """``@job`` (or ``graph.to_job``) plus the ledger hooks, an optional ledger and a job key.

    Args:
        key_fn: ``key_fn(context) -> str | None`` giving every guarded step of the job its base
            key (an op's own key_fn still wins).
        ledger: bind this `IdempotencyLedger` as the job's ``ledger`` resource; leave None to take
            the one from ``Definitions(resources=...)``.
        hooks: extra hooks; the ledger hooks are always added.
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
            resource_defs[RESOURCE_KEY] = ledger
        all_hooks = {*ledger_hooks, *(hooks or set())}
        if isinstance(target, GraphDefinition):
            built = target.to_job(
                name=name, hooks=all_hooks, resource_defs=resource_defs or None, **job_kwargs
            )
        else:
            built = job(
                name=name, hooks=all_hooks, resource_defs=resource_defs or None, **job_kwargs
            )(target)
        if key_fn is not None:
            register_job_key_fn(built.name, key_fn)
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
    """Attach the ledger hooks to a job, an asset job (``define_asset_job``) or assets.

    Hooks on assets also fire under ``materialize()`` and the UI's implicit asset job. `key_fn`
    (jobs only) gives the job's guarded steps a base key, as in `ledger_job`.
    """
    if isinstance(target, JobDefinition):
        hooked: Any = target.with_hooks(set(ledger_hooks))
    elif isinstance(target, UnresolvedAssetJobDefinition):
        hooked = copy_record(target, hooks={*(target.hooks or set()), *ledger_hooks})
    elif isinstance(target, AssetsDefinition):
        hooked = target.with_hooks(set(ledger_hooks))
    elif isinstance(target, (list, tuple)):  # after the Dagster types: records are tuples
        return [with_ledger(t, key_fn=key_fn) for t in target]
    else:
        raise TypeError(
            "with_ledger takes a JobDefinition, an asset job from define_asset_job, an "
            f"AssetsDefinition, or a list of them; got {type(target).__name__}"
        )
    if key_fn is not None:
        if isinstance(target, AssetsDefinition):
            raise TypeError("with_ledger: key_fn applies to jobs; pass it to idempotent_asset")
        register_job_key_fn(hooked.name, key_fn)
    return hooked
