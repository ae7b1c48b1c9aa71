"""The ledger's vocabulary: states, decisions, entries, events.

These are plain frozen pydantic models so they cross process, JSON and Dagster
metadata boundaries without surprises.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from .errors import InvalidArgumentError, InvalidKeyError, InvalidResultError, LedgerCorruptError

MAX_KEY_LENGTH = 512
MAX_RESULT_BYTES = 64 * 1024
MAX_RESULT_DEPTH = 32
"""Deepest nesting of lists and dicts a result may have (a summary is shallow; deeper
input would hit the interpreter's recursion limit when encoded or decoded)."""
MAX_REASON_LENGTH = 1024
"""Longest operator `reason` (release/reset) in characters."""
RELEASED = "released"
"""`holder_process` of a claim freed by `Ledger.release`: the row is kept as a `failed` entry
that never deduplicates, so the next claim continues its generation (see `Claim.generation`)."""
MAX_FENCE = 2**63 - 1
"""Fences are 64-bit signed integers in both stores; none handed out is larger."""
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Unicode category Cc, exactly (a regex: keys are validated on every call)."""


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Decision(StrEnum):
    """What a claim tells its caller to do."""

    PROCEED = "proceed"
    """Do the work: the key is yours (new claim, re-entrant claim, or claim after a failure)."""
    SKIPPED_COMPLETED = "skipped_completed"
    """Do nothing: the work already succeeded (or failed under dedup_on='any')."""
    SKIPPED_IN_FLIGHT = "skipped_in_flight"
    """Do nothing: another live run (or another live process of this run) holds the key now."""
    ADOPTED_STALE = "adopted_stale"
    """Do the work: the previous holder stopped heartbeating, its claim is now yours."""

    @property
    def should_run(self) -> bool:
        return self in (Decision.PROCEED, Decision.ADOPTED_STALE)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EventKind(StrEnum):
    CLAIMED = "claimed"
    ADOPTED = "adopted"
    FORCED = "forced"
    SKIPPED_COMPLETED = "skipped_completed"
    SKIPPED_IN_FLIGHT = "skipped_in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"
    RESET = "reset"
    KEPT_FOR_RETRY = "kept_for_retry"
    SWEPT = "swept"
    LOST = "lost"


class FinalizeReason(StrEnum):
    """Why a finalize did or did not change the entry."""

    APPLIED = "applied"
    STALE_FENCE = "stale_fence"
    """Another claim owns the key now (this holder was adopted): its outcome is discarded."""
    ALREADY_FINAL = "already_final"
    """The claim was already finalized; finalize is one-shot."""
    RELEASED = "released"
    """The claim was released (an operator, a cancel, a watch): its outcome is discarded."""
    NOT_FOUND = "not_found"
    """No entry: never claimed, reset, or swept."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Entry(_Frozen):
    """One key's row: who holds (or last held) it, its state, and until when that holds."""

    key: str
    state: State
    run_id: str
    fence: int
    pipeline: str | None = None
    fingerprint: str | None = None
    claimed_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime
    finalized_at: datetime | None = None
    expires_at: datetime | None = None
    dedup_on: str
    result: dict[str, Any] | None = None
    prior_run_id: str | None = None
    generation: int | None = None
    """The fence of the claim that began this generation of the key (see `Claim.generation`);
    stored NULL means this entry's own fence (a claim that began one, or a pre-v2 row)."""
    holder_process: str | None = None
    """The process that made the claim (`process.current`), `"parked"` once the claim is
    kept for its run's retry, `"released"` on the `failed` row a release leaves; NULL on rows
    written before schema v4. A same-run claim re-enters a live claim only if this process is
    known gone, or the claim is parked."""

    def checked(self) -> Entry:
        """This entry as read back from a store, if it could have been written by a ledger;
        a ValueError names what could not (the backends turn it into `LedgerCorruptError`)."""
        if not 1 <= self.fence <= MAX_FENCE or not 1 <= self.generation_fence <= self.fence:
            raise ValueError(f"fence {self.fence} / generation {self.generation} out of range")
        if self.dedup_on not in ("success", "any"):
            raise ValueError(f"unknown dedup_on {self.dedup_on!r}")
        if self.state == State.IN_FLIGHT:
            if self.finalized_at is not None or self.expires_at is not None:
                raise ValueError("an in-flight entry has a finalized_at or expires_at")
        elif self.finalized_at is None or self.expires_at is None:
            raise ValueError(f"a {self.state.value} entry has no finalized_at or expires_at")
        return self

    @property
    def released(self) -> bool:
        """A claim freed by `release`: kept as `failed`, never deduplicating, so that the
        next claim continues its generation."""
        return self.state == State.FAILED and self.holder_process == RELEASED

    @property
    def generation_fence(self) -> int:
        return self.fence if self.generation is None else self.generation

    def is_expired(self, now: datetime) -> bool:
        """A terminal entry past retention no longer dedups, swept or not."""
        return (
            self.state != State.IN_FLIGHT and self.expires_at is not None and self.expires_at <= now
        )


ENTRY_COLUMNS: tuple[str, ...] = tuple(Entry.model_fields)
"""An entry's stored columns, in the order every backend's SQL uses."""
TIME_COLUMNS = ("claimed_at", "heartbeat_at", "lease_expires_at", "finalized_at", "expires_at")


class Claim(_Frozen):
    """The answer to one claim; `fence` is set only when the caller should run."""

    key: str
    run_id: str
    decision: Decision
    fence: int | None = None
    prior_run_id: str | None = None
    held_by_run_id: str | None = None
    result: dict[str, Any] | None = None
    forced: bool = False
    lease_expires_at: datetime | None = None
    expires_at: datetime | None = None
    generation: int | None = None
    """The fence of the claim that began this generation of the key. A generation ends only
    where the work is deliberately finished or redone: a success (the next claim, after
    retention or a force, begins one), a `force`, a `reset` of a finished key, or retention
    running out; a proceed after no entry begins one too (generation == fence). Every other
    way a claim ends keeps it open, so the next claim continues it: adoption of a stale
    claim, a same-run re-entry, and a claim after a failure or a release (unless it gives
    another fingerprint: new work). Work done once per generation is done once, whichever
    holder of the generation did it. For a skip, the recorded entry's."""

    @property
    def should_run(self) -> bool:
        return self.decision.should_run


class FinalizeResult(_Frozen):
    key: str
    fence: int
    outcome: Outcome
    applied: bool
    reason: FinalizeReason
    state: State | None = None
    """The entry's state after the call (None when there is no entry)."""
    run_id: str | None = None
    """The run that holds the entry after the call."""
    expires_at: datetime | None = None


class Event(_Frozen):
    id: int
    key: str
    kind: EventKind
    run_id: str | None
    fence: int | None
    at: datetime
    detail: str | None = None


class Stats(_Frozen):
    entries: int
    in_flight: int
    succeeded: int
    failed: int
    expired: int
    """Terminal entries past retention still waiting for sweep()."""
    stale_in_flight: int
    """In-flight claims whose lease or hard cap has passed."""
    events: int
    last_fence: int
    """High-water mark of fences: none handed out so far is higher, every later one is."""


# --- validation at the edge -------------------------------------------------------------------


def validate_key(key: object, field: str = "key") -> str:
    """Keys are stored verbatim, so reject what would be ambiguous or unprintable."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"{field} must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError(f"{field} must not be empty: give 1 to {MAX_KEY_LENGTH} characters")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"{field} is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}. "
            "Hash long inputs into a shorter key."
        )
    control = _CONTROL.search(key)
    if control is not None:
        raise InvalidKeyError(
            f"{field} contains a control character {control.group()!r} at position "
            f"{control.start()}; use printable characters only"
        )
    surrogate = _SURROGATE.search(key)
    if surrogate is not None:
        raise InvalidKeyError(
            f"{field} contains a lone surrogate {surrogate.group()!r} at position "
            f"{surrogate.start()}, which no database can store as UTF-8; decode the input properly"
        )
    return key


def validate_optional_label(value: object, field: str) -> str | None:
    if value is None:
        return None
    return validate_key(value, field)


def validate_fence(fence: object) -> int:
    if isinstance(fence, bool) or not isinstance(fence, int) or fence < 1:
        raise InvalidArgumentError(
            f"fence must be the positive integer returned by claim(), got {fence!r}"
        )
    if fence > MAX_FENCE:
        raise InvalidArgumentError(
            f"fence {fence} is above {MAX_FENCE}, the largest fence a store can hand out; "
            "pass the fence returned by claim()"
        )
    return fence


def validate_reason(reason: object) -> str:
    """An operator's reason is kept in the event log: printable text of bounded length."""
    if not isinstance(reason, str):
        raise InvalidArgumentError(f"reason must be a string, got {type(reason).__name__}")
    if not reason.strip():
        raise InvalidArgumentError("reason must not be empty: say why, or leave the default")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgumentError(
            f"reason is {len(reason)} characters long; the limit is {MAX_REASON_LENGTH}"
        )
    for pattern, what in ((_CONTROL, "a control character"), (_SURROGATE, "a lone surrogate")):
        found = pattern.search(reason)
        if found is not None:
            raise InvalidArgumentError(
                f"reason contains {what} {found.group()!r} at position {found.start()}; "
                "use printable text on one line"
            )
    return reason


def validate_state(state: object) -> State | None:
    """A state filter: None (every state) or one of the `State` values."""
    if state is None:
        return None
    try:
        return State(state)
    except ValueError:
        raise InvalidArgumentError(
            f"state must be one of {[s.value for s in State]} or None, got {state!r}"
        ) from None


def validate_limit(limit: object, field: str = "limit") -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgumentError(f"{field} must be a positive integer, got {limit!r}")
    return min(limit, MAX_FENCE)


def encode_result(result: object) -> str | None:
    """Serialize a result summary, refusing what could not be handed back unchanged."""
    if result is None:
        return None
    if not isinstance(result, dict):
        raise InvalidResultError(
            f"result must be a dict (a small JSON summary), got {type(result).__name__}"
        )
    if _depth_exceeds(result, MAX_RESULT_DEPTH):
        raise InvalidResultError(
            f"result nests lists/dicts deeper than {MAX_RESULT_DEPTH} levels; keep a flat "
            "summary (counts, table names, paths)"
        )
    try:
        text = json.dumps(result, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidResultError(
            f"result is not JSON-serializable ({exc}); keep only str, int, float, bool, None, "
            "lists and dicts with string keys in it"
        ) from None
    bad_key = _non_string_key(result)
    if bad_key is not None:
        raise InvalidResultError(
            f"result has a non-string dict key {bad_key[0]!r}; JSON would turn it into a string and "
            "the summary would not come back as it was given. Use string keys."
        )
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise InvalidResultError(
            f"result is {len(text.encode())} bytes as JSON; the limit is {MAX_RESULT_BYTES}. "
            "Keep a summary (counts, table names, paths), not the data itself."
        )
    return text


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether lists/dicts nest more than `limit` levels (iterative: no recursion limit)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _non_string_key(value: object) -> tuple[object] | None:
    """The first dict key anywhere in `value` that is not a string (JSON would coerce it).

    Returned in a 1-tuple, so that a `None` key is reported too.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (key,)
            found = _non_string_key(item)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for item in value:
            found = _non_string_key(item)
            if found is not None:
                return found
    return None


def decode_result(text: str | None) -> dict[str, Any] | None:
    """A stored result; a ValueError when the stored text is not a JSON object."""
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"result is a JSON {type(value).__name__}, not an object")
    return value


def corrupt_row(table: str, key: object, exc: BaseException) -> LedgerCorruptError:
    """The error for a stored row that cannot be read back: names the row and what to do."""
    problem = " ".join(str(exc).split()) or type(exc).__name__
    if len(problem) > 300:
        problem = problem[:300] + "…"
    return LedgerCorruptError(
        f"the {table} row of key {key!r} is damaged and cannot be read ({problem}); no work was "
        "done. See `rocky-dagster ledger check` and restore the ledger from a backup"
    )
