"""SQLite and PostgreSQL give the same answers, entries and histories for the same calls.

Hypothesis drives one ledger on each backend through the same random sequence of calls, each
ledger on its own injected clock moved identically (forwards across leases, the TTL cap and
retention, and backwards). Fences are numbered differently by the stores (SQLite hands out event
ids, PostgreSQL a sequence's next value), so every fence is compared by the order it was first
seen in; everything else must be equal.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from ledger_helpers import FakeClock

from rocky_dagster.ledger import Ledger, LedgerConfig, LedgerError, open_ledger

pytestmark = pytest.mark.postgres

CONFIG = LedgerConfig(lease_seconds=60, in_flight_ttl_hours=0.05, retention_days=0.01)
"""Lease 60 s, TTL cap 180 s, retention 864 s: steps of the clock below cross each of them."""
KEYS = ("a", "b")
RUNS = ("run-1", "run-2")
FINGERPRINTS = (None, "f1", "f2")
STEPS = (-200.0, -100.0, -0.000001, 0.0, 0.000001, 30.0, 59.999999, 60.0, 90.0, 190.0, 900.0)
"""Seconds the clocks move by: backwards, across boundaries to the microsecond, past them."""
CURRENT = -1
RANKS = st.sampled_from((CURRENT, CURRENT, CURRENT, 0, 1, 2, 3, 8))
"""Which fence a call names: mostly the key's current one (its holder's), else an older one by
rank, or one never handed out."""
UNKNOWN = 10**12
"""A fence no store handed out (a holder naming a claim it never had)."""
_FENCE = re.compile(r"fence (\d+)")
_schemas = itertools.count()


class _Side:
    """One backend's ledger, clock, and its fences in the order they were first seen."""

    def __init__(self, ledger: Ledger, clock: FakeClock) -> None:
        self.ledger = ledger
        self.clock = clock
        self.order: dict[int, int] = {}
        self.fences: list[int] = []

    def seen(self, fence: int | None) -> int | None:
        """A fence as its rank among the fences seen (first sight numbers it)."""
        if fence is None or fence == UNKNOWN:
            return fence
        if fence not in self.order:
            self.order[fence] = len(self.fences)
            self.fences.append(fence)
        return self.order[fence]

    def fence(self, key: str, rank: int) -> int:
        """This store's fence of rank `rank`; CURRENT: the one `key`'s entry holds; UNKNOWN
        past the last one seen."""
        if rank == CURRENT:
            entry = self.ledger.get(key)
            return UNKNOWN if entry is None else entry.fence
        return self.fences[rank] if rank < len(self.fences) else UNKNOWN

    def text(self, detail: str | None) -> str | None:
        if detail is None:
            return None
        return _FENCE.sub(lambda m: f"fence #{self.seen(int(m[1]))}", detail)

    def normal(self, value: Any) -> Any:
        """A call's answer (a model, bool, int or error) with fences replaced by their rank."""
        if isinstance(value, list):
            return [self.normal(v) for v in value]
        if isinstance(value, BaseException):
            return (type(value).__name__, self.text(str(value)))
        if not hasattr(value, "model_dump"):
            return value
        data = value.model_dump()
        data.pop("id", None)  # an event's id is the store's numbering of its log
        for name in ("fence", "generation"):
            if name in data:
                data[name] = self.seen(data[name])
        if "detail" in data:
            data["detail"] = self.text(data["detail"])
        return data

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.normal(getattr(self.ledger, name)(*args, **kwargs))
        except LedgerError as exc:
            return self.normal(exc)


class BackendsAgree(RuleBasedStateMachine):
    """The same calls on both backends; every answer compared as it comes."""

    tmp: Path
    pg_url: Any

    def __init__(self) -> None:
        super().__init__()
        n = next(_schemas)
        sqlite_clock, pg_clock = FakeClock(), FakeClock()
        self.sides = (
            _Side(
                open_ledger(f"sqlite:///{self.tmp}/diff-{n}.db", CONFIG, clock=sqlite_clock),
                sqlite_clock,
            ),
            _Side(open_ledger(self.pg_url(f"diff{n}"), CONFIG, clock=pg_clock), pg_clock),
        )

    def both(self, name: str, *args: Any, fence_rank: int | None = None, **kwargs: Any) -> None:
        answers = []
        for side in self.sides:
            if fence_rank is not None:
                kwargs["fence"] = side.fence(args[0], fence_rank)
            answers.append(side.call(name, *args, **kwargs))
        sqlite_answer, pg_answer = answers
        assert sqlite_answer == pg_answer, f"{name}{args}{kwargs}: SQLite and PostgreSQL differ"

    @rule(seconds=st.sampled_from(STEPS))
    def move_clocks(self, seconds: float) -> None:
        for side in self.sides:
            side.clock.advance(seconds=seconds)

    @rule(
        key=st.sampled_from(KEYS),
        run_id=st.sampled_from(RUNS),
        fingerprint=st.sampled_from(FINGERPRINTS),
        force=st.booleans(),
    )
    def claim(self, key: str, run_id: str, fingerprint: str | None, force: bool) -> None:
        self.both("claim", key, run_id, fingerprint=fingerprint, force=force)

    @rule(
        key=st.sampled_from(KEYS),
        run_id=st.sampled_from((None, *RUNS)),
        fingerprint=st.sampled_from(FINGERPRINTS),
        force=st.booleans(),
    )
    def peek(self, key: str, run_id: str | None, fingerprint: str | None, force: bool) -> None:
        self.both("peek", key, run_id, fingerprint=fingerprint, force=force)

    @rule(key=st.sampled_from(KEYS), rank=RANKS)
    def heartbeat(self, key: str, rank: int) -> None:
        self.both("heartbeat", key, fence_rank=rank)

    @rule(key=st.sampled_from(KEYS), seconds=st.sampled_from(STEPS))
    def holder_heartbeats(self, key: str, seconds: float) -> None:
        """The key's holder heartbeats as time passes (or the clock steps back)."""
        self.move_clocks(seconds)
        self.both("heartbeat", key, fence_rank=CURRENT)

    @rule(
        key=st.sampled_from(KEYS),
        rank=RANKS,
        outcome=st.sampled_from(("succeeded", "failed")),
        result=st.sampled_from((None, {"rows": 1})),
        reason=st.sampled_from((None, "settled by the run-status sensor")),
    )
    def finalize(
        self, key: str, rank: int, outcome: str, result: dict[str, int] | None, reason: str | None
    ) -> None:
        self.both("finalize", key, outcome=outcome, result=result, reason=reason, fence_rank=rank)

    @rule(key=st.sampled_from(KEYS), rank=RANKS)
    def keep_for_retry(self, key: str, rank: int) -> None:
        self.both("keep_for_retry", key, fence_rank=rank)

    @rule(
        key=st.sampled_from(KEYS),
        run_id=st.sampled_from((None, *RUNS)),
        rank=st.sampled_from((None, CURRENT, 0, 1, 2)),
    )
    def release(self, key: str, run_id: str | None, rank: int | None) -> None:
        if rank is None:
            self.both("release", key, run_id=run_id)
        else:
            self.both("release", key, run_id=run_id, fence_rank=rank)

    @rule(key=st.sampled_from(KEYS))
    def reset(self, key: str) -> None:
        self.both("reset", key)

    @rule(seconds=st.sampled_from(STEPS))
    def sweep_later(self, seconds: float) -> None:
        """Sweep after a move of the clocks (an argument, so sweeps are not drawn more often
        than other calls)."""
        self.move_clocks(seconds)
        self.both("sweep")

    @invariant()
    def same_entries_and_histories(self) -> None:
        for key in KEYS:
            self.both("get", key)
            self.both("history", key)
        self.both("entries")
        self.both("entries", "in_flight", run_id=RUNS[0])

    def teardown(self) -> None:
        for side in self.sides:
            side.ledger.close()


def test_sqlite_and_postgres_agree_on_every_call(tmp_path: Path, postgres_url: str) -> None:
    base = re.search(r"schema=(\w+)", postgres_url)
    assert base is not None
    BackendsAgree.tmp = tmp_path
    BackendsAgree.pg_url = staticmethod(
        lambda suffix: postgres_url.replace(base[0], f"{base[0]}_{suffix}")
    )
    run_state_machine_as_test(
        BackendsAgree,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def test_a_heartbeat_after_the_clock_stepped_back_agrees(tmp_path: Path, postgres_url: str) -> None:
    """The drift that once was: claim, clock back 100 s, heartbeat, clock to +90 s, heartbeat.

    The step back rebases the claim to the earlier time (machine._rebase), so the TTL cap (180 s
    here) counts from there: 190 s later the claim is lost on both backends.
    """
    answers = []
    for url in (f"sqlite:///{tmp_path}/ledger.db", postgres_url):
        clock = FakeClock()
        with open_ledger(url, CONFIG, clock=clock) as ledger:
            claim = ledger.claim("k", "run-1")
            assert claim.fence is not None
            clock.advance(seconds=-100)
            first = ledger.heartbeat("k", claim.fence)
            clock.advance(seconds=190)
            answers.append((first, ledger.heartbeat("k", claim.fence)))
    assert answers == [(True, False), (True, False)]
