"""A claim never outlives its owner, and every claim knows its generation (every backend).

The TTL cap binds heartbeats and same-run retries; a clock stepped backwards cannot keep a
dead holder's claim for years; adopting a stale claim checks the fingerprint; `generation`
names the claim that began the key's current generation, and old ledgers are migrated.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from ledger_helpers import CONFIG, LEASE, TICK, TTL, FakeClock, MakeLedger, snapshot

from rocky_dagster.ledger import (
    Decision,
    FingerprintMismatchError,
    Ledger,
    LedgerConfig,
    Outcome,
    State,
    open_ledger,
)
from rocky_dagster.ledger.postgres import parse_url
from rocky_dagster.ledger.sqlite import SCHEMA_VERSION

# --- the TTL cap --------------------------------------------------------------------------------


def test_a_heartbeat_at_or_after_the_ttl_cap_says_the_claim_is_lost(
    ledger: Ledger, clock: FakeClock
):
    claim = ledger.claim("k", "run-1")
    start = clock.now
    while clock.now + LEASE / 2 < start + TTL - TICK:
        clock.advance(seconds=LEASE.total_seconds() / 2)
        assert ledger.heartbeat("k", claim.fence)
    clock.now = start + TTL - TICK
    assert ledger.heartbeat("k", claim.fence)  # a microsecond before the cap: still held
    assert ledger.get("k").lease_expires_at == start + TTL

    clock.now = start + TTL
    assert ledger.heartbeat("k", claim.fence) is False
    assert ledger.claim("k", "run-2").decision == Decision.ADOPTED_STALE
    clock.advance(hours=1)
    assert ledger.heartbeat("k", claim.fence) is False


def test_a_same_run_retry_keeps_the_first_claimed_at_so_the_cap_holds(
    ledger: Ledger, clock: FakeClock
):
    first = ledger.claim("k", "run-1")
    start = clock.now
    retries = []
    held = first
    while clock.now + LEASE / 2 < start + TTL:
        clock.advance(seconds=LEASE.total_seconds() / 2)
        assert ledger.keep_for_retry("k", held.fence)  # the attempt failed, a retry follows
        retry = held = ledger.claim("k", "run-1")  # the op's retry, while the lease lives
        assert retry.decision == Decision.PROCEED
        retries.append(retry)
        entry = ledger.get("k")
        assert entry.claimed_at == start
        assert entry.lease_expires_at == min(clock.now + LEASE, start + TTL)

    clock.now = start + TTL
    last = retries[-1]
    assert ledger.heartbeat("k", last.fence) is False
    adopted = ledger.claim("k", "run-2")
    assert adopted.decision == Decision.ADOPTED_STALE
    assert first.fence < last.fence < adopted.fence


# --- a clock stepped backwards --------------------------------------------------------------------


@pytest.mark.parametrize("back", [timedelta(hours=3), timedelta(days=5 * 365)], ids=["3h", "5y"])
def test_after_the_clock_steps_back_a_dead_holders_claim_is_adoptable_within_a_lease(
    ledger: Ledger, clock: FakeClock, back: timedelta
):
    dead = ledger.claim("k", "run-1")  # its process dies: no heartbeat ever again
    clock.now -= back  # NTP steps the host clock back

    held = ledger.claim("k", "run-2")
    assert held.decision == Decision.SKIPPED_IN_FLIGHT
    assert held.lease_expires_at <= clock.now + LEASE
    entry = ledger.get("k")
    assert (entry.claimed_at, entry.heartbeat_at) == (clock.now, clock.now)

    clock.advance(seconds=LEASE.total_seconds())  # within TTL + lease of real time
    adopted = ledger.claim("k", "run-2")
    assert adopted.decision == Decision.ADOPTED_STALE
    assert adopted.prior_run_id == "run-1" and adopted.generation == dead.fence


def test_after_the_clock_steps_back_a_live_holder_keeps_its_claim(ledger: Ledger, clock: FakeClock):
    live = ledger.claim("k", "run-1")
    clock.now -= timedelta(days=30)
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT
    for _ in range(5):
        clock.advance(seconds=LEASE.total_seconds() / 2)
        assert ledger.heartbeat("k", live.fence)
        assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT
    assert ledger.finalize("k", live.fence, Outcome.SUCCEEDED).applied


# --- fingerprints on adoption ----------------------------------------------------------------------


def test_adopting_a_stale_claim_checks_the_fingerprint(ledger: Ledger, clock: FakeClock):
    ledger.claim("k", "run-1", fingerprint="params-a")
    clock.advance(seconds=LEASE.total_seconds())
    before = snapshot(ledger, "k")

    with pytest.raises(FingerprintMismatchError):
        ledger.claim("k", "run-2", fingerprint="params-b")

    assert snapshot(ledger, "k") == before
    assert ledger.claim("k", "run-2", fingerprint="params-a").decision == Decision.ADOPTED_STALE


def test_force_adopts_a_stale_claim_with_other_parameters(ledger: Ledger, clock: FakeClock):
    ledger.claim("k", "run-1", fingerprint="params-a")
    clock.advance(seconds=LEASE.total_seconds())
    forced = ledger.claim("k", "run-2", fingerprint="params-b", force=True)
    assert forced.decision == Decision.ADOPTED_STALE
    assert ledger.get("k").fingerprint == "params-b"


def test_a_retry_after_a_failure_may_change_the_parameters(ledger: Ledger):
    claim = ledger.claim("k", "run-1", fingerprint="params-a")
    ledger.finalize("k", claim.fence, Outcome.FAILED)
    assert ledger.claim("k", "run-2", fingerprint="params-b").decision == Decision.PROCEED


# --- generations -----------------------------------------------------------------------------------


def test_generations_begin_and_continue_as_documented(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(CONFIG, clock)
    first = ledger.claim("k", "run-1")
    assert first.generation == first.fence  # no entry: begins one
    assert ledger.get("k").generation == first.fence

    assert ledger.keep_for_retry("k", first.fence)
    again = ledger.claim("k", "run-1")  # same-run re-entry: continues
    assert again.fence > first.fence and again.generation == first.fence
    assert ledger.claim("k", "run-2").generation == first.fence  # a skip reports it

    clock.advance(seconds=LEASE.total_seconds())
    adopted = ledger.claim("k", "run-2")  # adoption: continues
    assert adopted.decision == Decision.ADOPTED_STALE and adopted.generation == first.fence
    assert ledger.get("k").generation == first.fence

    ledger.finalize("k", adopted.fence, Outcome.FAILED)
    retry = ledger.claim("k", "run-3")  # after a failure: continues
    assert retry.fence > adopted.fence and retry.generation == first.fence
    ledger.finalize("k", retry.fence, Outcome.SUCCEEDED)
    skip = ledger.claim("k", "run-4")
    assert (skip.decision, skip.generation) == (Decision.SKIPPED_COMPLETED, first.fence)

    forced = ledger.claim("k", "run-4", force=True)  # force: begins one
    assert forced.generation == forced.fence
    ledger.finalize("k", forced.fence, Outcome.SUCCEEDED)
    ledger.reset("k")
    after_reset = ledger.claim("k", "run-5")  # reset: begins one
    assert after_reset.generation == after_reset.fence
    ledger.release("k")
    after_release = ledger.claim("k", "run-6")  # release: continues
    assert after_release.generation == after_reset.fence
    ledger.finalize("k", after_release.fence, Outcome.SUCCEEDED)
    clock.advance(days=2)
    expired = ledger.claim("k", "run-7")  # retention over: begins one
    assert expired.generation == expired.fence


# --- when a generation ends (docs/contract.md "When a generation ends") ------------------------


def _settle(ledger: Ledger, how: str, claim_fence: int, run_id: str) -> None:
    """End claim `claim_fence` of key "k" the way `how` names, without a success."""
    if how == "failed":
        done = ledger.finalize("k", claim_fence, Outcome.FAILED)
    elif how == "failed_by_a_sensor":
        done = ledger.finalize("k", claim_fence, Outcome.FAILED, reason="run is FAILURE (sensor)")
    else:
        kwargs = {"release": {}, "release_run": {"run_id": run_id}}.get(how, {"fence": claim_fence})
        assert ledger.release("k", **kwargs)
        return
    assert done.applied


SETTLEMENTS = ["failed", "failed_by_a_sensor", "release", "release_run", "release_fence"]


@pytest.mark.parametrize("how", SETTLEMENTS)
def test_a_claim_ended_without_a_success_leaves_its_generation_open(
    make_ledger: MakeLedger, clock: FakeClock, how: str
):
    """Whoever ends a claim this way cannot know whether its work committed: the next claim
    continues the generation (a new fence, the same generation), and so does the one after."""
    ledger = make_ledger(CONFIG, clock)
    first = ledger.claim("k", "run-1", fingerprint="fp")
    _settle(ledger, how, first.fence, "run-1")

    entry = ledger.get("k")
    assert entry is not None and entry.state == State.FAILED
    assert entry.released == how.startswith("release")
    assert (entry.fence, entry.generation) == (first.fence, first.fence)

    nxt = ledger.claim("k", "run-2", fingerprint="fp")
    assert nxt.decision == Decision.PROCEED and nxt.prior_run_id == "run-1"
    assert nxt.fence > first.fence and nxt.generation == first.fence
    assert ledger.get("k").generation == first.fence
    _settle(ledger, how, nxt.fence, "run-2")  # settled again: still the same generation
    third = ledger.claim("k", "run-3")
    assert third.generation == first.fence
    assert ledger.finalize("k", third.fence, Outcome.SUCCEEDED).applied
    after = ledger.claim("k", "run-4", force=True)  # a success ends it; the force begins one
    assert after.generation == after.fence > third.fence


@pytest.mark.parametrize("how", SETTLEMENTS)
@pytest.mark.parametrize("ending", ["force", "reset", "retention", "other_fingerprint"])
def test_a_deliberate_redo_begins_a_new_generation_after_any_settlement(
    make_ledger: MakeLedger, clock: FakeClock, how: str, ending: str
):
    ledger = make_ledger(CONFIG, clock)
    first = ledger.claim("k", "run-1", fingerprint="fp")
    _settle(ledger, how, first.fence, "run-1")
    fingerprint = "fp"
    force = False
    if ending == "force":
        force = True
    elif ending == "reset":
        assert ledger.reset("k")
    elif ending == "retention":
        clock.now = ledger.get("k").expires_at
    else:
        fingerprint = "other"  # other parameters: new work

    nxt = ledger.claim("k", "run-2", fingerprint=fingerprint, force=force)

    assert nxt.decision == Decision.PROCEED
    assert nxt.generation == nxt.fence > first.fence
    assert ledger.get("k").generation == nxt.fence


def test_a_release_keeps_a_record_that_never_deduplicates(
    make_ledger: MakeLedger, clock: FakeClock
):
    """Under dedup_on='any' a failure still deduplicates; a released claim never does (its
    work neither succeeded nor failed), and its record goes at the end of retention."""
    ledger = make_ledger(LedgerConfig(**{**CONFIG.model_dump(), "dedup_on": "any"}), clock)
    failed = ledger.claim("f", "run-1")
    ledger.finalize("f", failed.fence, Outcome.FAILED)
    assert ledger.claim("f", "run-2").decision == Decision.SKIPPED_COMPLETED

    held = ledger.claim("k", "run-1")
    assert ledger.release("k", reason="canceled")
    entry = ledger.get("k")
    assert entry is not None and entry.released and entry.dedup_on == "any"
    assert (entry.state, entry.result, entry.finalized_at) == (State.FAILED, None, clock.now)
    assert not ledger.release("k")  # nothing in flight to free
    assert not ledger.heartbeat("k", held.fence) and not ledger.keep_for_retry("k", held.fence)
    again = ledger.claim("k", "run-2")
    assert (again.decision, again.generation) == (Decision.PROCEED, held.fence)
    assert "was released" in ledger.history("k")[-1].detail

    assert ledger.release("k")
    clock.now = ledger.get("k").expires_at
    assert ledger.sweep() == 2  # the released record ends with retention, like any other
    assert ledger.get("k") is None
    assert ledger.claim("k", "run-3").generation > held.fence


def test_a_fresh_handle_sees_the_stored_generation(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(CONFIG, clock)
    first = ledger.claim("k", "run-1")
    clock.advance(seconds=LEASE.total_seconds())
    ledger.claim("k", "run-2")
    other = make_ledger(CONFIG, clock)
    assert other.get("k").generation == first.fence
    assert [e.generation for e in other.entries()] == [first.fence]


# --- migration of ledgers written before `generation` ---------------------------------------------


def _make_v1(url: str) -> None:
    """A ledger as version 1 wrote it: no generation column, schema_version 1."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute("ALTER TABLE rocky_ledger_entries DROP COLUMN generation")
        conn.execute("ALTER TABLE rocky_ledger_entries DROP COLUMN holder_process")
        conn.execute("UPDATE rocky_ledger_meta SET value = 1 WHERE name = 'schema_version'")
        conn.commit()
        conn.close()
        return
    conninfo, schema = parse_url(url)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{schema}".rocky_ledger_entries DROP COLUMN generation')
        conn.execute(f'ALTER TABLE "{schema}".rocky_ledger_entries DROP COLUMN holder_process')
        conn.execute(
            f"UPDATE \"{schema}\".rocky_ledger_meta SET value = 1 WHERE name = 'schema_version'"
        )


def test_a_version_1_ledger_is_migrated_on_open(ledger_url: str, clock: FakeClock):
    with open_ledger(ledger_url, CONFIG, clock=clock) as old:
        done = old.claim("done", "run-1")
        old.finalize("done", done.fence, Outcome.SUCCEEDED, result={"rows": 3})
        live = old.claim("live", "run-1")
    _make_v1(ledger_url)

    with open_ledger(ledger_url, CONFIG, clock=clock) as ledger:
        assert ledger.get("done").generation == done.fence
        assert ledger.get("done").result == {"rows": 3}
        assert ledger.get("live").generation == live.fence
        assert ledger.claim("done", "run-2").decision == Decision.SKIPPED_COMPLETED
        clock.advance(seconds=LEASE.total_seconds())
        adopted = ledger.claim("live", "run-2")
        assert (adopted.decision, adopted.generation) == (Decision.ADOPTED_STALE, live.fence)
        assert ledger.finalize("live", adopted.fence, Outcome.SUCCEEDED).state == State.SUCCEEDED
        assert ledger.check() == []


def _make_v3(url: str) -> None:
    """A ledger as version 3 wrote it: no holder_process column, schema_version 3."""
    drop = "ALTER TABLE {}rocky_ledger_entries DROP COLUMN holder_process"
    version = "UPDATE {}rocky_ledger_meta SET value = 3 WHERE name = 'schema_version'"
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute(drop.format(""))
        conn.execute(version.format(""))
        conn.commit()
        conn.close()
        return
    conninfo, schema = parse_url(url)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(drop.format(f'"{schema}".'))
        conn.execute(version.format(f'"{schema}".'))


def test_a_version_3_ledger_is_migrated_and_its_live_claims_have_unknown_holders(
    ledger_url: str, clock: FakeClock
):
    """A claim written before v4 names no process: the run's next attempt cannot know that
    the holder is gone, so it waits for the lease (or a park) like any other claimant."""
    with open_ledger(ledger_url, CONFIG, clock=clock) as old:
        done = old.claim("done", "run-1")
        old.finalize("done", done.fence, Outcome.SUCCEEDED, result={"rows": 3})
        live = old.claim("live", "run-1")
        parked = old.claim("parked", "run-1")
    _make_v3(ledger_url)

    with open_ledger(ledger_url, CONFIG, clock=clock) as ledger:
        assert ledger.get("live").holder_process is None
        assert ledger.get("done").result == {"rows": 3}
        assert ledger.claim("done", "run-2").decision == Decision.SKIPPED_COMPLETED
        assert ledger.claim("live", "run-1").decision == Decision.SKIPPED_IN_FLIGHT
        assert ledger.keep_for_retry("parked", parked.fence)
        again = ledger.claim("parked", "run-1")
        assert (again.decision, again.generation) == (Decision.PROCEED, parked.fence)
        assert ledger.get("parked").holder_process not in (None, "parked")
        clock.advance(seconds=LEASE.total_seconds())
        adopted = ledger.claim("live", "run-1")
        assert (adopted.decision, adopted.generation) == (Decision.ADOPTED_STALE, live.fence)
        assert ledger.check() == []


def test_the_migrated_sqlite_file_says_the_current_version(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        ledger.claim("k", "run-1")
    _make_v1(url)
    open_ledger(url).close()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        version = conn.execute(
            "SELECT value FROM rocky_ledger_meta WHERE name = 'schema_version'"
        ).fetchone()
        assert version == (SCHEMA_VERSION,) == (5,)
    finally:
        conn.close()
