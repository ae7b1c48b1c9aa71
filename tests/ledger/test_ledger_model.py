"""Model-based test: the SQLite ledger against a tiny in-memory reference, step by step.

Hypothesis drives random sequences of claim / finalize / heartbeat / clock moves / sweep /
reset / release / reopen-under-the-other-policy on two keys and three runs, with short
durations and whole-second clock steps so that every `<=` boundary is hit exactly. After each
step every entry, every key's event log and the stats must match the reference.

The reference restates the ledger contract (docs/contract.md) on plain dicts; it shares no
code with the ledger.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from ledger_helpers import CLOCK_START

from rocky_dagster.ledger import FingerprintMismatchError, Ledger, LedgerConfig, open_ledger

KEYS = ("a", "b")
RUNS = ("r1", "r2", "r3")
FINGERPRINTS = (None, "fp1", "fp2")
TTL = timedelta(seconds=45)  # in_flight_ttl_hours=0.0125
RETENTION = timedelta(seconds=86.4)  # retention_days=0.001
LEASES = (10, 60)  # seconds: shorter than the TTL cap, or capped by it
TICK = timedelta(microseconds=1)
STEPS = [TICK] + [timedelta(seconds=s) for s in (1, 5, 10, 30, 45, 60, 87, 200)]


@dataclass(frozen=True)
class Row:
    state: str
    run_id: str
    fence: int
    fingerprint: str | None
    claimed_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime
    dedup_on: str
    prior_run_id: str | None
    finalized_at: datetime | None = None
    expires_at: datetime | None = None
    result: dict[str, Any] | None = None
    generation: int = 0
    parked: bool = False
    """Kept for the run's retry: the run's next claim re-enters it (every claim here comes
    from this one process, so an unparked live claim of the same run is never re-entered)."""
    released: bool = False
    """Freed by `release`: kept as `failed`, never deduplicating, its generation still open."""


@dataclass
class Reference:
    """The contract as plain data: rows by key, each key's events, the clock, the fences seen."""

    policy: str
    lease: timedelta
    now: datetime = CLOCK_START
    rows: dict[str, Row] = field(default_factory=dict)
    events: dict[str, list[tuple[str, str | None, int | None, datetime]]] = field(
        default_factory=lambda: {k: [] for k in KEYS}
    )
    fences: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KEYS})
    last_fence: int = 0

    def log(self, key: str, kind: str, run_id: str | None, fence: int | None) -> None:
        self.events[key].append((kind, run_id, fence, self.now))

    def binds(self, row: Row) -> bool:
        """A terminal row still deduplicates: not expired, and a success or a failure under any."""
        live = row.expires_at is not None and self.now < row.expires_at
        return live and (row.state == "succeeded" or (row.dedup_on == "any" and not row.released))

    def claim(
        self, key: str, run_id: str, fingerprint: str | None, force: bool
    ) -> tuple[str, str | None, str | None, bool, str]:
        """(decision, prior_run_id, held_by, forced, event kind); raises on a mismatch."""
        row = self.rows.get(key)

        def mismatch() -> bool:
            return fingerprint is not None and row.fingerprint not in (None, fingerprint)

        if row is None:
            return "proceed", None, None, False, "claimed"
        if row.state == "in_flight":
            if row.lease_expires_at <= self.now:
                if not force and mismatch():
                    raise FingerprintMismatchError(key, row.fingerprint, fingerprint, row.run_id)
                return "adopted_stale", row.run_id, None, False, "adopted"
            if not force and mismatch():
                raise FingerprintMismatchError(key, row.fingerprint, fingerprint, row.run_id)
            if row.run_id == run_id and row.parked:
                return "proceed", run_id, None, False, "claimed"
            return "skipped_in_flight", None, row.run_id, False, "skipped_in_flight"
        if not self.binds(row):
            return "proceed", row.run_id, None, False, "claimed"
        if force:
            return "proceed", row.run_id, None, True, "forced"
        if mismatch():
            raise FingerprintMismatchError(key, row.fingerprint, fingerprint, row.run_id)
        return "skipped_completed", row.run_id, None, False, "skipped_completed"

    def take(
        self,
        key: str,
        run_id: str,
        fingerprint: str | None,
        fence: int,
        prior: str | None,
        kind: str,
        force: bool,
    ):
        """A claim that runs: adoption, same-run re-entry, and an unforced claim of the same
        work after a failure or a release (not expired) continue the key's generation, and a
        re-entry keeps the first attempt's claimed_at (the TTL cap holds)."""
        old = self.rows.get(key)
        live = old is not None and old.state == "in_flight"
        reentry = live and kind == "claimed" and old.run_id == run_id
        unfinished = (
            old is not None
            and not live
            and self.now < old.expires_at
            and not self.binds(old)
            and not force
            and (fingerprint is None or old.fingerprint in (None, fingerprint))
        )
        claimed_at = old.claimed_at if reentry else self.now
        self.rows[key] = Row(
            state="in_flight",
            run_id=run_id,
            fence=fence,
            fingerprint=fingerprint,
            claimed_at=claimed_at,
            heartbeat_at=self.now,
            lease_expires_at=min(self.now + self.lease, claimed_at + TTL),
            dedup_on=self.policy,
            prior_run_id=prior,
            generation=old.generation
            if (live and (reentry or kind == "adopted")) or unfinished
            else fence,
        )
        self.fences[key].append(fence)
        self.last_fence = fence

    def keep_for_retry(self, key: str, fence: int) -> bool:
        row = self.rows.get(key)
        if row is None or row.fence != fence or row.state != "in_flight":
            return False
        if not row.parked:
            self.rows[key] = replace(row, parked=True)
            self.log(key, "kept_for_retry", row.run_id, fence)
        return True

    def finalize(self, key: str, fence: int, outcome: str, result: dict | None) -> str:
        row = self.rows.get(key)
        if row is None:
            self.log(key, "lost", None, fence)
            return "not_found"
        if row.fence != fence:
            self.log(key, "lost", None, fence)
            return "stale_fence"
        if row.released:
            self.log(key, "lost", None, fence)
            return "released"
        if row.state != "in_flight":
            return "already_final"
        self.rows[key] = replace(
            row,
            state=outcome,
            finalized_at=self.now,
            expires_at=self.now + RETENTION,
            result=result,
        )
        self.log(key, outcome, row.run_id, fence)
        return "applied"

    def heartbeat(self, key: str, fence: int) -> bool:
        row = self.rows.get(key)
        if row is None or row.fence != fence or row.state != "in_flight":
            return False
        if row.claimed_at + TTL <= self.now:
            return False  # past the hard cap: lost
        lease = min(self.now + self.lease, row.claimed_at + TTL)
        self.rows[key] = replace(row, heartbeat_at=self.now, lease_expires_at=lease)
        return True

    def sweep(self) -> int:
        horizon = self.now - RETENTION
        doomed = [
            key
            for key, row in self.rows.items()
            if (row.state != "in_flight" and row.expires_at <= self.now)
            or (row.state == "in_flight" and row.lease_expires_at <= horizon)
        ]
        for key in doomed:
            row = self.rows.pop(key)
            self.log(key, "swept", row.run_id, row.fence)
        for key in KEYS:
            self.events[key] = [e for e in self.events[key] if e[3] >= horizon]
        return len(doomed)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-model-")
        self.url = f"sqlite:///{self.dir}/ledger.db"
        self.ref = Reference(policy="success", lease=timedelta(seconds=LEASES[0]))
        self.ledger: Ledger | None = None

    def open(self, policy: str, lease_seconds: int) -> None:
        if self.ledger is not None:
            self.ledger.close()
        self.ref.policy, self.ref.lease = policy, timedelta(seconds=lease_seconds)
        config = LedgerConfig(
            dedup_on=policy,
            lease_seconds=lease_seconds,
            in_flight_ttl_hours=0.0125,
            retention_days=0.001,
        )
        assert (config.lease, config.in_flight_ttl, config.retention) == (
            self.ref.lease,
            TTL,
            RETENTION,
        )
        self.ledger = open_ledger(self.url, config, clock=lambda: self.ref.now)

    def teardown(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(policy=st.sampled_from(["success", "any"]), lease=st.sampled_from(LEASES))
    def start(self, policy: str, lease: int) -> None:
        self.open(policy, lease)

    @rule(policy=st.sampled_from(["success", "any"]), lease=st.sampled_from(LEASES))
    def reopen(self, policy: str, lease: int) -> None:
        """Another process (or a config change) with a possibly different policy, same store."""
        self.open(policy, lease)

    @rule(
        key=st.sampled_from(KEYS),
        run_id=st.sampled_from(RUNS),
        fingerprint=st.sampled_from(FINGERPRINTS),
        force=st.booleans(),
    )
    def claim(self, key: str, run_id: str, fingerprint: str | None, force: bool) -> None:
        try:
            decision, prior, held_by, forced, kind = self.ref.claim(key, run_id, fingerprint, force)
        except FingerprintMismatchError as expected:
            try:
                self.ledger.claim(key, run_id, fingerprint=fingerprint, force=force)
            except FingerprintMismatchError as raised:
                assert (raised.stored, raised.given, raised.run_id) == (
                    expected.stored,
                    expected.given,
                    expected.run_id,
                )
            else:
                raise AssertionError("expected a fingerprint mismatch") from None
            return
        claim = self.ledger.claim(key, run_id, fingerprint=fingerprint, force=force)
        assert (claim.decision.value, claim.prior_run_id, claim.held_by_run_id, claim.forced) == (
            decision,
            prior,
            held_by,
            forced,
        )
        if claim.should_run:
            assert claim.fence is not None and claim.fence > self.ref.last_fence
            self.ref.take(key, run_id, fingerprint, claim.fence, prior, kind, force)
            assert claim.generation == self.ref.rows[key].generation
            self.ref.log(key, kind, run_id, claim.fence)
        else:
            assert claim.fence is None
            expected_result = self.ref.rows[key].result if decision == "skipped_completed" else None
            assert claim.result == expected_result
            self.ref.log(key, kind, run_id, None)

    def fence(self, key: str) -> st.SearchStrategy[int]:
        """Mostly the key's live fence (so work gets finalized), else an old or unknown one."""
        row = self.ref.rows.get(key)
        current = [row.fence] * 4 if row is not None else []
        return st.sampled_from([*current, *self.ref.fences[key], 10**9])

    @rule(
        data=st.data(),
        key=st.sampled_from(KEYS),
        outcome=st.sampled_from(["succeeded", "succeeded", "failed"]),
        result=st.sampled_from([None, {"rows": 1}, {"tables": ["x", "y"], "ok": True}]),
    )
    def finalize(self, data: st.DataObject, key: str, outcome: str, result: dict | None) -> None:
        fence = data.draw(self.fence(key), label="fence")
        expected = self.ref.finalize(key, fence, outcome, result)
        done = self.ledger.finalize(key, fence, outcome, result=result)
        assert (done.reason.value, done.applied) == (expected, expected == "applied")

    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def heartbeat(self, data: st.DataObject, key: str) -> None:
        fence = data.draw(self.fence(key), label="fence")
        assert self.ledger.heartbeat(key, fence) == self.ref.heartbeat(key, fence)

    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def keep_for_retry(self, data: st.DataObject, key: str) -> None:
        fence = data.draw(self.fence(key), label="fence")
        assert self.ledger.keep_for_retry(key, fence) == self.ref.keep_for_retry(key, fence)

    @rule(step=st.sampled_from(STEPS))
    def advance(self, step: timedelta) -> None:
        self.ref.now += step

    def deadlines(self, early: bool) -> list[tuple[datetime, str]]:
        """Lease ends and retention ends still ahead (or a microsecond before them), with keys."""
        return sorted(
            {
                (moment - (TICK if early else timedelta(0)), key)
                for key, row in self.ref.rows.items()
                for moment in (row.lease_expires_at, row.expires_at)
                if moment is not None and moment - TICK > self.ref.now
            }
        )

    @rule(data=st.data(), early=st.booleans())
    def advance_to_a_deadline(self, data: st.DataObject, early: bool) -> None:
        """Land exactly on (or a microsecond before) a lease end or a retention end."""
        deadlines = self.deadlines(early)
        if deadlines:
            self.ref.now = data.draw(st.sampled_from(deadlines), label="deadline")[0]

    @rule(
        data=st.data(),
        early=st.booleans(),
        run_id=st.sampled_from(RUNS),
        fingerprint=st.sampled_from(FINGERPRINTS),
        force=st.booleans(),
    )
    def claim_at_a_deadline(
        self, data: st.DataObject, early: bool, run_id: str, fingerprint: str | None, force: bool
    ) -> None:
        """Claim a key exactly when (or a microsecond before) its lease or retention ends."""
        deadlines = self.deadlines(early)
        if deadlines:
            self.ref.now, key = data.draw(st.sampled_from(deadlines), label="deadline")
            self.claim(key, run_id, fingerprint, force)

    @rule()
    def sweep(self) -> None:
        assert self.ledger.sweep() == self.ref.sweep()

    @rule(key=st.sampled_from(KEYS))
    def reset(self, key: str) -> None:
        row = self.ref.rows.get(key)
        expected = row is not None and row.state != "in_flight"
        assert self.ledger.reset(key) == expected
        if expected:
            del self.ref.rows[key]
            self.ref.log(key, "reset", row.run_id, row.fence)

    @rule(key=st.sampled_from(KEYS), guard=st.sampled_from(["none", "run", "fence", "wrong"]))
    def release(self, key: str, guard: str) -> None:
        row = self.ref.rows.get(key)
        kwargs: dict[str, Any] = {}
        if guard == "run":
            kwargs["run_id"] = row.run_id if row else "r1"
        elif guard == "fence":
            kwargs["fence"] = row.fence if row else 1
        elif guard == "wrong":
            kwargs["run_id"] = "nobody"
        expected = row is not None and row.state == "in_flight" and guard != "wrong"
        assert self.ledger.release(key, **kwargs) == expected
        if expected:
            self.ref.rows[key] = replace(
                row,
                state="failed",
                finalized_at=self.ref.now,
                expires_at=self.ref.now + RETENTION,
                result=None,
                parked=False,
                released=True,
            )
            self.ref.log(key, "released", row.run_id, row.fence)

    @invariant()
    def entries_match(self) -> None:
        if self.ledger is None:
            return
        for key in KEYS:
            row, entry = self.ref.rows.get(key), self.ledger.get(key)
            if row is None:
                assert entry is None, key
                continue
            assert entry is not None, key
            assert (
                entry.state.value,
                entry.run_id,
                entry.fence,
                entry.fingerprint,
                entry.claimed_at,
                entry.heartbeat_at,
                entry.lease_expires_at,
                entry.finalized_at,
                entry.expires_at,
                entry.dedup_on,
                entry.result,
                entry.prior_run_id,
                entry.generation,
                entry.holder_process == "parked",
                entry.released,
            ) == (
                row.state,
                row.run_id,
                row.fence,
                row.fingerprint,
                row.claimed_at,
                row.heartbeat_at,
                row.lease_expires_at,
                row.finalized_at,
                row.expires_at,
                row.dedup_on,
                row.result,
                row.prior_run_id,
                row.generation,
                row.parked,
                row.released,
            ), key

    @invariant()
    def events_match(self) -> None:
        if self.ledger is None:
            return
        for key in KEYS:
            logged = [(e.kind.value, e.run_id, e.fence, e.at) for e in self.ledger.history(key)]
            assert logged == self.ref.events[key], key

    @invariant()
    def stats_match(self) -> None:
        if self.ledger is None:
            return
        rows, now = self.ref.rows.values(), self.ref.now
        stats = self.ledger.stats()
        assert (stats.entries, stats.in_flight, stats.succeeded, stats.failed) == (
            len(rows),
            sum(r.state == "in_flight" for r in rows),
            sum(r.state == "succeeded" for r in rows),
            sum(r.state == "failed" for r in rows),
        )
        assert stats.expired == sum(r.state != "in_flight" and r.expires_at <= now for r in rows)
        assert stats.stale_in_flight == sum(
            r.state == "in_flight" and r.lease_expires_at <= now for r in rows
        )
        assert stats.events == sum(len(e) for e in self.ref.events.values())
        assert stats.last_fence >= self.ref.last_fence


LedgerMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerAgainstReference = LedgerMachine.TestCase
