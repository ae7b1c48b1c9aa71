"""Helpers shared by the ledger tests (a module, so test files can import them by name)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from rocky_dagster.ledger import Entry, Event, Ledger, LedgerConfig, Stats

# A clock far from the real one, so a test that forgot to inject it cannot pass by accident.
CLOCK_START = datetime(2031, 3, 14, 15, 9, 26, tzinfo=UTC)


class FakeClock:
    """A clock tests move by hand: `clock.advance(seconds=5)`; the ledger calls `clock()`."""

    def __init__(self, start: datetime = CLOCK_START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


MakeLedger = Callable[..., Ledger]
"""The `make_ledger` fixture: `make_ledger(config=None, clock=None) -> Ledger`."""

Snapshot = tuple[Entry | None, list[Event], Stats]


def snapshot(ledger: Ledger, key: str) -> Snapshot:
    """What a rejected call must leave exactly as it was: the entry, its history, the totals."""
    return ledger.get(key), ledger.history(key), ledger.stats()


CONFIG = LedgerConfig(lease_seconds=60, in_flight_ttl_hours=2, retention_days=1)
"""The suite's policy: short enough durations that a test moves the clock across them."""
LEASE = timedelta(seconds=60)
TTL = timedelta(hours=2)
RETENTION = timedelta(days=1)
TICK = timedelta(microseconds=1)
"""The store keeps microseconds: the smallest step across a boundary."""


def replay(events: list[Event]) -> tuple[str | None, str | None, int | None, int]:
    """Check one key's log against the state machine; the final (state, run, fence, generations).

    A generation starts with `claimed` and may only start when nobody holds the key.
    """
    state: str | None = None
    run_id: str | None = None
    fence: int | None = None
    generations = 0
    for event in events:
        kind = event.kind.value
        if kind == "claimed":
            assert state in (None, "failed"), f"two live holders: {event} while {state}"
            state, run_id, fence = "in_flight", event.run_id, event.fence
            generations += 1
        elif kind == "skipped_in_flight":
            assert state == "in_flight", event
        elif kind == "skipped_completed":
            assert state == "succeeded", event
        elif kind in ("succeeded", "failed"):
            assert state == "in_flight" and (event.fence, event.run_id) == (fence, run_id), event
            state = kind
        else:
            raise AssertionError(f"unexpected event in a race without leases running out: {event}")
    return state, run_id, fence, generations
