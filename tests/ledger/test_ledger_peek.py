"""`Ledger.peek`: the decision a claim would get now, with nothing written (both backends)."""

from __future__ import annotations

from ledger_helpers import FakeClock, MakeLedger

from rocky_dagster.ledger import Decision, Ledger, Outcome


def _footprint(ledger: Ledger, key: str) -> tuple[object, int]:
    return ledger.get(key), len(ledger.history(key))


def test_peek_answers_every_decision_and_writes_nothing(ledger: Ledger, clock: FakeClock):
    assert ledger.peek("new").decision == Decision.PROCEED
    assert ledger.get("new") is None and ledger.history("new") == []

    held = ledger.claim("k", "run-1")
    before = _footprint(ledger, "k")
    in_flight = ledger.peek("k")
    assert in_flight.decision == Decision.SKIPPED_IN_FLIGHT
    assert in_flight.held_by_run_id == "run-1" and in_flight.fence is None
    assert _footprint(ledger, "k") == before

    clock.advance(hours=1)  # past the lease: a claim would adopt
    stale = ledger.peek("k", "run-2")
    assert stale.decision == Decision.ADOPTED_STALE and stale.prior_run_id == "run-1"
    assert _footprint(ledger, "k") == before

    assert ledger.claim("k", "run-2").decision == Decision.ADOPTED_STALE
    fence = ledger.get("k").fence
    ledger.finalize("k", fence, Outcome.SUCCEEDED, result={"rows": 3})
    before = _footprint(ledger, "k")
    done = ledger.peek("k")
    assert done.decision == Decision.SKIPPED_COMPLETED
    assert done.prior_run_id == "run-2" and done.result == {"rows": 3}
    assert ledger.peek("k", force=True).decision == Decision.PROCEED
    assert _footprint(ledger, "k") == before
    assert held.fence is not None


def test_peek_after_a_failure_proceeds_like_the_claim_that_follows(make_ledger: MakeLedger):
    ledger = make_ledger()
    claim = ledger.claim("k", "run-1")
    ledger.finalize("k", claim.fence, Outcome.FAILED)
    peeked = ledger.peek("k")
    assert peeked.decision == Decision.PROCEED and peeked.prior_run_id == "run-1"
    assert ledger.claim("k", "run-2").decision == peeked.decision


def test_peek_rejects_a_bad_key_by_name(ledger: Ledger):
    import pytest

    from rocky_dagster.ledger import LedgerError

    with pytest.raises(LedgerError, match="key"):
        ledger.peek("")
