"""Tag names and idempotency-key resolution (docs/contract.md, "Keys").

Pure functions of run tags, a step key and a partition, so the rules can be
tested (and reasoned about) without Dagster objects. The Dagster layer feeds
them what it reads off a run; nothing here talks to Dagster or the ledger.

A run's *base key* comes from, in order: a user ``key_fn``; the run tag
``rocky/idempotency_key``; Dagster's ``dagster/run_key``; for a guarded
partitioned asset, ``<asset key>/<partition key>``; for a guarded asset, what it
reads (``inputs:...``, `input_versions.inputs_key`: its upstream data versions
and, for a pipeline, the state of its input files); else there is none and the
step runs unguarded. The *ledger key* of one step is ``<base>/<step key>``, with
the partition folded in as ``<base>/<partition>/<step key>`` when the run has a
partition the base did not already come from, so two partitions never share a
key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from rocky_dagster.ledger.model import validate_key

KEY_TAG = "rocky/idempotency_key"
"""Run tag holding the base key. Set by sensors/schedules (guard_run_requests) or by hand; the
first guarded step writes it back (with `OUTCOME_TAG`, in one write) so retries and
re-executions, which copy tags, keep the same key."""

IDEMPOTENCY_TAG = "rocky/idempotency"
"""Run tag; the value `FORCE_VALUE` (``force``) re-runs steps whose key already succeeded
(audited in the ledger). It never overrides a live in-flight claim."""
FORCE_VALUE = "force"
FORCE_TAG = IDEMPOTENCY_TAG
"""The former name of `IDEMPOTENCY_TAG` (the tag is ``rocky/idempotency``; ``force`` is its value)."""

OUTCOME_TAG = "rocky/outcome"
"""Run tag summarising the run's guarded steps: ``worked`` | ``skipped`` | ``mixed`` |
``unguarded`` | ``none``. With `KEY_TAG`, the only ``rocky/`` tag on a run: each step's own
decision is in its output metadata. Filter the runs list on it (``rocky/outcome=skipped``)."""

GUARDED_OP_TAG = "rocky/guarded"
"""Op-definition tag marking a guarded op, so sensors can find the steps of a job that claim."""

CLAIMS_TAG = "rocky/claims"
"""Op-definition tag of a guarded op that claims per asset (value ``asset``): its keys are
``<base>/<asset key>``, one per selected asset or check, not ``<base>/<step key>``."""

RUN_KEY_TAG = "dagster/run_key"
PARTITION_TAG = "dagster/partition"

ATTEMPT_SEPARATOR = "#"
"""``<key>#<n>``: the run_key of the n-th re-request of a key (Dagster's sensor run_key dedup is
forever, so a failed key needs a new run_key while its ledger key stays the same)."""


class KeySource(StrEnum):
    """Where a base key came from (shown in metadata so people can tell why a step was keyed)."""

    KEY_FN = "key_fn"
    TAG = "tag"
    RUN_KEY = "run_key"
    ASSET_PARTITION = "asset_partition"
    INPUTS = "inputs"
    """A launch with no key: the asset's key is what it reads (unchanged inputs: a skip)."""
    NONE = "none"

    @property
    def run_wide(self) -> bool:
        """Whether the base names the whole run (and so belongs in the run's key tag)."""
        return self in (KeySource.KEY_FN, KeySource.TAG, KeySource.RUN_KEY)


@dataclass(frozen=True)
class ResolvedKey:
    """The outcome of key resolution for one step."""

    base: str | None
    source: KeySource
    step_key: str
    partition: str | None = None
    ledger_key: str | None = None

    @property
    def guarded(self) -> bool:
        return self.ledger_key is not None


def is_forced(tags: Mapping[str, str]) -> bool:
    return tags.get(FORCE_TAG, "").strip().lower() == FORCE_VALUE


def base_key_from_tags(tags: Mapping[str, str]) -> tuple[str | None, KeySource]:
    """The run-wide key carried by tags: the explicit tag first, then Dagster's run_key."""
    for tag, source in ((KEY_TAG, KeySource.TAG), (RUN_KEY_TAG, KeySource.RUN_KEY)):
        value = tags.get(tag)
        if value is not None and value.strip():
            return value, source
    return None, KeySource.NONE


def asset_partition_key(asset_key: str, partition: str) -> str:
    return f"{asset_key}/{partition}"


def ledger_key(base: str, step_key: str, partition: str | None = None) -> str:
    """``<base>/<step key>``, or ``<base>/<partition>/<step key>`` for a partitioned run."""
    if partition:
        return f"{base}/{partition}/{step_key}"
    return f"{base}/{step_key}"


def resolve_key(
    tags: Mapping[str, str],
    step_key: str,
    *,
    user_key: str | None = None,
    partition: str | None = None,
    asset_key: str | None = None,
    inputs_key: Callable[[], str | None] | None = None,
) -> ResolvedKey:
    """Resolve one step's base and ledger key (docs/contract.md, "Keys").

    `user_key` is what a `key_fn` returned (None: no opinion); `asset_key` is set only for a
    guarded asset: it names the asset's share of the base (``<base>/<asset key>``, not the
    step key), and with its partition it is the key of last resort, ``<asset key>/<partition>``
    on its own (the asset is named once). `inputs_key` is asked last, only when nothing
    else keys the step: the key of what the asset reads (None: it reads nothing known).
    """
    if user_key is not None:
        base, source = user_key, KeySource.KEY_FN
    else:
        base, source = base_key_from_tags(tags)
    if base is None and asset_key is not None and partition:
        base, source = asset_partition_key(asset_key, partition), KeySource.ASSET_PARTITION
    if base is None and inputs_key is not None:
        base = inputs_key()
        source = KeySource.INPUTS if base is not None else KeySource.NONE
    if base is None:
        return ResolvedKey(None, KeySource.NONE, step_key, partition)
    base = validate_key(base, f"idempotency key (from {source.value})")
    if source == KeySource.ASSET_PARTITION:
        key = base
    else:
        key = validate_key(ledger_key(base, asset_key or step_key, partition), "ledger key")
    return ResolvedKey(base, source, step_key, partition, key)


def attempt_run_key(key: str, attempt: int) -> str:
    """The sensor run_key of a key's `attempt`-th generation: the key itself first, then `key#n`."""
    return key if attempt <= 0 else f"{key}{ATTEMPT_SEPARATOR}{attempt}"


def schedule_key(schedule_name: str, scheduled_time: datetime) -> str:
    """The natural key of a scheduled run: schedule name + scheduled execution time (UTC)."""
    return f"{schedule_name}@{scheduled_time.isoformat()}"
