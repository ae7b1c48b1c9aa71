"""`idempotent_op`: an `@op` whose body runs at most once per key (see docs/contract.md).

The decorated function keeps its own signature (context, inputs, `config`, typed resources);
the wrapper adds the ledger resource and does, around the body:

the step lifecycle of `guard.StepGuard`: claim → on `proceed`/`adopted_stale`: heartbeat while
the body runs, store the outputs, stamp ``succeeded`` with the body's summary; on an exception
(in the body or while storing an output): finalize ``failed`` at once (or keep the claim when an
op retry of this run will re-enter it) → re-raise.
On `skipped_completed` the body is not called and the recorded summary is returned, marked
``replayed``, so downstream ops still run; on `skipped_in_flight` nothing is yielded, so
downstream steps are skipped and the run says which run holds the key.

A guarded op returns a small JSON summary (a dict: rows moved, tables touched, a path); that is
what the ledger keeps and what later runs replay. Pass large data through the warehouse.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, overload

from dagster import (
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    OpDefinition,
    Out,
    Output,
    RetryPolicy,
    op,
)

from rocky_dagster._compat import optional_out
from rocky_dagster.ledger import Decision
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.step.guard import KeyFn, StepGuard, recorded_outputs
from rocky_dagster.step.keys import GUARDED_OP_TAG

FingerprintFn = Callable[[Any], "str | None"]
"""``fingerprint_fn(context) -> str | None``: a hash of the work's parameters for the ledger's
mismatch check (the same key must always name the same work)."""

_CONTEXT_NAMES = {"context", "_context", "context_", "_"}


@overload
def idempotent_op(fn: Callable[..., Any]) -> OpDefinition: ...


@overload
def idempotent_op(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    ins: Mapping[str, In] | None = None,
    out: Out | Mapping[str, Out] | None = None,
    config_schema: Any = None,
    required_resource_keys: set[str] | None = None,
    tags: Mapping[str, Any] | None = None,
    retry_policy: RetryPolicy | None = None,
    code_version: str | None = None,
    pool: str | None = None,
    key_fn: KeyFn | None = None,
    fingerprint_fn: FingerprintFn | None = None,
    pipeline: str | None = None,
    resource_key: str = RESOURCE_KEY,
) -> Callable[[Callable[..., Any]], OpDefinition]: ...


def idempotent_op(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    ins: Mapping[str, In] | None = None,
    out: Out | Mapping[str, Out] | None = None,
    config_schema: Any = None,
    required_resource_keys: set[str] | None = None,
    tags: Mapping[str, Any] | None = None,
    retry_policy: RetryPolicy | None = None,
    code_version: str | None = None,
    pool: str | None = None,
    key_fn: KeyFn | None = None,
    fingerprint_fn: FingerprintFn | None = None,
    pipeline: str | None = None,
    resource_key: str = RESOURCE_KEY,
) -> OpDefinition | Callable[[Callable[..., Any]], OpDefinition]:
    """Decorate a function into an op guarded by the idempotency ledger (resource ``ledger``).

    Takes the options of ``@op`` that make sense for a side-effect step (`name`, `description`,
    `ins`, `out`, `config_schema` or a ``config: Config`` parameter, `required_resource_keys` or
    typed resource parameters, `tags`, `retry_policy`, `code_version`, `pool`), plus:

    Args:
        key_fn: ``key_fn(context) -> str | None``, this op's own base key; None defers to the
            job's key_fn (`ledger_job`), the ``rocky/idempotency_key`` tag, ``dagster/run_key``.
            With no key at all the op runs unguarded and says so.
        fingerprint_fn: ``fingerprint_fn(context) -> str | None``, a hash of the work's
            parameters; a key recorded with another fingerprint fails the step (policy 'error').
        pipeline: label stored with the claim (default: the op name).
        resource_key: the resource key of the `IdempotencyLedger` (default ``"ledger"``); a
            body parameter of that name receives it too.

    Outputs are made optional (``is_required=False``) so that a `skipped_in_flight` step can
    yield nothing and skip its downstream steps.
    """

    def decorate(body: Callable[..., Any]) -> OpDefinition:
        op_name = name or body.__name__
        outs = _optional_outs(out, op_name)
        wrapper = _wrap_op_body(
            body,
            op_name=op_name,
            outs=outs,
            key_fn=key_fn,
            fingerprint_fn=fingerprint_fn,
            pipeline=pipeline or op_name,
            inject_resource=required_resource_keys is None,
            resource_key=resource_key,
        )
        resource_keys = None
        if required_resource_keys is not None:
            resource_keys = {*required_resource_keys, resource_key}
        return op(
            name=op_name,
            description=description,
            ins=ins,
            out=outs if len(outs) > 1 or "result" not in outs else outs["result"],
            config_schema=config_schema,
            required_resource_keys=resource_keys,
            tags={**(tags or {}), GUARDED_OP_TAG: "true"},
            retry_policy=retry_policy,
            code_version=code_version,
            pool=pool,
        )(wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate


def _optional_outs(out: Out | Mapping[str, Out] | None, op_name: str) -> dict[str, Out]:
    if out is None:
        return {"result": Out(is_required=False)}
    if isinstance(out, DynamicOut) or (
        isinstance(out, Mapping) and any(isinstance(o, DynamicOut) for o in out.values())
    ):
        raise TypeError(
            f"idempotent_op {op_name!r}: DynamicOut is not supported; fan out in a plain op and "
            "guard the mapped op instead (each mapped step gets its own ledger key)"
        )
    if isinstance(out, Out):
        return {"result": optional_out(out)}
    if isinstance(out, Mapping):
        return {n: optional_out(o) for n, o in out.items()}
    raise TypeError(f"idempotent_op {op_name!r}: out must be an Out or a dict of Outs, got {out!r}")


def _wrap_op_body(
    body: Callable[..., Any],
    *,
    op_name: str,
    outs: Mapping[str, Out],
    key_fn: KeyFn | None,
    fingerprint_fn: FingerprintFn | None,
    pipeline: str,
    inject_resource: bool,
    resource_key: str,
) -> Callable[..., Iterator[Any]]:
    if inspect.iscoroutinefunction(body) or inspect.isasyncgenfunction(body):
        raise TypeError(f"idempotent_op {op_name!r}: async bodies are not supported")
    signature, takes_context, passes_ledger = guarded_signature(body, inject_resource, resource_key)
    output_names = list(outs)

    def guarded(context: Any, **kwargs: Any) -> Iterator[Any]:
        resource = (
            kwargs[resource_key] if inject_resource else getattr(context.resources, resource_key)
        )
        if not passes_ledger:
            kwargs.pop(resource_key, None)
        fingerprint = fingerprint_fn(context) if fingerprint_fn else None
        guard = StepGuard(
            context,
            resource,
            key_fn=key_fn,
            fingerprint=fingerprint,
            pipeline=pipeline,
            resource_key=resource_key,
        )
        with guard.lifecycle() as step:
            if not step.should_run:
                yield from _replay(step, output_names)
                return
            result = body(context, **kwargs) if takes_context else body(**kwargs)
            yield from _emit(result, output_names, step)

    present_as(guarded, body, signature)
    return guarded


def guarded_signature(
    body: Callable[..., Any], inject_resource: bool, resource_key: str = RESOURCE_KEY
) -> tuple[inspect.Signature, bool, bool]:
    """The signature Dagster should see: a context first, the body's own parameters (with their
    annotations resolved where the body was defined), and the typed ledger resource, a
    parameter named `resource_key`.

    Returns (signature, whether the body takes the context, whether it takes the ledger).
    """
    sig = inspect.signature(body)
    try:
        hints = typing.get_type_hints(body, include_extras=True)
    except Exception:
        hints = {}
    params = list(sig.parameters.values())
    takes_context = bool(params) and params[0].name in _CONTEXT_NAMES
    rest = params[1:] if takes_context else params
    resolved = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in rest]
    passes_ledger = any(p.name == resource_key for p in resolved)
    if inject_resource and not passes_ledger:
        resolved.append(
            inspect.Parameter(
                resource_key, inspect.Parameter.KEYWORD_ONLY, annotation=IdempotencyLedger
            )
        )
    context_param = (
        params[0].replace(annotation=inspect.Parameter.empty)
        if takes_context
        else inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    ordered = sorted(resolved, key=lambda p: p.kind == inspect.Parameter.KEYWORD_ONLY)
    return inspect.Signature([context_param, *ordered]), takes_context, passes_ledger


def present_as(
    wrapper: Callable[..., Any], body: Callable[..., Any], sig: inspect.Signature
) -> None:
    """Make Dagster see `body`'s name, docs and parameters on `wrapper`.

    Dagster 1.13 reads a wrapper's ``__signature__``; 1.12 reads its ``__annotations__`` for
    typed resource parameters, so both are set, with the annotations already resolved.
    """
    wrapper.__name__ = body.__name__
    wrapper.__qualname__ = body.__qualname__
    wrapper.__module__ = body.__module__
    wrapper.__doc__ = body.__doc__
    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        p.name: p.annotation for p in sig.parameters.values() if p.annotation is not p.empty
    }


def _emit(result: Any, output_names: list[str], guard: StepGuard) -> Iterator[Any]:
    """Turn the body's return value (or yielded events) into outputs carrying the decision."""
    values: dict[str, Any] = {}
    if inspect.isgenerator(result):
        for event in result:
            if isinstance(event, DynamicOutput):
                raise Failure(description="idempotent_op bodies cannot yield DynamicOutput")
            if isinstance(event, Output):
                values[event.output_name] = event.value
                yield guard.emit(event, _summary(values, output_names))
            else:
                yield event
        guard.record_summary(_summary(values, output_names))
        return
    if len(output_names) == 1:
        results = (result,)
    elif not isinstance(result, tuple) or len(result) != len(output_names):
        raise Failure(
            description=(
                f"op with outputs {output_names} must return a tuple of {len(output_names)} "
                f"values in that order, got {type(result).__name__}"
            ),
            allow_retries=False,
        )
    else:
        results = result
    outputs = [
        value if isinstance(value, Output) else Output(value, out_name)
        for out_name, value in zip(output_names, results, strict=True)
    ]
    for output in outputs:
        values[output.output_name] = output.value
    summary = _summary(values, output_names)
    for output in outputs:
        yield guard.emit(output, summary)


def _summary(values: Mapping[str, Any], output_names: list[str]) -> dict[str, Any] | None:
    """What the ledger keeps: the single output's dict (or None), or one entry per output."""
    if len(output_names) == 1:
        value = values.get(output_names[0])
        if value is None or isinstance(value, dict):
            return value
        raise Failure(
            description=(
                f"a guarded op must return a dict summary (or None), got {type(value).__name__}; "
                "return e.g. {'rows': 10, 'table': 'orders'} and pass data by reference"
            ),
            allow_retries=False,
        )
    return dict(values)


def _replay(guard: StepGuard, output_names: list[str]) -> Iterator[Output]:
    """A `skipped_completed` step yields the recorded result, marked replayed, with its decision
    and the replayed values as metadata; a `skipped_in_flight` step yields nothing."""
    claim = guard.claim_result
    if claim is None or claim.decision != Decision.SKIPPED_COMPLETED:
        return
    meta = guard.metadata()
    for name, value in recorded_outputs(claim, output_names).items():
        yield Output(value, name, metadata=meta)
