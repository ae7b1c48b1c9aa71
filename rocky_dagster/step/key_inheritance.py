"""Which base key a running step claims under: the Dagster side of the rules in `keys.py`.

`keys.resolve_key` is a pure function of tags, a step key and a partition; this module reads
those off a running step: the step's own `key_fn` or its job's (`ledger_job(key_fn=...)`), the
run's tags — or, for a re-execution that did not copy them, its parent's — and the partition;
for a guarded asset whose launch carries no key, what the asset reads (`asset_inputs_key`).
`planned_ledger_keys` derives, with the same `resolve_key`, the keys a job's steps will claim
for a run request (what a sensor asks the ledger about before it requests the run).

A job's `key_fn` travels with the job definition (see `_compat.job_key_fn`), so two jobs of one
name (two code locations, two Definitions) never share one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dagster import AssetCheckKey, AssetKey, Failure

from rocky_dagster import _compat
from rocky_dagster.ledger import InvalidArgumentError
from rocky_dagster.step.keys import (
    CLAIMS_TAG,
    GUARDED_OP_TAG,
    KEY_TAG,
    RUN_KEY_TAG,
    ResolvedKey,
    resolve_key,
)

KeyFn = Callable[..., "str | None"]
"""``key_fn(context) -> key | None``: a user's own base key for the run (None: no opinion); an
asset's may also take the asset key, ``key_fn(context, asset_key)``."""

CLAIMS_PER_ASSET = "asset"
"""`CLAIMS_TAG` value: the op claims ``<base>/<asset key>`` per selected asset (or check)."""


def job_key_fn(op_ctx: Any) -> KeyFn | None:
    """The `key_fn` the running step's job carries (`ledger_job` / `with_ledger`), or None."""
    return _compat.job_key_fn(op_ctx.job_def)


def check_claim_asset(key: AssetCheckKey) -> AssetKey:
    """The name an asset check's claim is kept under: ``<asset key>:<check name>``."""
    return AssetKey([*key.asset_key.path[:-1], f"{key.asset_key.path[-1]}:{key.name}"])


def call_key_fn(key_fn: KeyFn, context: Any, subject: AssetKey | None, what: str) -> str | None:
    """``key_fn(context, asset_key)`` when it takes two arguments and there is an asset, else
    ``key_fn(context)``; a result that is not a str (or None) fails the step, naming `what`."""
    takes_asset = False
    if subject is not None:
        try:
            takes_asset = len(inspect.signature(key_fn).parameters) >= 2
        except (TypeError, ValueError):
            takes_asset = False
    value = key_fn(context, subject) if takes_asset else key_fn(context)
    if value is not None and not isinstance(value, str):
        raise Failure(
            description=(
                f"rocky_dagster: key_fn of {what} returned {type(value).__name__}; it must "
                "return a str key or None"
            ),
            allow_retries=False,
        )
    return value


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


def resolve_claim_key(
    context: Any,
    op_ctx: Any,
    step_key: str,
    tags: Mapping[str, str],
    *,
    key_fn: KeyFn | None,
    asset: AssetKey | None,
    subject: AssetKey | None = None,
    input_state: Callable[[], str | None] | None = None,
    key_by_inputs: bool = True,
) -> ResolvedKey:
    """One claim's base and ledger key: ``<base>/<step key>`` for an op, ``<base>/<asset key>``
    for an asset (partition folded in); a bad key or key_fn result fails the step (no retries).
    A guarded asset with no other key is keyed by what it reads (`asset_inputs_key`).
    """
    name = asset.to_user_string() if asset is not None else None
    what = f"asset '{name}'" if name is not None else f"step '{step_key}'"
    user_key = call_key_fn(key_fn, context, subject, what) if key_fn is not None else None
    try:
        return resolve_key(
            tags,
            step_key,
            user_key=user_key,
            partition=partition_of(op_ctx),
            asset_key=name,
            inputs_key=None
            if asset is None or not key_by_inputs
            else asset_inputs_key(context, subject or asset, input_state),
        )
    except InvalidArgumentError as exc:
        raise Failure(
            description=f"rocky_dagster: bad idempotency key for {what}: {exc}",
            allow_retries=False,
        ) from exc


def asset_inputs_key(
    context: Any, subject: AssetKey, input_state: Callable[[], str | None] | None = None
) -> Callable[[], str | None]:
    """The key of a guarded asset whose launch carries none, asked only then: what `subject`
    reads (its upstream data versions and code version, and `input_state()`, the state of what
    it reads from outside Dagster); None when it reads nothing known (it runs unguarded)."""
    from rocky_dagster.step.input_versions import inputs_key

    return lambda: inputs_key(
        context, subject, input_state=input_state() if input_state is not None else None
    )


def planned_ledger_keys(
    job: Any,
    base: str,
    *,
    partition: str | None = None,
    asset_selection: Sequence[AssetKey] | None = None,
    asset_check_selection: Sequence[AssetCheckKey] | None = None,
) -> dict[str, str]:
    """The ledger keys the guarded steps of `job` claim in a run keyed `base`, each with the
    step that claims it: what `resolve_claim_key` gives them under the ``rocky/idempotency_key``
    tag (an op: ``<base>/<step key>``; an asset step: ``<base>/<asset key>`` for each asset
    of the request's selection; partition folded in). A step's own `key_fn` is not known
    before the run, so those steps are asked about under the run's key."""
    tags = {KEY_TAG: base}
    planned: dict[str, str] = {}
    for handle, definition in _compat.job_nodes(job):
        if GUARDED_OP_TAG not in definition.tags:
            continue
        step_key = str(handle)
        names: list[AssetKey | AssetCheckKey | None] = [None]
        if definition.tags.get(CLAIMS_TAG) == CLAIMS_PER_ASSET:
            subjects = _compat.node_claim_subjects(job, handle)
            # an asset step claims its assets (its own checks ride on them); a check-only
            # step claims each check
            assets = [k for k in subjects if isinstance(k, AssetKey)]
            names = [
                name
                for name in assets or subjects
                if _selected(name, asset_selection, asset_check_selection)
            ]
        for name in names:
            subject = None
            if isinstance(name, AssetCheckKey):
                subject = check_claim_asset(name).to_user_string()
            elif isinstance(name, AssetKey):
                subject = name.to_user_string()
            key = resolve_key(tags, step_key, partition=partition, asset_key=subject).ledger_key
            if key is not None:
                planned[key] = step_key
    return planned


def _selected(
    key: Any,
    assets: Sequence[AssetKey] | None,
    checks: Sequence[AssetCheckKey] | None,
) -> bool:
    """Whether a run of this selection executes `key` (an asset or an asset check)."""
    if isinstance(key, AssetCheckKey):
        if checks is not None:
            return key in checks
        return assets is None or key.asset_key in assets
    return assets is None or key in assets
