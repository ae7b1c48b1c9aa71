"""The ledger contract (docs/contract.md, "Ledger contract"), written against the `Ledger` API only.

Every test runs once per backend (`ledger_url`); time moves only through the injected
`FakeClock`, and boundaries are probed one microsecond either side.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from ledger_helpers import (
    CONFIG,
    LEASE,
    RETENTION,
    TICK,
    TTL,
    FakeClock,
    MakeLedger,
    snapshot,
)

from rocky_dagster.ledger import (
    Decision,
    EventKind,
    FinalizeReason,
    FingerprintMismatchError,
    InvalidArgumentError,
    Ledger,
    LedgerConfig,
    Outcome,
    State,
)

ANY = LedgerConfig(**{**CONFIG.model_dump(), "dedup_on": "any"})


def kinds(ledger: Ledger, key: str) -> list[str]:
    return [event.kind.value for event in ledger.history(key)]


def claim_and_finish(ledger: Ledger, key: str, run_id: str, outcome: Outcome, **kw) -> int:
    claim = ledger.claim(key, run_id)
    assert claim.decision == Decision.PROCEED, claim
    assert claim.fence is not None
    assert ledger.finalize(key, claim.fence, outcome, **kw).applied
    return claim.fence


# --- the decision table (docs/contract.md, "Claim decisions"), one row at a time ------------------


def test_first_claim_proceeds_and_writes_an_in_flight_entry(ledger: Ledger, clock: FakeClock):
    claim = ledger.claim("job/a", "run-1", pipeline="replication", fingerprint="fp-1")

    assert claim.decision == Decision.PROCEED and claim.should_run
    assert isinstance(claim.fence, int) and claim.fence >= 1
    assert (claim.prior_run_id, claim.held_by_run_id, claim.forced) == (None, None, False)
    assert claim.lease_expires_at == clock.now + LEASE
    entry = ledger.get("job/a")
    assert entry is not None
    assert (entry.key, entry.state, entry.run_id, entry.fence) == (
        "job/a",
        State.IN_FLIGHT,
        "run-1",
        claim.fence,
    )
    assert (entry.pipeline, entry.fingerprint, entry.dedup_on) == ("replication", "fp-1", "success")
    assert entry.claimed_at == entry.heartbeat_at == clock.now
    assert entry.lease_expires_at == clock.now + LEASE
    assert (entry.finalized_at, entry.expires_at, entry.result) == (None, None, None)
    assert kinds(ledger, "job/a") == ["claimed"]


def test_live_success_skips_with_the_prior_run_and_its_result(ledger: Ledger):
    claim_and_finish(ledger, "k", "run-1", Outcome.SUCCEEDED, result={"rows": 42, "t": ["a"]})
    before = ledger.get("k")

    claim = ledger.claim("k", "run-2")

    assert claim.decision == Decision.SKIPPED_COMPLETED and not claim.should_run
    assert (claim.fence, claim.prior_run_id, claim.result) == (
        None,
        "run-1",
        {"rows": 42, "t": ["a"]},
    )
    assert claim.expires_at == before.expires_at
    assert ledger.get("k") == before  # a skip writes an event only
    assert kinds(ledger, "k") == ["claimed", "succeeded", "skipped_completed"]


def test_success_dedups_until_the_instant_retention_ends_even_before_any_sweep(
    ledger: Ledger, clock: FakeClock
):
    claim_and_finish(ledger, "k", "run-1", Outcome.SUCCEEDED)
    expires_at = ledger.get("k").expires_at
    assert expires_at == clock.now + RETENTION

    clock.now = expires_at - TICK
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_COMPLETED
    assert ledger.stats().expired == 0

    clock.now = expires_at
    assert ledger.stats().expired == 1  # expired, still unswept
    claim = ledger.claim("k", "run-3")
    assert claim.decision == Decision.PROCEED
    assert claim.prior_run_id == "run-1"
    assert ledger.get("k").state == State.IN_FLIGHT


def test_failure_under_dedup_any_skips_as_completed(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(ANY, clock)
    claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)

    claim = ledger.claim("k", "run-2")

    assert claim.decision == Decision.SKIPPED_COMPLETED
    assert (claim.fence, claim.prior_run_id) == (None, "run-1")
    assert ledger.get("k").state == State.FAILED


def test_failure_under_dedup_success_is_claimable_at_once(ledger: Ledger):
    """F1 analogue: a failed claim never leaves the key looking in flight."""
    first = claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)
    assert ledger.get("k").state == State.FAILED  # the failure is kept, as a record

    claim = ledger.claim("k", "run-2")

    assert claim.decision == Decision.PROCEED
    assert claim.prior_run_id == "run-1"
    assert claim.fence > first
    entry = ledger.get("k")
    assert (entry.state, entry.run_id, entry.fence) == (State.IN_FLIGHT, "run-2", claim.fence)
    assert (entry.finalized_at, entry.expires_at, entry.result) == (None, None, None)


def test_reentrant_claim_by_the_same_run_gets_a_new_fence_and_retires_the_old(ledger: Ledger):
    first = ledger.claim("k", "run-1")
    assert ledger.keep_for_retry("k", first.fence)  # the attempt failed and will be retried

    again = ledger.claim("k", "run-1")

    assert again.decision == Decision.PROCEED
    assert again.fence > first.fence
    assert ledger.get("k").fence == again.fence
    stale = ledger.finalize("k", first.fence, Outcome.SUCCEEDED)
    assert (stale.applied, stale.reason) == (False, FinalizeReason.STALE_FENCE)
    assert ledger.finalize("k", again.fence, Outcome.SUCCEEDED).applied


def test_live_claim_of_another_run_skips_in_flight_and_names_the_holder(
    ledger: Ledger, clock: FakeClock
):
    held = ledger.claim("k", "run-1")
    before = ledger.get("k")
    clock.advance(seconds=59)

    claim = ledger.claim("k", "run-2")

    assert claim.decision == Decision.SKIPPED_IN_FLIGHT
    assert (claim.fence, claim.held_by_run_id) == (None, "run-1")
    assert claim.lease_expires_at == held.lease_expires_at
    assert ledger.get("k") == before
    assert kinds(ledger, "k") == ["claimed", "skipped_in_flight"]


def test_a_claim_whose_lease_ran_out_is_adopted_at_the_exact_boundary(
    ledger: Ledger, clock: FakeClock
):
    held = ledger.claim("k", "run-1")

    clock.now = held.lease_expires_at - TICK
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT
    assert ledger.stats().stale_in_flight == 0

    clock.now = held.lease_expires_at
    assert ledger.stats().stale_in_flight == 1
    adopted = ledger.claim("k", "run-2")

    assert adopted.decision == Decision.ADOPTED_STALE and adopted.should_run
    assert adopted.prior_run_id == "run-1"
    assert adopted.fence > held.fence
    entry = ledger.get("k")
    assert (entry.state, entry.run_id, entry.fence) == (State.IN_FLIGHT, "run-2", adopted.fence)
    assert entry.claimed_at == clock.now and entry.lease_expires_at == clock.now + LEASE
    assert kinds(ledger, "k") == ["claimed", "skipped_in_flight", "adopted"]


def test_in_flight_ttl_caps_a_claim_even_while_it_heartbeats(ledger: Ledger, clock: FakeClock):
    held = ledger.claim("k", "run-1")
    claimed_at = clock.now
    for _ in range(3):
        clock.advance(seconds=50)
        assert ledger.heartbeat("k", held.fence)
        assert ledger.get("k").lease_expires_at == clock.now + LEASE

    clock.now = claimed_at + TTL - timedelta(seconds=30)
    assert ledger.heartbeat("k", held.fence)
    assert ledger.get("k").lease_expires_at == claimed_at + TTL  # capped, not now + lease
    clock.now = claimed_at + TTL - TICK
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT

    clock.now = claimed_at + TTL
    adopted = ledger.claim("k", "run-2")

    assert adopted.decision == Decision.ADOPTED_STALE
    assert adopted.prior_run_id == "run-1"
    assert not ledger.heartbeat("k", held.fence)


def test_a_ttl_shorter_than_the_lease_caps_the_first_lease(
    make_ledger: MakeLedger, clock: FakeClock
):
    ledger = make_ledger({"lease_seconds": 7200, "in_flight_ttl_hours": 0.5}, clock)

    claim = ledger.claim("k", "run-1")

    assert claim.lease_expires_at == clock.now + timedelta(minutes=30)
    clock.advance(minutes=30)
    assert ledger.claim("k", "run-2").decision == Decision.ADOPTED_STALE


# --- finalize (docs/contract.md, "Finalize") ------------------------------------------------------


def test_finalize_success_sets_state_expiry_and_result(ledger: Ledger, clock: FakeClock):
    claim = ledger.claim("k", "run-1")
    clock.advance(seconds=5)

    done = ledger.finalize("k", claim.fence, "succeeded", result={"n": 1, "nested": {"x": None}})

    assert (done.applied, done.reason, done.state) == (
        True,
        FinalizeReason.APPLIED,
        State.SUCCEEDED,
    )
    assert (done.key, done.fence, done.outcome, done.run_id) == (
        "k",
        claim.fence,
        Outcome.SUCCEEDED,
        "run-1",
    )
    assert done.expires_at == clock.now + RETENTION
    entry = ledger.get("k")
    assert (entry.state, entry.finalized_at, entry.expires_at) == (
        State.SUCCEEDED,
        clock.now,
        clock.now + RETENTION,
    )
    assert entry.result == {"n": 1, "nested": {"x": None}}
    assert entry.fence == claim.fence and entry.claimed_at == clock.now - timedelta(seconds=5)


def test_finalize_failure_keeps_a_failed_record(ledger: Ledger, clock: FakeClock):
    claim = ledger.claim("k", "run-1")

    done = ledger.finalize("k", claim.fence, Outcome.FAILED)

    assert (done.applied, done.state) == (True, State.FAILED)
    entry = ledger.get("k")
    assert (entry.state, entry.run_id, entry.finalized_at) == (State.FAILED, "run-1", clock.now)
    assert kinds(ledger, "k") == ["claimed", "failed"]


def test_finalize_is_one_shot_a_failure_after_a_success_changes_nothing(ledger: Ledger):
    claim = ledger.claim("k", "run-1")
    assert ledger.finalize("k", claim.fence, Outcome.SUCCEEDED, result={"v": 1}).applied
    before = snapshot(ledger, "k")

    late_failure = ledger.finalize("k", claim.fence, Outcome.FAILED)
    second_success = ledger.finalize("k", claim.fence, Outcome.SUCCEEDED, result={"v": 2})

    for result in (late_failure, second_success):
        assert (result.applied, result.reason) == (False, FinalizeReason.ALREADY_FINAL)
        assert result.state == State.SUCCEEDED
    assert snapshot(ledger, "k") == before  # no write, no event
    assert ledger.get("k").result == {"v": 1}


def test_finalize_of_a_key_never_claimed_is_not_found_and_logged_as_lost(ledger: Ledger):
    result = ledger.finalize("never", 7, Outcome.SUCCEEDED)

    assert (result.applied, result.reason, result.state, result.run_id) == (
        False,
        FinalizeReason.NOT_FOUND,
        None,
        None,
    )
    assert ledger.get("never") is None
    [event] = ledger.history("never")
    assert (event.kind, event.fence, event.run_id) == (EventKind.LOST, 7, None)


def test_finalize_after_an_operator_release_is_discarded(ledger: Ledger):
    claim = ledger.claim("k", "run-1")
    assert ledger.release("k")

    result = ledger.finalize("k", claim.fence, Outcome.SUCCEEDED)

    assert (result.applied, result.reason) == (False, FinalizeReason.RELEASED)
    entry = ledger.get("k")
    assert entry is not None and entry.released and entry.state == State.FAILED
    assert entry.fence == claim.fence and entry.result is None
    assert kinds(ledger, "k") == ["claimed", "released", "lost"]


# --- heartbeat (docs/contract.md, "Leases, heartbeats and the in-flight TTL") and the zombie ------


def test_heartbeat_extends_the_lease_from_now(ledger: Ledger, clock: FakeClock):
    claim = ledger.claim("k", "run-1")
    clock.advance(seconds=45)

    assert ledger.heartbeat("k", claim.fence)

    entry = ledger.get("k")
    assert (entry.heartbeat_at, entry.lease_expires_at) == (clock.now, clock.now + LEASE)
    clock.advance(seconds=59)  # past the first lease, inside the extended one
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT
    assert kinds(ledger, "k") == ["claimed", "skipped_in_flight"]  # heartbeats are not events


def test_heartbeat_after_the_lease_ran_out_revives_a_claim_nobody_adopted(
    ledger: Ledger, clock: FakeClock
):
    claim = ledger.claim("k", "run-1")
    clock.advance(seconds=600)

    assert ledger.heartbeat("k", claim.fence)

    assert ledger.get("k").lease_expires_at == clock.now + LEASE
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_IN_FLIGHT


def test_heartbeat_is_false_when_the_claim_is_not_the_holder(ledger: Ledger):
    claim = ledger.claim("k", "run-1")

    assert not ledger.heartbeat("k", claim.fence + 1000)
    assert not ledger.heartbeat("other", claim.fence)
    assert ledger.finalize("k", claim.fence, Outcome.SUCCEEDED).applied
    assert not ledger.heartbeat("k", claim.fence)  # finalized claims have no lease


def test_zombie_after_adoption_cannot_finalize_or_heartbeat_and_the_adopter_wins(
    ledger: Ledger, clock: FakeClock
):
    zombie = ledger.claim("k", "run-A")
    clock.advance(seconds=61)
    adopter = ledger.claim("k", "run-B")
    assert adopter.decision == Decision.ADOPTED_STALE

    assert not ledger.heartbeat("k", zombie.fence)
    lost = ledger.finalize("k", zombie.fence, Outcome.SUCCEEDED, result={"by": "A"})

    assert (lost.applied, lost.reason) == (False, FinalizeReason.STALE_FENCE)
    assert (lost.state, lost.run_id) == (State.IN_FLIGHT, "run-B")
    entry = ledger.get("k")
    assert (entry.state, entry.run_id, entry.fence) == (State.IN_FLIGHT, "run-B", adopter.fence)
    won = ledger.finalize("k", adopter.fence, Outcome.SUCCEEDED, result={"by": "B"})
    assert won.applied
    assert ledger.get("k").result == {"by": "B"}
    events = ledger.history("k")
    assert [e.kind.value for e in events] == ["claimed", "adopted", "lost", "succeeded"]
    assert (events[2].fence, events[3].fence, events[3].run_id) == (
        zombie.fence,
        adopter.fence,
        "run-B",
    )


# --- policies: dedup_on, force, fingerprints -------------------------------------------------------


def test_dedup_any_keeps_successes_and_failures_until_retention(
    make_ledger: MakeLedger, clock: FakeClock
):
    ledger = make_ledger(ANY, clock)
    claim_and_finish(ledger, "ok", "run-1", Outcome.SUCCEEDED)
    claim_and_finish(ledger, "bad", "run-1", Outcome.FAILED)

    assert ledger.claim("ok", "run-2").decision == Decision.SKIPPED_COMPLETED
    assert ledger.claim("bad", "run-2").decision == Decision.SKIPPED_COMPLETED
    assert ledger.get("bad").dedup_on == "any"

    clock.advance(days=1)
    assert ledger.claim("bad", "run-3").decision == Decision.PROCEED


def test_the_policy_of_a_failed_row_is_the_one_stored_with_it(
    make_ledger: MakeLedger, clock: FakeClock
):
    under_any = make_ledger(ANY, clock)
    claim_and_finish(under_any, "strict", "run-1", Outcome.FAILED)
    under_success = make_ledger(CONFIG, clock)
    claim_and_finish(under_success, "lenient", "run-1", Outcome.FAILED)

    # the same ledger, each key read under the other policy than it was written with
    assert under_success.claim("strict", "run-2").decision == Decision.SKIPPED_COMPLETED
    assert under_any.claim("lenient", "run-2").decision == Decision.PROCEED
    assert (
        under_any.get("lenient").dedup_on == "any"
    )  # the new claim records the policy now in force


def test_force_overrides_a_live_success_and_is_audited(ledger: Ledger):
    first = claim_and_finish(ledger, "k", "run-1", Outcome.SUCCEEDED)

    forced = ledger.claim("k", "run-2", force=True)

    assert (forced.decision, forced.forced, forced.prior_run_id) == (
        Decision.PROCEED,
        True,
        "run-1",
    )
    assert forced.fence > first
    assert ledger.get("k").state == State.IN_FLIGHT
    assert kinds(ledger, "k") == ["claimed", "succeeded", "forced"]


def test_force_overrides_a_failure_under_dedup_any(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(ANY, clock)
    claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)

    forced = ledger.claim("k", "run-2", force=True)

    assert (forced.decision, forced.forced) == (Decision.PROCEED, True)


def test_force_never_overrides_a_live_in_flight_claim(ledger: Ledger):
    held = ledger.claim("k", "run-1", fingerprint="fp-1")

    forced = ledger.claim("k", "run-2", force=True, fingerprint="fp-2")

    assert forced.decision == Decision.SKIPPED_IN_FLIGHT
    assert (forced.forced, forced.held_by_run_id) == (False, "run-1")
    assert ledger.get("k").fence == held.fence


def test_force_on_a_free_key_is_an_ordinary_claim(ledger: Ledger):
    claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)

    assert ledger.claim("new", "run-2", force=True).forced is False
    retry = ledger.claim("k", "run-2", force=True)
    assert (retry.decision, retry.forced) == (Decision.PROCEED, False)
    assert kinds(ledger, "k")[-1] == "claimed"


def test_fingerprint_mismatch_on_a_live_success_raises_before_any_write(ledger: Ledger):
    claim = ledger.claim("k", "run-1", fingerprint="fp-old")
    ledger.finalize("k", claim.fence, Outcome.SUCCEEDED)
    before = snapshot(ledger, "k")

    with pytest.raises(FingerprintMismatchError) as raised:
        ledger.claim("k", "run-2", fingerprint="fp-new")

    message = str(raised.value)
    assert "fp-old" in message and "fp-new" in message and "run-1" in message
    assert (raised.value.stored, raised.value.given, raised.value.run_id) == (
        "fp-old",
        "fp-new",
        "run-1",
    )
    assert snapshot(ledger, "k") == before


@pytest.mark.parametrize("same_run", [False, True], ids=["other-run", "re-entrant"])
def test_fingerprint_mismatch_on_a_live_claim_raises(ledger: Ledger, same_run: bool):
    ledger.claim("k", "run-1", fingerprint="fp-1")
    before = snapshot(ledger, "k")

    with pytest.raises(FingerprintMismatchError):
        ledger.claim("k", "run-1" if same_run else "run-2", fingerprint="fp-2")

    assert snapshot(ledger, "k") == before


def test_fingerprint_is_not_checked_where_the_old_work_no_longer_binds(
    ledger: Ledger, clock: FakeClock
):
    # after a failure (dedup_on=success)
    claim_and_finish(ledger, "failed", "run-1", Outcome.FAILED)
    assert ledger.claim("failed", "run-2", fingerprint="x").decision == Decision.PROCEED
    # after retention
    first = ledger.claim("expired", "run-1", fingerprint="a")
    ledger.finalize("expired", first.fence, Outcome.SUCCEEDED)
    clock.advance(days=1)
    assert ledger.claim("expired", "run-2", fingerprint="b").decision == Decision.PROCEED
    assert ledger.get("expired").fingerprint == "b"


def test_force_bypasses_the_fingerprint_check(ledger: Ledger):
    claim = ledger.claim("k", "run-1", fingerprint="a")
    ledger.finalize("k", claim.fence, Outcome.SUCCEEDED)

    forced = ledger.claim("k", "run-2", fingerprint="b", force=True)

    assert (forced.decision, forced.forced) == (Decision.PROCEED, True)
    assert ledger.get("k").fingerprint == "b"


def test_fingerprints_are_compared_only_when_both_sides_have_one(
    make_ledger: MakeLedger, clock: FakeClock
):
    ledger = make_ledger(CONFIG, clock)
    claim = ledger.claim("k", "run-1", fingerprint="a")
    ledger.finalize("k", claim.fence, Outcome.SUCCEEDED)
    claim = ledger.claim("none", "run-1")
    ledger.finalize("none", claim.fence, Outcome.SUCCEEDED)

    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_COMPLETED
    assert ledger.claim("none", "run-2", fingerprint="b").decision == Decision.SKIPPED_COMPLETED
    ignoring = make_ledger({**CONFIG.model_dump(), "on_fingerprint_mismatch": "ignore"}, clock)
    assert ignoring.claim("k", "run-3", fingerprint="c").decision == Decision.SKIPPED_COMPLETED


# --- operators --------------------------------------------------------------------------------------


def test_release_frees_an_in_flight_claim_and_is_an_event(ledger: Ledger):
    held = ledger.claim("k", "run-1")

    assert ledger.release("k", reason="run-1 was killed by the OOM killer")

    entry = ledger.get("k")  # kept as a released failure: its generation stays open
    assert entry is not None and entry.released and entry.state == State.FAILED
    released = ledger.history("k")[-1]
    assert (released.kind, released.run_id, released.fence) == (
        EventKind.RELEASED,
        "run-1",
        held.fence,
    )
    assert "OOM" in released.detail
    assert ledger.claim("k", "run-2").decision == Decision.PROCEED


@pytest.mark.parametrize("outcome", [Outcome.SUCCEEDED, Outcome.FAILED])
def test_finalize_keeps_who_settled_the_claim_on_its_event(ledger: Ledger, outcome: Outcome):
    held = ledger.claim("k", "run-1")
    other = ledger.claim("other", "run-1")

    assert ledger.finalize("k", held.fence, outcome, reason="run run-1 is FAILURE (sensor s)")
    assert ledger.finalize("k", held.fence, outcome, reason="again").reason.value == "already_final"

    settled = ledger.history("k")[-1]
    assert (settled.kind.value, settled.run_id) == (outcome.value, "run-1")
    assert settled.detail == "run run-1 is FAILURE (sensor s)"
    assert ledger.finalize("other", other.fence, outcome).applied  # no reason: no detail
    assert ledger.history("other")[-1].detail is None


def test_release_guarded_by_run_or_fence_refuses_a_claim_that_changed_hands(ledger: Ledger):
    held = ledger.claim("k", "run-1")
    before = snapshot(ledger, "k")

    assert not ledger.release("k", run_id="run-0")
    assert not ledger.release("k", fence=held.fence + 1)
    assert not ledger.release("k", run_id="run-1", fence=held.fence + 1)
    assert snapshot(ledger, "k") == before
    assert ledger.release("k", run_id="run-1", fence=held.fence)


def test_release_refuses_terminal_and_missing_keys(ledger: Ledger):
    claim_and_finish(ledger, "done", "run-1", Outcome.SUCCEEDED)
    before = snapshot(ledger, "done")

    assert not ledger.release("done")
    assert not ledger.release("missing")
    assert snapshot(ledger, "done") == before
    assert ledger.history("missing") == []


def test_reset_forgets_a_success_and_is_an_event(ledger: Ledger):
    fence = claim_and_finish(ledger, "k", "run-1", Outcome.SUCCEEDED)

    assert ledger.reset("k", reason="bad data upstream, redo")

    assert ledger.get("k") is None
    reset = ledger.history("k")[-1]
    assert (reset.kind, reset.run_id, reset.fence) == (EventKind.RESET, "run-1", fence)
    assert "bad data upstream" in reset.detail and "succeeded" in reset.detail
    assert ledger.claim("k", "run-2").decision == Decision.PROCEED


def test_reset_refuses_in_flight_and_missing_keys(ledger: Ledger):
    ledger.claim("k", "run-1")
    before = snapshot(ledger, "k")

    assert not ledger.reset("k")
    assert not ledger.reset("missing")
    assert snapshot(ledger, "k") == before


def test_reset_with_a_fence_forgets_only_the_record_it_names(ledger: Ledger):
    """An operator looked at run-1's failure; run-2 succeeded since: a reset fenced on what
    was looked at leaves run-2's success alone (one transaction, no window between)."""
    failed = claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)
    succeeded = claim_and_finish(ledger, "k", "run-2", Outcome.SUCCEEDED)
    before = snapshot(ledger, "k")

    assert not ledger.reset("k", fence=failed)
    assert snapshot(ledger, "k") == before
    assert ledger.reset("k", fence=succeeded)
    assert ledger.get("k") is None


# --- sweep -------------------------------------------------------------------------------------------


def test_sweep_removes_only_what_retention_no_longer_covers(ledger: Ledger, clock: FakeClock):
    claim_and_finish(ledger, "old-success", "run-1", Outcome.SUCCEEDED)
    claim_and_finish(ledger, "old-failure", "run-1", Outcome.FAILED)
    ledger.claim("abandoned", "run-1")  # never heartbeats again
    clock.advance(hours=12)
    claim_and_finish(ledger, "young-success", "run-2", Outcome.SUCCEEDED)
    ledger.claim("stale", "run-2")
    clock.advance(hours=12)  # day one is over: the first three are past retention

    assert (
        ledger.sweep() == 2
    )  # the two terminal rows; the abandoned claim's lease is only 1 day old

    assert ledger.get("old-success") is None and ledger.get("old-failure") is None
    assert ledger.get("young-success").state == State.SUCCEEDED
    assert ledger.get("abandoned").state == State.IN_FLIGHT  # still adoptable, kept
    assert ledger.get("stale").state == State.IN_FLIGHT
    clock.advance(minutes=2)
    assert ledger.sweep() == 1  # now abandoned for a whole retention period
    assert ledger.get("abandoned") is None
    assert ledger.get("stale") is not None
    swept = [e for e in ledger.history("abandoned") if e.kind == EventKind.SWEPT]
    assert len(swept) == 1 and swept[0].run_id == "run-1"


def test_sweep_takes_an_entry_at_the_microsecond_its_retention_ends(
    ledger: Ledger, clock: FakeClock
):
    """Expiries inside one second (SQLite's index knows whole seconds; the row decides)."""
    clock.now = clock.now.replace(microsecond=500_000)
    claim_and_finish(ledger, "early", "run-1", Outcome.SUCCEEDED)
    clock.advance(microseconds=2)
    claim_and_finish(ledger, "late", "run-1", Outcome.FAILED)
    clock.advance(microseconds=-2)
    clock.now += RETENTION - TICK
    assert ledger.sweep() == 0
    clock.advance(microseconds=1)
    assert ledger.sweep() == 1 and ledger.get("early") is None
    clock.advance(microseconds=1)
    assert ledger.sweep() == 0 and ledger.get("late") is not None
    clock.advance(microseconds=1)
    assert ledger.sweep() == 1 and ledger.get("late") is None


def test_sweep_trims_events_older_than_retention(ledger: Ledger, clock: FakeClock):
    claim_and_finish(ledger, "k", "run-1", Outcome.FAILED)
    clock.advance(hours=23)
    claim_and_finish(ledger, "k", "run-2", Outcome.SUCCEEDED)
    clock.advance(hours=2)

    assert ledger.sweep() == 0

    assert kinds(ledger, "k") == ["claimed", "succeeded"]  # run-1's day-old events are gone
    assert [e.run_id for e in ledger.history("k")] == ["run-2", "run-2"]


def test_a_keys_history_outlives_its_entry_and_continues_when_it_is_claimed_again(
    make_ledger: MakeLedger, clock: FakeClock
):
    """Sweep forgets the entry, not the events: a later claim, a late finalize and a reset of
    the key extend the same history, and trimming the log drops only its oldest part."""
    brief = LedgerConfig(**{**CONFIG.model_dump(), "retention_days": 1 / 24})
    ledger, short_lived = make_ledger(CONFIG, clock), make_ledger(brief, clock)
    first = ledger.claim("k", "run-1").fence
    claim_and_finish(ledger, "other", "run-1", Outcome.SUCCEEDED)  # interleaved events
    assert short_lived.finalize("k", first, Outcome.SUCCEEDED).applied  # kept for an hour
    clock.advance(hours=2)
    assert ledger.sweep() == 1  # the entry is gone; a day of events stays
    assert ledger.get("k") is None
    assert kinds(ledger, "k") == ["claimed", "succeeded", "swept"]

    assert ledger.finalize("k", first, Outcome.FAILED).reason == FinalizeReason.NOT_FOUND
    second = claim_and_finish(ledger, "k", "run-2", Outcome.SUCCEEDED)
    assert ledger.reset("k")
    ledger.claim("k", "run-3")
    assert ledger.claim("other", "run-3").decision == Decision.SKIPPED_COMPLETED

    events = ledger.history("k")
    assert [(e.kind.value, e.run_id) for e in events] == [
        ("claimed", "run-1"),
        ("succeeded", "run-1"),
        ("swept", "run-1"),
        ("lost", None),
        ("claimed", "run-2"),
        ("succeeded", "run-2"),
        ("reset", "run-2"),
        ("claimed", "run-3"),
    ]
    assert [e.fence for e in events][4:7] == [second] * 3
    assert ledger.history("k", limit=3) == events[-3:]
    assert ledger.history("k", limit=100) == events
    assert ledger.history("k", limit=1) == events[-1:]

    clock.advance(hours=23)  # the first hour's events leave retention, and so does `other`
    assert ledger.claim("k", "run-4").decision == Decision.ADOPTED_STALE
    assert ledger.sweep() == 1
    assert [(e.kind.value, e.run_id) for e in ledger.history("k")] == [
        *[(e.kind.value, e.run_id) for e in events[2:]],
        ("adopted", "run-4"),
    ]
    assert kinds(ledger, "other") == ["skipped_completed", "swept"]


def test_an_empty_sweep_changes_nothing(ledger: Ledger):
    claim_and_finish(ledger, "k", "run-1", Outcome.SUCCEEDED)
    before = snapshot(ledger, "k")

    assert ledger.sweep() == 0
    assert snapshot(ledger, "k") == before


# --- fences, events, stats, entries --------------------------------------------------------------


def test_fences_strictly_increase_across_keys_and_are_never_reused(
    ledger: Ledger, clock: FakeClock
):
    fences: list[int] = []
    for i in range(3):
        fences.append(claim_and_finish(ledger, f"a/{i}", "run-1", Outcome.FAILED))
        fences.append(ledger.claim(f"b/{i}", "run-1").fence)
        assert ledger.keep_for_retry(f"b/{i}", fences[-1])
        fences.append(ledger.claim(f"b/{i}", "run-1").fence)  # re-entrant
    clock.advance(seconds=61)
    fences.append(ledger.claim("b/0", "run-2").fence)  # adoption
    fences.append(ledger.claim("a/0", "run-2", force=True).fence)
    assert ledger.reset("a/1")
    fences.append(ledger.claim("a/1", "run-3").fence)
    assert ledger.stats().last_fence >= max(fences)

    # forget everything, entries and then events alike: fences still never come back
    clock.advance(days=3)
    ledger.sweep()
    assert ledger.stats().entries == 0
    clock.advance(days=3)
    ledger.sweep()
    assert ledger.stats().events == 0
    fences.append(ledger.claim("a/0", "run-4").fence)

    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    assert ledger.stats().last_fence >= fences[-1]


def test_fences_increase_across_two_ledgers_on_one_store(make_ledger: MakeLedger, clock: FakeClock):
    one, two = make_ledger(CONFIG, clock), make_ledger(CONFIG, clock)
    fences = [
        one.claim("x", "r").fence,
        two.claim("y", "r").fence,
        one.claim("z", "r").fence,
    ]
    assert one.keep_for_retry("x", fences[0])
    fences.append(two.claim("x", "r").fence)  # the run's retry re-enters
    assert fences == sorted(fences) and len(set(fences)) == 4


def test_the_event_log_records_every_transition_with_run_fence_and_time(
    ledger: Ledger, clock: FakeClock
):
    t0 = clock.now
    a = ledger.claim("k", "run-A", pipeline="load")
    clock.advance(seconds=10)
    ledger.claim("k", "run-B")
    clock.advance(seconds=60)
    b = ledger.claim("k", "run-B")
    ledger.finalize("k", a.fence, Outcome.FAILED)
    clock.advance(seconds=1)
    ledger.finalize("k", b.fence, Outcome.FAILED)
    c = ledger.claim("k", "run-C")
    ledger.finalize("k", c.fence, Outcome.SUCCEEDED, result={"ok": True})
    ledger.claim("k", "run-D")
    assert ledger.reset("k")

    events = ledger.history("k")

    assert [(e.kind.value, e.run_id, e.fence) for e in events] == [
        ("claimed", "run-A", a.fence),
        ("skipped_in_flight", "run-B", None),
        ("adopted", "run-B", b.fence),
        ("lost", None, a.fence),
        ("failed", "run-B", b.fence),
        ("claimed", "run-C", c.fence),
        ("succeeded", "run-C", c.fence),
        ("skipped_completed", "run-D", None),
        ("reset", "run-C", c.fence),
    ]
    assert [(e.at - t0).total_seconds() for e in events] == [0, 10, 70, 70, 71, 71, 71, 71, 71]
    assert all(e.key == "k" for e in events)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert "run-A" in events[1].detail and "run-A" in events[2].detail  # who held / who was adopted
    assert "run-C" in events[7].detail
    assert [e.kind for e in ledger.history("k", limit=2)] == [
        EventKind.SKIPPED_COMPLETED,
        EventKind.RESET,
    ]
    assert ledger.history("other") == []


def test_stats_count_entries_by_state_and_liveness(ledger: Ledger, clock: FakeClock):
    assert ledger.stats().entries == 0
    claim_and_finish(ledger, "s1", "r", Outcome.SUCCEEDED)
    claim_and_finish(ledger, "f1", "r", Outcome.FAILED)
    ledger.claim("i1", "r")
    clock.advance(seconds=30)
    ledger.claim("i2", "r")
    clock.advance(seconds=30)  # i1's lease is over, i2's is not

    stats = ledger.stats()

    assert (stats.entries, stats.in_flight, stats.succeeded, stats.failed) == (4, 2, 1, 1)
    assert (stats.stale_in_flight, stats.expired) == (1, 0)
    assert stats.events == 6
    clock.advance(days=1)
    assert (ledger.stats().expired, ledger.stats().stale_in_flight) == (2, 2)


def test_entries_list_newest_claim_first_filtered_by_state_and_run(
    ledger: Ledger, clock: FakeClock
):
    for i, run in enumerate(["r1", "r2", "r1", "r2"]):
        ledger.claim(f"k{i}", run)
        clock.advance(seconds=1)
    claim_and_finish(ledger, "done", "r1", Outcome.SUCCEEDED)

    assert [e.key for e in ledger.entries()] == ["done", "k3", "k2", "k1", "k0"]
    assert [e.key for e in ledger.entries(limit=2)] == ["done", "k3"]
    assert [e.key for e in ledger.entries(State.IN_FLIGHT)] == ["k3", "k2", "k1", "k0"]
    assert [e.key for e in ledger.entries("succeeded")] == ["done"]
    assert [e.key for e in ledger.entries(run_id="r1")] == ["done", "k2", "k0"]
    assert [e.key for e in ledger.entries(State.IN_FLIGHT, run_id="r2")] == ["k3", "k1"]
    assert ledger.entries(State.FAILED) == []


PREFIX_KEYS = [
    "daily/2024-01-01/a",
    "daily/2024-01-02/b",
    "daily",
    "daily0",
    "dailyZ",
    "Daily/upper",
    "d%ily/pct",
    "d_ily/underscore",
    "d\\ily/backslash",
    "p\U0010ffff",
    "p\U0010ffffq",
    "q",
    "s\ud7ff",
    "s\ud7ffx",
    "s\ue000",
    "é/1",
    "éa",
]


@pytest.mark.parametrize(
    "prefix",
    ["daily/", "daily", "d%", "d_", "d\\", "d", "p", "p\U0010ffff", "s\ud7ff", "é", "é/", "zz"],
)
def test_entries_by_prefix_are_exactly_the_keys_starting_with_it(ledger: Ledger, prefix: str):
    """Verbatim, case-sensitive, by code point: `%`, `_` and `\\` are no wildcards."""
    for key in PREFIX_KEYS:
        claim_and_finish(ledger, key, "run-1", Outcome.SUCCEEDED)

    found = [e.key for e in ledger.entries(prefix=prefix, limit=100)]
    assert sorted(found) == sorted(k for k in PREFIX_KEYS if k.startswith(prefix))


def test_entries_by_prefix_combine_with_state_run_and_limit(ledger: Ledger, clock: FakeClock):
    for i, run in enumerate(["r1", "r2", "r1"]):
        ledger.claim(f"daily/{i}", run)
        ledger.claim(f"weekly/{i}", run)
        clock.advance(seconds=1)
    claim_and_finish(ledger, "daily/done", "r1", Outcome.SUCCEEDED)

    assert [e.key for e in ledger.entries(prefix="daily/")] == [
        "daily/done",
        "daily/2",
        "daily/1",
        "daily/0",
    ]
    assert [e.key for e in ledger.entries(prefix="daily/", limit=2)] == ["daily/done", "daily/2"]
    assert [e.key for e in ledger.entries(State.IN_FLIGHT, run_id="r1", prefix="daily/")] == [
        "daily/2",
        "daily/0",
    ]
    assert [e.key for e in ledger.entries(run_id="r1", prefix="weekly/")] == [
        "weekly/2",
        "weekly/0",
    ]
    assert ledger.entries(State.SUCCEEDED, prefix="weekly/") == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prefix": ""}, "prefix"),
        ({"prefix": "a\nb"}, "prefix"),
        ({"prefix": 7}, "prefix"),
        ({"run_id": ""}, "run_id"),
        ({"limit": -1}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"state": "done"}, "state"),
    ],
)
def test_entries_refuse_bad_filters_naming_the_argument(ledger: Ledger, kwargs, field: str):
    with pytest.raises(InvalidArgumentError, match=field):
        ledger.entries(**kwargs)


def test_keys_are_stored_verbatim(ledger: Ledger):
    keys = ["job/asset/2024-01-01/step", "clé 🙂 日本", "x" * 512, "  spaced  ", "a'b\"c;--"]
    for key in keys:
        claim_and_finish(ledger, key, "run-1", Outcome.SUCCEEDED)

    assert [ledger.get(key).key for key in keys] == keys
    assert {e.key for e in ledger.entries(limit=10)} == set(keys)
    assert all(ledger.claim(key, "run-2").decision == Decision.SKIPPED_COMPLETED for key in keys)


def test_two_handles_see_each_others_writes(make_ledger: MakeLedger, clock: FakeClock):
    writer, reader = make_ledger(CONFIG, clock), make_ledger(CONFIG, clock)
    claim = writer.claim("k", "run-1")

    assert reader.claim("k", "run-2").held_by_run_id == "run-1"
    assert reader.finalize("k", claim.fence, Outcome.SUCCEEDED).applied
    assert writer.get("k").state == State.SUCCEEDED


def test_the_url_and_repr_never_show_a_password(make_ledger: MakeLedger, ledger_url: str):
    ledger = make_ledger()
    password = urlsplit(ledger_url).password
    if password:
        assert password not in repr(ledger) and password not in ledger.url
        assert "***" in ledger.url
    else:
        assert ledger.url == ledger_url
