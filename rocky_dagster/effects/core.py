"""Exactly-once effects: a run's warehouse writes commit in one transaction with a marker
naming the claim generation they belong to.

Fencing in the ledger stops a holder that lost its claim from *stamping* success, not from
*writing*. The marker closes that gap inside the warehouse itself: the first holder of a key
generation to commit leaves `(key, generation, fence)` next to its writes, atomically. A later
holder of the same generation with a higher fence (an adopter, or the next claim after a
failure or a release: docs/contract.md "When a generation ends") then finds the work done and
returns the recorded result instead of doing it again; a holder with a lower fence (a zombie)
that gets there after an adopter committed is refused with FenceLostError and changes nothing.
A marker of an older generation is simply replaced: a new generation is new work.

This module is the backend-free core: the claim a run needs, the marker, the judgement of a
marker, the scope `exactly_once` hands its body. `sqlite.py` and `postgres.py` store markers and
import only this module (and the errors); the package's `exactly_once` picks one by connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import ClaimRefusedError, FenceLostError, PipelineError

EFFECTS = "_rocky_effects"
"""The marker table's name in every backend (a plain identifier: it needs no quoting)."""


@runtime_checkable
class EffectClaim(Protocol):
    """What a run needs from an idempotency claim (the ledger's `Claim` provides it)."""

    @property
    def key(self) -> str: ...

    @property
    def generation(self) -> int | None: ...

    @property
    def fence(self) -> int | None: ...

    @property
    def run_id(self) -> str: ...

    @property
    def should_run(self) -> bool: ...


@dataclass(frozen=True)
class Marker:
    """The effect marker of one key, as stored in the warehouse."""

    key: str
    generation: int
    fence: int
    run_id: str
    pipeline_type: str
    result_json: str
    summary_json: str
    applied_at: str


def _integer(value: object, field: str, key: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClaimRefusedError(
            f"claim for key {key!r}: {field} must be an integer, got {value!r}; pass the claim "
            "the ledger returned for this step"
        )
    if not 0 < value < 2**63:
        raise ClaimRefusedError(f"claim for key {key!r}: {field} {value} is out of range")
    return value


class Effect:
    """One run's claim, checked once, and the judgement of its key's marker. Without a claim
    (an unguarded pipeline run) there is nothing to check and the backends record nothing."""

    def __init__(self, claim: EffectClaim | None, pipeline_type: str) -> None:
        self.pipeline_type = pipeline_type
        self.claim = claim
        if claim is None:
            return
        key = getattr(claim, "key", None)
        if not isinstance(key, str) or not key:
            raise ClaimRefusedError(f"claim: key must be a non-empty string, got {key!r}")
        if not getattr(claim, "should_run", False):
            raise ClaimRefusedError(
                f"claim for key {key!r} says this step must not run (the ledger decided "
                f"{getattr(getattr(claim, 'decision', None), 'value', 'skip')!s}); run the "
                "pipeline only with a claim whose should_run is true"
            )
        self.key = key
        self.fence = _integer(getattr(claim, "fence", None), "fence", key)
        self.generation = _integer(getattr(claim, "generation", None), "generation", key)
        if self.generation > self.fence:
            raise ClaimRefusedError(
                f"claim for key {key!r}: generation {self.generation} is later than fence "
                f"{self.fence}; a generation is the fence of the claim that began it"
            )
        run_id = getattr(claim, "run_id", None)
        if not isinstance(run_id, str):
            raise ClaimRefusedError(f"claim for key {key!r}: run_id must be a string")
        self.run_id = run_id

    def judge(self, marker: Marker | None) -> Marker | None:
        """The marker when an earlier holder of this generation (or this holder) already
        committed the work, else None (also for `marker` None: the key has none yet);
        FenceLostError when a later holder or a newer generation did. Backends call it inside
        the write transaction, so the caller's transaction rolls back on a refusal."""
        if marker is None or marker.generation < self.generation:
            return None
        if marker.generation > self.generation:
            raise FenceLostError(
                f"key {self.key!r}: generation {marker.generation} (run {marker.run_id}) "
                f"already committed its effects; this claim belongs to the older generation "
                f"{self.generation} and lost it, so nothing was written",
                table=EFFECTS,
            )
        if marker.fence > self.fence:
            raise FenceLostError(
                f"key {self.key!r}: a later holder (fence {marker.fence}, run {marker.run_id}) "
                f"already committed this generation's effects; this holder (fence "
                f"{self.fence}) lost its claim, so nothing was written",
                table=EFFECTS,
            )
        if marker.pipeline_type != self.pipeline_type:
            raise PipelineError(
                f"key {self.key!r}: its effects were committed by {marker.pipeline_type!r}, "
                f"not {self.pipeline_type!r}; give each step its own key",
                table=EFFECTS,
            )
        return marker


@dataclass
class EffectScope:
    """What `exactly_once` hands the body: whether the work was already applied (then
    `recorded` is the result its holder recorded, and the body must write nothing), and the
    `result` slot the body fills in to be recorded with its writes. With `ledger=`, `stamp` is
    the ledger's FinalizeResult once the block committed."""

    already_applied: bool
    recorded: Any = None
    result: Any = None
    stamp: Any = None


def encode_effect_result(result: Any) -> str:
    """`exactly_once`'s `effect.result` as the marker stores it; one rule for every backend,
    so `recorded` reads back the same on SQLite and PostgreSQL."""
    try:
        return json.dumps(result, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"exactly_once: result is not JSON: {exc}") from exc
