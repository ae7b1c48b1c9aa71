"""Operator actions on the ledger, written once for both fronts: the ``rocky-dagster`` CLI and
``ledger_admin_job``. Imports no Dagster (the CLI starts fast).

An action is three steps: `select` the entries a `Selection` names (the filters run in the
store), `plan` what the action does to each (every key is checked before anything is written,
so one refused key leaves all unchanged), then `apply` the plan one fenced write at a time.

Two run filters, named for what they mean, in both fronts:

- ``run_id``: the run recorded on the entry now, i.e. the run that holds it in flight or
  last finished it (also the guard of a single-key action: act only if this run still holds it).
- ``touched_by``: ``run_id``, plus every key whose event history names the run (a claim it
  lost to an adopter, a key it skipped, a holder it reaped).

The fronts differ only in how a fix is phrased (``rocky-dagster ledger reset KEY`` against
``action: reset``): each passes a `Phrasing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from .backend import Ledger
from .errors import LedgerError
from .machine import dedups
from .model import (
    Entry,
    State,
    validate_fence,
    validate_key,
    validate_optional_label,
    validate_reason,
)

Action = Literal["release", "reset", "force"]
"""What an operator can change: free an in-flight claim, forget a finished key, make the next
run of a completed key do the work again."""

Change = Literal["release", "reset", "force", "none"]

DONE: dict[str, str] = {"release": "released", "reset": "reset", "force": "forced"}
"""A change's result once applied (and the verb of its event's reason)."""
UNCHANGED = "unchanged"
LEFT_ALONE = "changed meanwhile: left alone"
NOT_ATTEMPTED = "not attempted (ledger error)"
REFUSED = "refused"
NOT_DONE = "unchanged (the action was refused)"

FORCE_TAG_HINT = "rocky/idempotency=force"
"""The run tag that forces one run (`keys.IDEMPOTENCY_TAG`=`keys.FORCE_VALUE`; the ledger imports no
Dagster-layer module, so the text is repeated here and a test checks it matches)."""


class OperationRefused(LedgerError):
    """The selection or action is refused; nothing was changed."""

    def __init__(self, message: str, rows: Sequence[Row] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)
        """Every selected key, the refused ones with their reason (for a report)."""


@dataclass(frozen=True)
class Phrasing:
    """How a front tells an operator to do something else (its fix for a refusal)."""

    action: Callable[[str], str]
    """'reset' -> 'rocky-dagster ledger reset KEY' (CLI) or 'action: reset' (admin job)."""
    state_filter: Callable[[str], str]
    """'in_flight' -> '--state in_flight' (CLI) or 'state: in_flight' (admin job)."""
    listing: str
    """How to look for keys ('rocky-dagster ledger list', 'action: list and a prefix')."""
    history: str
    """How to read a key's event log ('rocky-dagster ledger history KEY', …)."""


@dataclass(frozen=True)
class Selection:
    """Which entries an action or a listing is about; every filter is applied by the store."""

    key: str | None = None
    """One key, exactly as stored."""
    prefix: str | None = None
    """Every key starting with this text (verbatim: no wildcard)."""
    state: State | None = None
    run_id: str | None = None
    """The run that holds the entry in flight or last finished it."""
    touched_by: str | None = None
    """`run_id`, or a run named anywhere in the key's event history."""
    fence: int | None = None
    """With `key`: only if its entry has this fence."""

    def checked(self) -> Selection:
        """This selection with every value validated (`InvalidArgumentError` naming the field)
        and its combinations checked (`OperationRefused`)."""
        if self.key is not None and self.prefix is not None:
            raise OperationRefused("give key or prefix, not both")
        if self.run_id is not None and self.touched_by is not None:
            raise OperationRefused(
                "give run_id (the run holding or last finishing the key) or touched_by (any "
                "run in its history), not both"
            )
        if self.fence is not None and self.key is None:
            raise OperationRefused("fence guards one key: give key too (or leave fence out)")
        return Selection(
            key=None if self.key is None else validate_key(self.key, "key"),
            prefix=validate_optional_label(self.prefix, "prefix"),
            state=None if self.state is None else State(self.state),
            run_id=validate_optional_label(self.run_id, "run_id"),
            touched_by=validate_optional_label(self.touched_by, "touched_by"),
            fence=None if self.fence is None else validate_fence(self.fence),
        )

    def filters(self) -> list[str]:
        """The filters besides key/prefix, in words ('in state failed', 'held by run r1', …)."""
        return [
            text
            for text in (
                f"in state {self.state.value}" if self.state is not None else "",
                f"held or last finished by run {self.run_id}" if self.run_id is not None else "",
                f"touched by run {self.touched_by}" if self.touched_by is not None else "",
                f"with fence {self.fence}" if self.fence is not None else "",
            )
            if text
        ]

    def describe(self) -> str:
        """'key 'k'', or "prefix 'p/' (in state failed)", or 'every key (…)'."""
        if self.key is not None:
            return f"key {self.key!r}"
        where = f"prefix {self.prefix!r}" if self.prefix is not None else "every key"
        filters = self.filters()
        return f"{where} ({', '.join(filters)})" if filters else where


def select(ledger: Ledger, selection: Selection, phrasing: Phrasing, *, limit: int) -> list[Entry]:
    """The entries `selection` names, newest claim first, at most `limit` of them.

    A key that is missing or fails one of the guards (`state`, `run_id`, `touched_by`, `fence`)
    raises `OperationRefused`: an operator who names one key means that key. Filters over many
    keys are one store query (a key range for the prefix, the store's run and state filters).
    """
    selection = selection.checked()
    if selection.key is not None:
        entry = ledger.get(selection.key)
        if entry is None:
            raise OperationRefused(missing_message(ledger, selection.key, phrasing))
        check_guards(ledger, entry, selection)
        return [entry]
    if selection.touched_by is not None:
        return ledger.entries_touched_by(
            selection.touched_by, selection.state, prefix=selection.prefix, limit=limit
        )
    return ledger.entries(
        selection.state, run_id=selection.run_id, prefix=selection.prefix, limit=limit
    )


def missing_message(ledger: Ledger, key: str, phrasing: Phrasing) -> str:
    """Why a key has no entry: never seen, or reset or swept (its history remains)."""
    if ledger.history(key, limit=1):
        return f"no entry for key {key!r}: it was reset or swept (see: {phrasing.history})"
    return f"no entry and no history for key {key!r} (see: {phrasing.listing})"


def check_guards(ledger: Ledger, entry: Entry, selection: Selection) -> None:
    """Refuse a key whose entry is not the one the operator named."""
    if selection.run_id is not None and entry.run_id != selection.run_id:
        raise OperationRefused(
            f"key {entry.key!r} is held by run {entry.run_id}, not {selection.run_id}"
        )
    touched_by = selection.touched_by
    if (
        touched_by is not None
        and entry.run_id != touched_by
        and not any(e.run_id == touched_by for e in ledger.history(entry.key))
    ):
        raise OperationRefused(
            f"key {entry.key!r} was never touched by run {touched_by} (held by run {entry.run_id})"
        )
    if selection.fence is not None and entry.fence != selection.fence:
        raise OperationRefused(f"key {entry.key!r} has fence {entry.fence}, not {selection.fence}")
    if selection.state is not None and entry.state != selection.state:
        raise OperationRefused(
            f"key {entry.key!r} is {entry.state.value}, not {selection.state.value}"
        )


# --- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One selected key: what it is, what the action does to it, and (after acting) the result."""

    key: str
    state: str
    run_id: str
    fence: int
    change: Change
    """'release', 'reset', 'force', or 'none' (left unchanged, see `note`)."""
    note: str = ""
    result: str = ""
    """After acting: 'released', 'reset', 'forced', 'unchanged', 'changed meanwhile: left alone'
    or 'not attempted (ledger error)'; 'refused' or 'unchanged (the action was refused)' when the
    selection was refused; empty before acting."""
    event: str = ""
    """The event the change wrote to the ledger's log."""


def plan(
    entries: Sequence[Entry],
    action: Action,
    now: datetime,
    phrasing: Phrasing,
    *,
    holder_status: dict[str, str] | None = None,
) -> list[Row]:
    """What `action` does to each entry; raises `OperationRefused` naming every refused key
    (with every row, for a report), so nothing is written when one key is refused.

    `holder_status` maps an in-flight holder's run id to what the caller knows of it (shown in
    the release note, not enforced: a live holder's claim can be released, after a warning).
    """
    many = len(entries) > 1
    rows = [_plan_one(e, action, now, phrasing, holder_status or {}, many) for e in entries]
    refused = [r.note for r in rows if r.result == REFUSED]
    if refused:
        raise OperationRefused(
            f"{action} refused, nothing changed: "
            + "; ".join(refused[:10])
            + (f"; and {len(refused) - 10} more" if len(refused) > 10 else ""),
            [r if r.result else replace(r, result=NOT_DONE) for r in rows],
        )
    return rows


def _plan_one(
    e: Entry,
    action: Action,
    now: datetime,
    phrasing: Phrasing,
    statuses: dict[str, str],
    many: bool,
) -> Row:
    """One key's row: its change and why, or result 'refused' with the reason and the fix."""
    row = Row(e.key, e.state.value, e.run_id, e.fence, "none")
    if action == "release":
        if e.state != State.IN_FLIGHT:
            fix = f"to forget a finished key use {phrasing.action('reset')}"
            if many:
                fix += (
                    "; to release only the in-flight keys of a prefix add "
                    + phrasing.state_filter(State.IN_FLIGHT.value)
                )
            return replace(
                row,
                result=REFUSED,
                note=f"key {e.key!r} is {e.state.value}, not in flight: nothing to release ({fix})",
            )
        lease = "lease expired" if e.lease_expires_at <= now else "lease still running"
        holder = statuses.get(e.run_id, "unknown to this Dagster instance")
        return replace(row, change="release", note=f"{lease}; holder run {holder}")
    if e.state == State.IN_FLIGHT:
        why = (
            "reset forgets finished keys only"
            if action == "reset"
            else f"force never overrides a live claim (nor does the {FORCE_TAG_HINT} tag)"
        )
        return replace(
            row,
            result=REFUSED,
            note=f"key {e.key!r} is in flight (run {e.run_id}): {why}; to free the claim use "
            + phrasing.action("release"),
        )
    if action == "reset":
        return replace(row, change="reset", note="the next run does the work again")
    if not dedups(e):
        return replace(row, note=f"{e.state.value}: the next run proceeds anyway")
    if e.is_expired(now):
        return replace(row, note="record expired: the next run proceeds anyway")
    return replace(row, change="force", note="the next run does the work again")


# --- acting ---------------------------------------------------------------------------------------


def apply(ledger: Ledger, rows: Sequence[Row], *, by: str, reason: str | None) -> Iterator[Row]:
    """Carry out the planned changes one key at a time, yielding each row with its result.

    Each write is fenced to the entry that was checked: a key that changed since is left alone
    (result `LEFT_ALONE`). The event's reason is '<verb> by <by>[: <reason>]'. A ledger error
    stops at that key and propagates; what was yielded before it stays done.
    """
    if reason is not None:
        validate_reason(reason)
    for row in rows:
        if row.change == "none":
            yield replace(row, result=UNCHANGED)
            continue
        verb = DONE[row.change]
        text = f"{verb} by {by}" + (f": {reason}" if reason else "")
        if row.change == "release":
            changed = ledger.release(row.key, run_id=row.run_id, fence=row.fence, reason=text)
        else:
            changed = ledger.reset(row.key, fence=row.fence, reason=text)
        if not changed:
            yield replace(row, result=LEFT_ALONE)
            continue
        last = ledger.history(row.key, limit=1)
        event = f"#{last[0].id} {last[0].kind.value}: {last[0].detail}" if last else ""
        yield replace(row, result=verb, event=event)


# --- presenting -----------------------------------------------------------------------------------


def format_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def entry_note(entry: Entry, now: datetime) -> str:
    """What an operator should know about an entry's clock: a stale claim, an expired record."""
    if entry.state == State.IN_FLIGHT:
        return "stale (adoptable)" if entry.lease_expires_at <= now else ""
    return "expired (awaits sweep)" if entry.is_expired(now) else ""


def holds_until(entry: Entry) -> datetime | None:
    """An in-flight claim's lease end, a finished record's expiry."""
    return entry.lease_expires_at if entry.state == State.IN_FLIGHT else entry.expires_at
