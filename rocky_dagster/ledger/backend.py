"""The `Ledger` API, written once over a small transactional store interface.

A backend supplies a transaction with row-level primitives (`load` locks the
key's row); this module owns validation, the state machine and the events, so
SQLite and PostgreSQL cannot drift apart.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from . import process
from .config import LedgerConfig
from .errors import InvalidArgumentError, LedgerConfigError, LedgerError
from .machine import NEW_KEY, Plan, decide
from .model import (
    RELEASED,
    Claim,
    Entry,
    Event,
    EventKind,
    FinalizeReason,
    FinalizeResult,
    Outcome,
    State,
    Stats,
    encode_result,
    validate_fence,
    validate_key,
    validate_limit,
    validate_optional_label,
    validate_reason,
    validate_state,
)
from .queries import ReadQueries

Clock = Callable[[], datetime]
T = TypeVar("T")
_DATETIME = datetime
"""The datetime type itself, for isinstance checks that must survive tests patching the
module's `datetime` name to skew the clock."""


@dataclass(frozen=True)
class NewClaim:
    """The row a claim of a key with no row writes (`machine.NEW_KEY`): in flight for `run_id`,
    claimed and heartbeated now, leased for `lease` (already capped by the TTL), beginning its
    own generation (stored NULL or equal to its fence), logged as `event` with `detail`."""

    key: str
    run_id: str
    pipeline: str | None
    fingerprint: str | None
    lease: timedelta
    dedup_on: str
    holder_process: str
    event: EventKind = NEW_KEY.event
    detail: str = NEW_KEY.detail

    def claim(self, fence: int, lease_expires_at: datetime) -> Claim:
        """The answer to the claim that wrote this row with `fence`."""
        return Claim(
            key=self.key,
            run_id=self.run_id,
            decision=NEW_KEY.decision,
            fence=fence,
            lease_expires_at=lease_expires_at,
            generation=fence,
        )


def renew_lease(row: Entry, now: datetime, config: LedgerConfig) -> Entry | None:
    """A live claim after a heartbeat at `now`, or None once its TTL cap has passed (the claim
    is adoptable: it is lost). A `claimed_at` ahead of `now` means the clock stepped back: it is
    clamped to `now` (machine._rebase), so the cap counts from the earlier time."""
    claimed_at = min(row.claimed_at, now)
    deadline = claimed_at + config.in_flight_ttl
    if deadline <= now:
        return None
    return row.model_copy(
        update={
            "claimed_at": claimed_at,
            "heartbeat_at": now,
            "lease_expires_at": min(now + config.lease, deadline),
        }
    )


class Transaction(Protocol):
    """One atomic read-decide-write against the store; rolled back if the block raises."""

    now: datetime

    def load(self, key: str) -> Entry | None:
        """Read the key's row and lock it (or the whole store) until commit."""

    def insert(self, entry: Entry) -> bool:
        """Insert a new row; False if the key appeared meanwhile (caller reloads and decides again)."""

    def update(self, entry: Entry) -> None: ...

    def delete(self, key: str) -> None: ...

    def next_fence(self) -> int:
        """A fence never handed out before by this store."""

    def log(
        self,
        kind: EventKind,
        key: str,
        run_id: str | None,
        fence: int | None,
        detail: str | None,
    ) -> None: ...


class Ledger(ABC):
    """The idempotency ledger: claim a key before work, finalize it after.

    Instances are safe to share between threads of one process; each process
    (fork or spawn) gets its own connection.
    """

    def __init__(self, url: str, config: LedgerConfig | None, clock: Clock | None) -> None:
        self.url = redact_url(url)
        self.config = LedgerConfig.parse(config)
        if clock is not None and not callable(clock):
            raise LedgerConfigError(
                f"clock must be a function returning an aware UTC datetime, got "
                f"{type(clock).__name__}"
            )
        self._clock = clock

    _process: Callable[[], str] = staticmethod(process.current)
    """The claimant's process identity written as `holder_process` (tests stand in others)."""

    # --- what a backend provides ---------------------------------------------------------------

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """Begin a write transaction that locks what `load` reads until it commits."""

    # One-statement writes, for a store where a transaction costs round trips. Each is what
    # the transaction path below would write in its one case, so it may only ever agree with
    # it; None means "not done here": the call then takes the transaction path.

    def _insert_new(self, new: NewClaim) -> tuple[int, datetime] | None:
        """Insert `new` as the row of a key that has none, with its event, atomically: its
        (fence, lease_expires_at), or None if the key has a row."""
        return None

    def _finalize_live(
        self, key: str, fence: int, outcome: Outcome, encoded: str | None, detail: str | None
    ) -> tuple[str, datetime] | None:
        """Compare-and-set the live claim `fence` to `outcome` (`finalized_at` now, `expires_at`
        one retention later), with its event: (holder run_id, expires_at), or None if `fence`
        is not the key's live claim."""
        return None

    def _extend_lease(self, key: str, fence: int) -> bool | None:
        """`renew_lease` on the live claim `fence` as one conditional write: whether it held."""
        return None

    def _attempt(self, call: Callable[[], T]) -> T:
        """Run one whole call; a store that can lose a connection may run it once more."""
        return call()

    def _attempt_finalize(self, call: Callable[[], FinalizeResult]) -> FinalizeResult:
        """`_attempt` for a finalize (a store that lost a reply may learn more from the answer)."""
        return self._attempt(call)

    # --- reads: one implementation over each backend's query builder and row decoders ------

    @property
    @abstractmethod
    def _reads(self) -> ReadQueries:
        """This store's `get` / `entries` / `history` queries (see `queries.py`)."""

    @abstractmethod
    def _read(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run one read statement and return its rows."""

    @abstractmethod
    def _decode_entry(self, row: tuple[Any, ...]) -> Entry:
        """An `Entry` from a row of `ENTRY_COLUMNS` (`LedgerCorruptError` if it is damaged)."""

    @abstractmethod
    def _decode_event(self, row: tuple[Any, ...]) -> Event:
        """An `Event` from a row of `EVENT_COLUMNS` (`LedgerCorruptError` if it is damaged)."""

    def get(self, key: str) -> Entry | None:
        """The key's entry as stored, or None."""
        key = validate_key(key)
        rows = self._read(*self._reads.get(key))
        return self._decode_entry(rows[0]) if rows else None

    def entries(
        self,
        state: State | str | None = None,
        *,
        run_id: str | None = None,
        prefix: str | None = None,
        limit: int = 100,
    ) -> list[Entry]:
        """Entries newest claim first, optionally only one state, one run's and/or the keys
        starting with `prefix` (verbatim: no character of it is a wildcard)."""
        state, run_id, prefix, limit = validate_entries_filter(state, run_id, prefix, limit)
        sql, params = self._reads.entries(state, run_id=run_id, prefix=prefix, limit=limit)
        return [self._decode_entry(r) for r in self._read(sql, params)]

    def entries_touched_by(
        self,
        run_id: str,
        state: State | str | None = None,
        *,
        prefix: str | None = None,
        limit: int = 100,
    ) -> list[Entry]:
        """What one run claimed or did: entries it holds or last held, plus every key whose
        event history names it (claimed and lost to an adopter, skipped, reaped), newest claim
        first. A key whose entry is gone (reset, swept) has no entry to show. Scans
        the event log (no index by run): an operator's query, not for hot paths."""
        state, _, prefix, limit = validate_entries_filter(state, None, prefix, limit)
        run_id = validate_key(run_id, "run_id")
        sql, params = self._reads.touched_by(run_id, state, prefix=prefix, limit=limit)
        return [self._decode_entry(r) for r in self._read(sql, params)]

    def history(self, key: str, *, limit: int | None = None) -> list[Event]:
        """The key's events, oldest first."""
        key, limit = validate_history(key, limit)
        return [self._decode_event(r) for r in self._read(*self._reads.history(key, limit=limit))]

    @abstractmethod
    def check(self) -> list[str]:
        """Problems found in the store (damaged pages, rows that do not decode, missing
        tables); empty when the ledger is sound. Reads everything: for operators, not hot paths."""

    @abstractmethod
    def stats(self) -> Stats: ...

    @abstractmethod
    def _sweep(self, now: datetime, abandoned_before: datetime) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    # --- the state machine ------------------------------------------------------------------------

    def now(self) -> datetime:
        """The time this ledger decides with (the injected clock, else the store's)."""
        with self.transaction() as tx:
            return tx.now

    def claim(
        self,
        key: str,
        run_id: str,
        *,
        pipeline: str | None = None,
        fingerprint: str | None = None,
        force: bool = False,
    ) -> Claim:
        """Decide atomically if `run_id` may do `key`'s work (docs/contract.md "Claim decisions")."""
        key, run_id, pipeline, fingerprint = validate_claim(
            key, run_id, pipeline, fingerprint, force=force
        )
        new = NewClaim(
            key=key,
            run_id=run_id,
            pipeline=pipeline,
            fingerprint=fingerprint,
            lease=min(self.config.lease, self.config.in_flight_ttl),
            dedup_on=self.config.dedup_on.value,
            holder_process=self._process(),
        )

        def attempt() -> Claim:
            taken = self._insert_new(new)
            if taken is not None:
                return new.claim(*taken)
            with self.transaction() as tx:
                return self._claim_locked(tx, key, run_id, pipeline, fingerprint, force)

        return self._attempt(attempt)

    def peek(
        self,
        key: str,
        run_id: str | None = None,
        *,
        fingerprint: str | None = None,
        force: bool = False,
    ) -> Claim:
        """What `claim` would decide now, with no write: the same `decide` on the current row.

        For sensors and schedules that must not request a run whose work is done or held; a
        later `claim` decides again (the answer can change in between). `run_id=None` asks as
        a run that holds nothing. A proceeding answer carries no fence: nothing was claimed.
        """
        key, run_id, _, fingerprint = validate_claim(
            key, run_id or "-", None, fingerprint, force=force
        )
        with self.transaction() as tx:
            existing, plan = self._plan(tx, key, run_id, fingerprint, force)
        return _answer(key, run_id, plan, existing)

    def _plan(
        self, tx: Transaction, key: str, run_id: str, fingerprint: str | None, force: bool
    ) -> tuple[Entry | None, Plan]:
        """The key's row (locked; rebased if the clock stepped back) and what a claim of it by
        `run_id` must do: `decide`, for `claim` and `peek` alike."""
        me = self._process()
        existing = tx.load(key)
        plan = decide(
            existing,
            now=tx.now,
            run_id=run_id,
            fingerprint=fingerprint,
            config=self.config,
            force=force,
            judge_holder=lambda recorded: process.holder(recorded, me),
        )
        return (existing if plan.rebased is None else plan.rebased), plan

    def _claim_locked(
        self,
        tx: Transaction,
        key: str,
        run_id: str,
        pipeline: str | None,
        fingerprint: str | None,
        force: bool,
    ) -> Claim:
        """A validated claim inside an open transaction: load the row, decide, write the plan."""
        me = self._process()
        while True:
            existing, plan = self._plan(tx, key, run_id, fingerprint, force)
            if not plan.takes_key:
                assert existing is not None
                if plan.rebased is not None:
                    tx.update(plan.rebased)
                tx.log(plan.event, key, run_id, None, plan.detail)
                return _answer(key, run_id, plan, existing)
            now = tx.now
            fence = tx.next_fence()
            # a same-run re-entry keeps the first attempt's claimed_at: the TTL cap holds
            claimed_at = existing.claimed_at if plan.reentrant and existing else now
            entry = Entry(
                key=key,
                state=State.IN_FLIGHT,
                run_id=run_id,
                fence=fence,
                pipeline=pipeline,
                fingerprint=fingerprint,
                claimed_at=claimed_at,
                heartbeat_at=now,
                lease_expires_at=min(
                    now + self.config.lease, claimed_at + self.config.in_flight_ttl
                ),
                dedup_on=self.config.dedup_on.value,
                prior_run_id=plan.prior_run_id,
                generation=existing.generation_fence if plan.continues and existing else fence,
                holder_process=me,
            )
            if existing is None:
                if not tx.insert(entry):
                    continue  # another writer created the row first: decide again on it
            else:
                tx.update(entry)
            tx.log(plan.event, key, run_id, entry.fence, plan.detail)
            return _answer(key, run_id, plan, entry, entry.fence)

    def finalize(
        self,
        key: str,
        fence: int,
        outcome: Outcome | str,
        *,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> FinalizeResult:
        """Compare-and-set the claim `fence` to its outcome; one-shot, never touches a newer claim.

        `reason` (printable text, as for `release`) is kept on the event when someone other than
        the holder settles the claim — a run-status sensor, a reaping run — so the key's history
        says who did it.
        """
        key, fence, outcome, encoded = validate_finalize(key, fence, outcome, result)
        detail = None if reason is None else validate_reason(reason)

        def attempt() -> FinalizeResult:
            done = self._finalize_live(key, fence, outcome, encoded, detail)
            if done is not None:
                run_id, expires_at = done
                return _settled(key, fence, outcome, FinalizeReason.APPLIED, run_id, expires_at)
            # not a live claim of this fence: find out why under the lock
            with self.transaction() as tx:
                return self._finalize_locked(tx, key, fence, outcome, encoded, result, detail)

        return self._attempt_finalize(attempt)

    def _finalize_locked(
        self,
        tx: Transaction,
        key: str,
        fence: int,
        outcome: Outcome,
        encoded: str | None,
        result: dict[str, Any] | None,
        detail: str | None = None,
    ) -> FinalizeResult:
        """A validated finalize inside an open transaction: compare-and-set under the row lock."""
        row = tx.load(key)
        if row is None:
            tx.log(EventKind.LOST, key, None, fence, f"{outcome.value} reported, but no entry")
            return _settled(key, fence, outcome, FinalizeReason.NOT_FOUND)
        if row.fence != fence:
            tx.log(
                EventKind.LOST,
                key,
                None,
                fence,
                f"{outcome.value} discarded: fence {fence} was superseded by fence "
                f"{row.fence} of run {row.run_id}",
            )
            return _finalize_result(row, fence, outcome, FinalizeReason.STALE_FENCE)
        if row.released:
            tx.log(EventKind.LOST, key, None, fence, f"{outcome.value} discarded: it was released")
            return _finalize_result(row, fence, outcome, FinalizeReason.RELEASED)
        if row.state != State.IN_FLIGHT:
            return _finalize_result(row, fence, outcome, FinalizeReason.ALREADY_FINAL)
        now = tx.now
        final = row.model_copy(
            update={
                "state": State(outcome.value),
                "finalized_at": now,
                "expires_at": now + self.config.retention,
                "result": None if encoded is None else result,
            }
        )
        tx.update(final)
        tx.log(EventKind(outcome.value), key, row.run_id, fence, detail)
        return _finalize_result(final, fence, outcome, FinalizeReason.APPLIED)

    def heartbeat(self, key: str, fence: int) -> bool:
        """Extend the lease of claim `fence`; False means the claim was lost and work must stop."""
        key = validate_key(key)
        fence = validate_fence(fence)

        def attempt() -> bool:
            extended = self._extend_lease(key, fence)
            if extended is not None:
                return extended
            with self.transaction() as tx:
                row = _live_row(tx, key, fence)
                renewed = None if row is None else renew_lease(row, tx.now, self.config)
                if renewed is None:
                    return False
                tx.update(renewed)
                return True

        return self._attempt(attempt)

    def keep_for_retry(self, key: str, fence: int) -> bool:
        """Park claim `fence` for its run's next attempt: no process works on it any more.

        Called by an attempt that failed and will be retried (its heartbeat stopped), so
        the run's retry re-enters the claim at once instead of being taken for a second live
        process of the run. The lease keeps running: a retry that never comes lets the key
        be adopted when it ends. False if `fence` no longer holds the key (finalized, lost).
        """
        key = validate_key(key)
        fence = validate_fence(fence)
        # idempotent: repeating it after a lost reply finds the claim already parked
        return self._attempt(lambda: self._keep_for_retry(key, fence))

    def _keep_for_retry(self, key: str, fence: int) -> bool:
        with self.transaction() as tx:
            row = _live_row(tx, key, fence)
            if row is None:
                return False
            if row.holder_process != process.PARKED:
                tx.update(row.model_copy(update={"holder_process": process.PARKED}))
                tx.log(
                    EventKind.KEPT_FOR_RETRY,
                    key,
                    row.run_id,
                    fence,
                    "the attempt failed and will be retried: its run may re-enter the claim",
                )
            return True

    # --- operators and reconcilers ---------------------------------------------------------------

    def release(
        self,
        key: str,
        *,
        run_id: str | None = None,
        fence: int | None = None,
        reason: str = "released by an operator",
    ) -> bool:
        """Free an in-flight claim so the next claim proceeds; only if it is (still) the one named.

        `run_id` / `fence` guard against freeing a claim that changed hands since it was looked at.
        The row stays as a `failed` entry marked released (`Entry.released`), which never
        deduplicates: whoever frees a claim cannot know whether its work committed, so the next
        claim continues its generation (docs/contract.md "When a generation ends").
        """
        key = validate_key(key)
        run_id = validate_optional_label(run_id, "run_id")
        fence = None if fence is None else validate_fence(fence)
        reason = validate_reason(reason)
        return self._attempt(lambda: self._release(key, run_id, fence, reason))

    def _release(self, key: str, run_id: str | None, fence: int | None, reason: str) -> bool:
        with self.transaction() as tx:
            row = tx.load(key)
            if row is None or row.state != State.IN_FLIGHT:
                return False
            if (run_id is not None and row.run_id != run_id) or (
                fence is not None and row.fence != fence
            ):
                return False
            now = tx.now
            tx.update(
                row.model_copy(
                    update={
                        "state": State.FAILED,
                        "finalized_at": now,
                        "expires_at": now + self.config.retention,
                        "result": None,
                        "holder_process": RELEASED,
                    }
                )
            )
            tx.log(EventKind.RELEASED, key, row.run_id, row.fence, reason)
            return True

    def reset(
        self, key: str, *, fence: int | None = None, reason: str = "reset by an operator"
    ) -> bool:
        """Forget a finalized key so the next claim proceeds; in-flight claims need `release`.

        `fence` guards against forgetting a record that changed since it was looked at (a
        newer run's success): the reset then does nothing and answers False.
        """
        key = validate_key(key)
        fence = None if fence is None else validate_fence(fence)
        reason = validate_reason(reason)
        return self._attempt(lambda: self._reset(key, fence, reason))

    def _reset(self, key: str, fence: int | None, reason: str) -> bool:
        with self.transaction() as tx:
            row = tx.load(key)
            if row is None or row.state == State.IN_FLIGHT:
                return False
            if fence is not None and row.fence != fence:
                return False
            tx.delete(key)
            tx.log(
                EventKind.RESET,
                key,
                row.run_id,
                row.fence,
                f"{reason}; forgot the {row.state.value} record of run {row.run_id}",
            )
            return True

    def sweep(self) -> int:
        """Delete terminal entries past retention and claims abandoned for a whole retention period."""
        now = self.now()
        return self._sweep(now, now - self.config.retention)

    # --- helpers for backends -----------------------------------------------------------------------

    def _now(self, store_now: Callable[[], datetime]) -> datetime:
        value = self._clock() if self._clock is not None else store_now()
        if not isinstance(value, _DATETIME):
            raise LedgerConfigError(f"clock must return a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise LedgerConfigError("clock must return a timezone-aware datetime (UTC)")
        return value.astimezone(UTC)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _answer(
    key: str, run_id: str, plan: Plan, row: Entry | None, fence: int | None = None
) -> Claim:
    """A claim's answer: `row` is the key's entry after the claim (the claim's own when it
    took the key, with its `fence`), or as it stands for a claim that did not (or a peek)."""
    in_flight = row is not None and row.state == State.IN_FLIGHT
    return Claim(
        key=key,
        run_id=run_id,
        decision=plan.decision,
        fence=fence,
        prior_run_id=plan.prior_run_id,
        held_by_run_id=plan.held_by_run_id,
        result=None if row is None or plan.takes_key else row.result,
        forced=plan.forced,
        lease_expires_at=row.lease_expires_at if row is not None and in_flight else None,
        expires_at=None if row is None else row.expires_at,
        generation=None if row is None else row.generation_fence,
    )


def _live_row(tx: Transaction, key: str, fence: int) -> Entry | None:
    """The entry of `key` while claim `fence` still holds it in flight; None once it does not
    (finalized, released, or taken over): what heartbeat and keep_for_retry may change."""
    row = tx.load(key)
    if row is None or row.fence != fence or row.state != State.IN_FLIGHT:
        return None
    return row


def validate_claim(
    key: object, run_id: object, pipeline: object, fingerprint: object, *, force: object = False
) -> tuple[str, str, str | None, str | None]:
    """A claim's arguments checked before anything is written, by every backend's claim."""
    if not isinstance(force, bool):
        raise InvalidArgumentError(f"force must be True or False, got {force!r}")
    return (
        validate_key(key),
        validate_key(run_id, "run_id"),
        validate_optional_label(pipeline, "pipeline"),
        validate_optional_label(fingerprint, "fingerprint"),
    )


def validate_entries_filter(
    state: object, run_id: object, prefix: object, limit: object
) -> tuple[State | None, str | None, str | None, int]:
    """`entries()` filters checked before the query: a bad one is a named error, not an
    empty answer or a driver's exception."""
    return (
        validate_state(state),
        validate_optional_label(run_id, "run_id"),
        validate_optional_label(prefix, "prefix"),
        validate_limit(limit),
    )


def row_problems(
    rows: list[tuple[Any, ...]], decode: Callable[[tuple[Any, ...]], object]
) -> list[str]:
    """One line per stored row that does not decode (a `LedgerError` naming it)."""
    problems = []
    for row in rows:
        try:
            decode(row)
        except LedgerError as exc:
            problems.append(str(exc))
    return problems


def validate_history(key: object, limit: object) -> tuple[str, int | None]:
    return validate_key(key), None if limit is None else validate_limit(limit)


def validate_finalize(
    key: object, fence: object, outcome: object, result: object
) -> tuple[str, int, Outcome, str | None]:
    """A finalize's arguments checked (and the result encoded) before anything is written."""
    return validate_key(key), validate_fence(fence), _outcome(outcome), encode_result(result)


def _outcome(value: Outcome | str) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise InvalidArgumentError(
            f"outcome must be one of {[o.value for o in Outcome]}, got {value!r}"
        ) from None


def _finalize_result(
    row: Entry, fence: int, outcome: Outcome, reason: FinalizeReason
) -> FinalizeResult:
    return _settled(row.key, fence, outcome, reason, row.run_id, row.expires_at, row.state)


def _settled(
    key: str,
    fence: int,
    outcome: Outcome,
    reason: FinalizeReason,
    run_id: str | None = None,
    expires_at: datetime | None = None,
    state: State | None = None,
) -> FinalizeResult:
    """A finalize's answer; an applied one leaves the entry in the outcome's state."""
    applied = reason == FinalizeReason.APPLIED
    return FinalizeResult(
        key=key,
        fence=fence,
        outcome=outcome,
        applied=applied,
        reason=reason,
        state=State(outcome.value) if applied else state,
        run_id=run_id,
        expires_at=expires_at,
    )


_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<rest>.*)$", re.I | re.S)
_QUERY_SECRET = re.compile(r"(?P<name>[?&](?:password|passwd|pwd|sslpassword)=)[^&#]*", re.I)


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for errors, logs, tags and metadata.

    The user-info ends at the *last* `@` (passwords written raw may contain `@`, `/`, `:`
    or `?`); a query `password=` is masked too. A path (`sqlite:///a:b@c.db`) is left alone.
    """
    text = str(url)
    match = _SCHEME.match(text)
    if match is None:
        return text
    scheme, rest = match["scheme"], match["rest"]
    at = rest.rfind("@")
    if at > 0 and not rest.startswith("/"):
        user, colon, _ = rest[:at].partition(":")
        if colon and not any(ch in user for ch in "/?#"):
            rest = f"{user}:***{rest[at:]}"
    return scheme + _QUERY_SECRET.sub(lambda m: f"{m['name']}***", rest)
