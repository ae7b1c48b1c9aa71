"""Which base key a running step claims under: the Dagster side of the rules in `keys.py`.

`keys.resolve_key` is a pure function of tags, a step key and a partition; this module reads
those off a running step: the step's own `key_fn` or its job's (`ledger_job(key_fn=...)`), the
run's tags — or, for a re-execution that did not copy them, its parent's — and the partition;
for a guarded asset whose launch carries no key, what the asset reads (`asset_inputs_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dagster import AssetKey, Failure

from .keys import KEY_TAG, RUN_KEY_TAG, ResolvedKey, resolve_key
from .ledger import InvalidArgumentError

KeyFn = Callable[[Any], "str | None"]
"""``key_fn(context) -> key | None``: a user's own base key for the run (None: no opinion)."""

_JOB_KEY_FNS: dict[str, KeyFn] = {}


def register_job_key_fn(job_name: str, key_fn: KeyFn) -> None:
    """Give every guarded step of job `job_name` a base key from `key_fn` (see `ledger_job`)."""
    _JOB_KEY_FNS[job_name] = key_fn


def job_key_fn(job_name: str) -> KeyFn | None:
    return _JOB_KEY_FNS.get(job_name)


def tags_with_inherited_key(op_ctx: Any) -> dict[str, str]:
    """The run's tags, plus its parent's key tags when a re-execution did not copy them.

    Dagster's daemon and UI copy every parent tag into a retry, but a Python-API re-execution
    (`ReexecutionOptions`) copies none; the lineage fields say whose key it is.
    """
    run = op_ctx.run
    own = dict(run.tags)
    if own.get(KEY_TAG) or own.get(RUN_KEY_TAG):
        return own
    for ancestor_id in dict.fromkeys(r for r in (run.parent_run_id, run.root_run_id) if r):
        ancestor = op_ctx.instance.get_run_by_id(ancestor_id)
        if ancestor is None:
            continue
        found = {t: ancestor.tags[t] for t in (KEY_TAG, RUN_KEY_TAG) if ancestor.tags.get(t)}
        if found:
            return {**own, **found}
    return own


def partition_of(op_ctx: Any) -> str | None:
    """The run's partition key, or ``start...end`` for a partition range, or None."""
    if op_ctx.has_partition_key:
        return str(op_ctx.partition_key)
    if op_ctx.has_partition_key_range:
        rng = op_ctx.partition_key_range
        return f"{rng.start}...{rng.end}"
    return None


def resolve_step_key(
    context: Any,
    op_ctx: Any,
    step_key: str,
    tags: Mapping[str, str],
    *,
    key_fn: KeyFn | None,
    asset_key: str | None,
) -> ResolvedKey:
    """The step's base and ledger key; a bad key or key_fn result fails the step (no retries).
    A guarded asset with no other key is keyed by what it reads (`asset_inputs_key`)."""
    key_fn = key_fn or _JOB_KEY_FNS.get(op_ctx.job_name)
    user_key = None
    if key_fn is not None:
        user_key = key_fn(context)
        if user_key is not None and not isinstance(user_key, str):
            raise Failure(
                description=(
                    f"rocky_dagster: key_fn of step '{step_key}' returned "
                    f"{type(user_key).__name__}; it must return a str key or None"
                ),
                allow_retries=False,
            )
    try:
        return resolve_key(
            tags,
            step_key,
            user_key=user_key,
            partition=partition_of(op_ctx),
            asset_key=asset_key,
            inputs_key=None
            if asset_key is None
            else asset_inputs_key(context, AssetKey.from_user_string(asset_key)),
        )
    except InvalidArgumentError as exc:
        raise Failure(
            description=f"rocky_dagster: bad idempotency key for '{step_key}': {exc}",
            allow_retries=False,
        ) from exc


def asset_inputs_key(
    context: Any, subject: AssetKey, input_state: Callable[[], str | None] | None = None
) -> Callable[[], str | None]:
    """The key of a guarded asset whose launch carries none, asked only then: what `subject`
    reads (its upstream data versions and code version, and `input_state()`, the state of what
    it reads from outside Dagster); None when it reads nothing known (it runs unguarded)."""
    from .input_versions import inputs_key

    return lambda: inputs_key(
        context, subject, input_state=input_state() if input_state is not None else None
    )
