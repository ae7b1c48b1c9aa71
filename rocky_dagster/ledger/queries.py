"""The read queries (`get`, `entries`, `touched_by`, `history`) of every SQL backend, built once.

The backends differ only in their placeholder, in how a key range is made to compare by code
point, and (SQLite) in the index expression the reconcilers' query must name to be indexed;
a `Dialect` says which, so the filters and their validation cannot drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidArgumentError
from .model import (
    ENTRY_COLUMNS,
    Event,
    State,
    corrupt_row,
    validate_key,
    validate_optional_label,
)

EVENT_COLUMNS = ("id", "key", "kind", "run_id", "fence", "at", "detail")
_SURROGATES = range(0xD800, 0xE000)

Query = tuple[str, tuple[Any, ...]]
EVENTS_TABLE = "rocky_ledger_events"


def decode_event(row: tuple[Any, ...], parse_time: Callable[[Any], datetime | None]) -> Event:
    """An `Event` from a row of `EVENT_COLUMNS`, its time read by the store's `parse_time`
    (`LedgerCorruptError` if the row is damaged)."""
    try:
        return Event(
            id=row[0], key=row[1], kind=row[2], run_id=row[3], fence=row[4],
            at=parse_time(row[5]), detail=row[6],
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise corrupt_row(EVENTS_TABLE, row[1], exc) from None


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    """`?` (sqlite3) or `%s` (psycopg)."""
    binary: str = ""
    """Appended to `key` in a prefix range so text compares by code point, as the range needs
    (SQLite's default BINARY collation already does; PostgreSQL's may not: `COLLATE "C"`)."""
    holder: str | None = None
    """An indexed expression equal to `run_id` for in-flight rows and NULL for terminal ones,
    used for the in-flight-by-run filter when the store has one."""


def prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """The key range `[low, high)` holding exactly the keys that start with `prefix`.

    `high` is the smallest string above every extension of `prefix`: its last code point
    incremented (skipping the surrogates, which no key contains), after dropping trailing
    U+10FFFF; None when the prefix is all U+10FFFF (no upper bound then).
    """
    stem = prefix.rstrip(chr(sys.maxunicode))
    if not stem:
        return prefix, None
    last = ord(stem[-1]) + 1
    if last in _SURROGATES:
        last = _SURROGATES.stop
    return prefix, stem[:-1] + chr(last)


def history_limit(value: object) -> int:
    """`history`'s `limit`, checked."""
    return _limit(value, "limit")


def _limit(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{field} must be a non-negative integer, got {value!r}")
    return value


def _state(value: State | str) -> State:
    try:
        return State(value)
    except ValueError:
        raise InvalidArgumentError(
            f"state must be one of {[s.value for s in State]}, got {value!r}"
        ) from None


class ReadQueries:
    """SQL and parameters of the ledger's reads on one store's tables."""

    def __init__(self, dialect: Dialect, entries_table: str, events_table: str) -> None:
        self.dialect = dialect
        self.select_entry = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM {entries_table}"
        self.select_event = f"SELECT {', '.join(EVENT_COLUMNS)} FROM {events_table}"
        self.events_table = events_table

    def get(self, key: str) -> Query:
        return f"{self.select_entry} WHERE key = {self.dialect.placeholder}", (key,)

    def entries(
        self,
        state: State | str | None = None,
        *,
        run_id: str | None = None,
        prefix: str | None = None,
        limit: int = 100,
    ) -> Query:
        """Entries newest claim first: of one state, one run, and/or with keys under a prefix
        (a key range: see `_prefix_range`)."""
        p, where, params = self.dialect.placeholder, [], []
        wanted = None if state is None else _state(state)
        run_id = validate_optional_label(run_id, "run_id")
        if wanted == State.IN_FLIGHT and run_id is not None and self.dialect.holder is not None:
            where.append(f"{self.dialect.holder} = {p}")
            params.append(run_id)
        else:
            if wanted is not None:
                where.append(f"state = {p}")
                params.append(wanted.value)
            if run_id is not None:
                where.append(f"run_id = {p}")
                params.append(run_id)
        self._prefix_range(prefix, where, params)
        sql = self.select_entry + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY claimed_at DESC, fence DESC LIMIT {p}"
        return sql, (*params, _limit(limit, "limit"))

    def touched_by(
        self,
        run_id: str,
        state: State | str | None = None,
        *,
        prefix: str | None = None,
        limit: int = 100,
    ) -> Query:
        """Entries one run holds or last held, or whose event history names it, newest claim
        first. Scans the event log (no index by run): an operator's query."""
        p, params = self.dialect.placeholder, [validate_key(run_id, "run_id")] * 2
        where = [
            f"(run_id = {p} OR key IN (SELECT key FROM {self.events_table} WHERE run_id = {p}))"
        ]
        if state is not None:
            where.append(f"state = {p}")
            params.append(_state(state).value)
        self._prefix_range(prefix, where, params)
        sql = f"{self.select_entry} WHERE {' AND '.join(where)}"
        sql += f" ORDER BY claimed_at DESC, fence DESC LIMIT {p}"
        return sql, (*params, _limit(limit, "limit"))

    def _prefix_range(self, prefix: str | None, where: list[str], params: list[Any]) -> None:
        """Keys starting with `prefix` as a key range (`key >= prefix AND key < successor`), so
        no character of it is a wildcard and the store can walk its primary key."""
        if prefix is None:
            return
        low, high = prefix_bounds(validate_key(prefix, "prefix"))
        key, p = f"key{self.dialect.binary}", self.dialect.placeholder
        where.append(f"{key} >= {p}")
        params.append(low)
        if high is not None:
            where.append(f"{key} < {p}")
            params.append(high)

    def history(self, key: str, *, limit: int | None = None) -> Query:
        """The key's events oldest first; with `limit`, its last `limit` events."""
        p = self.dialect.placeholder
        sql = f"{self.select_event} WHERE key = {p}"
        if limit is None:
            return f"{sql} ORDER BY id", (key,)
        last = f"{sql} ORDER BY id DESC LIMIT {p}"
        return f"SELECT * FROM ({last}) AS last ORDER BY id", (key, _limit(limit, "limit"))
