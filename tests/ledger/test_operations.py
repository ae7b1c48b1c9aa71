"""The operator actions under both fronts (CLI and admin job), on each backend.

`rocky_dagster.ledger.operations` selects, plans and applies; these tests drive it on a real
ledger with an injected clock and read the result back through the ledger's own API.
"""

from __future__ import annotations

import re

import pytest
from ledger_helpers import LEASE, TICK, FakeClock

from rocky_dagster.ledger import EventKind, InvalidArgumentError, Ledger, Outcome, State
from rocky_dagster.ledger.operations import (
    FORCE_TAG_HINT,
    LEFT_ALONE,
    OperationRefused,
    Phrasing,
    Selection,
    apply,
    plan,
    select,
)
from rocky_dagster.step.keys import FORCE_VALUE, IDEMPOTENCY_TAG

PHRASING = Phrasing(
    action=lambda name: f"<{name}>",
    state_filter=lambda state: f"<state {state}>",
    listing="<list>",
    history="<history>",
)


def keys(ledger: Ledger, selection: Selection, limit: int = 100) -> list[str]:
    return [e.key for e in select(ledger, selection, PHRASING, limit=limit)]


def finished(ledger: Ledger, key: str, run_id: str, outcome: Outcome = Outcome.SUCCEEDED) -> int:
    fence = ledger.claim(key, run_id).fence
    assert fence is not None and ledger.finalize(key, fence, outcome).applied
    return fence


@pytest.fixture
def adopted(ledger: Ledger, clock: FakeClock) -> Ledger:
    """run-a's claim on 'n/1/load' expired and run-b adopted it; run-c skipped the done
    'n/1/extract'; 'm/1/load' is run-a's own success (outside the prefix 'n/')."""
    finished(ledger, "n/1/extract", "run-a")
    clock.advance(seconds=1)
    assert ledger.claim("n/1/load", "run-a").should_run
    clock.advance(seconds=LEASE.total_seconds())
    clock.now += TICK
    assert ledger.claim("n/1/load", "run-b").should_run
    clock.advance(seconds=1)
    assert not ledger.claim("n/1/extract", "run-c").should_run
    clock.advance(seconds=1)
    finished(ledger, "m/1/load", "run-a")
    return ledger


# --- the two run filters mean one thing each, whichever front asks ------------------------------


def test_run_id_is_the_holder_or_last_finisher_and_touched_by_adds_the_history(adopted: Ledger):
    assert keys(adopted, Selection(run_id="run-a")) == ["m/1/load", "n/1/extract"]
    assert keys(adopted, Selection(run_id="run-b")) == ["n/1/load"]
    assert keys(adopted, Selection(touched_by="run-a")) == ["m/1/load", "n/1/load", "n/1/extract"]
    assert keys(adopted, Selection(touched_by="run-c")) == ["n/1/extract"]
    assert keys(adopted, Selection(run_id="run-c")) == []


def test_filters_combine_in_the_store_and_the_limit_takes_the_newest(adopted: Ledger):
    assert keys(adopted, Selection(prefix="n/", touched_by="run-a")) == ["n/1/load", "n/1/extract"]
    assert keys(adopted, Selection(prefix="n/", run_id="run-a")) == ["n/1/extract"]
    assert keys(adopted, Selection(prefix="n/", state=State.IN_FLIGHT)) == ["n/1/load"]
    assert keys(adopted, Selection(touched_by="run-a", state=State.SUCCEEDED)) == [
        "m/1/load",
        "n/1/extract",
    ]
    assert keys(adopted, Selection(prefix="n/"), limit=1) == ["n/1/load"]
    assert keys(adopted, Selection(prefix="n/1/load/")) == []  # a prefix, not a pattern


def test_one_key_is_refused_unless_every_guard_matches(adopted: Ledger):
    load = adopted.get("n/1/load")
    assert load is not None
    assert keys(adopted, Selection(key="n/1/load", run_id="run-b", fence=load.fence)) == [
        "n/1/load"
    ]
    assert keys(adopted, Selection(key="n/1/load", touched_by="run-a")) == ["n/1/load"]
    refusals = {
        "held by run run-b, not run-a": Selection(key="n/1/load", run_id="run-a"),
        "never touched by run run-c": Selection(key="n/1/load", touched_by="run-c"),
        f"has fence {load.fence}, not {load.fence + 7}": Selection(
            key="n/1/load", fence=load.fence + 7
        ),
        "is in_flight, not failed": Selection(key="n/1/load", state=State.FAILED),
        "no entry and no history for key 'n/9' (see: <list>)": Selection(key="n/9"),
    }
    for says, selection in refusals.items():
        with pytest.raises(OperationRefused, match=re.escape(says)):
            select(adopted, selection, PHRASING, limit=1)
    adopted.reset("n/1/extract")
    with pytest.raises(OperationRefused, match=r"it was reset or swept \(see: <history>\)"):
        select(adopted, Selection(key="n/1/extract"), PHRASING, limit=1)


@pytest.mark.parametrize(
    ("selection", "says"),
    [
        (Selection(key="a", prefix="a"), "give key or prefix, not both"),
        (Selection(run_id="r", touched_by="r"), "give run_id .* or touched_by .*, not both"),
        (Selection(prefix="a/", fence=1), "fence guards one key"),
    ],
)
def test_contradictory_selections_are_refused(ledger: Ledger, selection: Selection, says: str):
    with pytest.raises(OperationRefused, match=says):
        select(ledger, selection, PHRASING, limit=1)


@pytest.mark.parametrize(
    ("selection", "field"),
    [
        (Selection(prefix="a\n"), "prefix"),
        (Selection(touched_by=""), "touched_by"),
        (Selection(key="k", fence=0), "fence"),
    ],
)
def test_bad_values_are_named(ledger: Ledger, selection: Selection, field: str):
    with pytest.raises(InvalidArgumentError, match=field):
        select(ledger, selection, PHRASING, limit=1)


# --- planning refuses before anything is written --------------------------------------------------


def test_a_plan_with_one_refused_key_refuses_all_and_says_how(adopted: Ledger):
    entries = select(adopted, Selection(prefix="n/"), PHRASING, limit=10)
    before = [adopted.history(e.key) for e in entries]

    with pytest.raises(OperationRefused) as refused:
        plan(entries, "release", adopted.now(), PHRASING)

    message = str(refused.value)
    assert "release refused, nothing changed" in message
    assert "key 'n/1/extract' is succeeded, not in flight" in message
    assert "<reset>" in message and "<state in_flight>" in message
    assert {r.key: r.result for r in refused.value.rows} == {
        "n/1/load": "unchanged (the action was refused)",
        "n/1/extract": "refused",
    }
    assert [adopted.history(e.key) for e in entries] == before


@pytest.mark.parametrize("action", ["reset", "force"])
def test_in_flight_keys_are_neither_reset_nor_forced(adopted: Ledger, action):
    entries = select(adopted, Selection(key="n/1/load"), PHRASING, limit=1)
    with pytest.raises(OperationRefused, match=r"is in flight .run run-b.*<release>"):
        plan(entries, action, adopted.now(), PHRASING)


def test_force_leaves_a_key_whose_next_run_proceeds_anyway(ledger: Ledger):
    finished(ledger, "f/failed", "run-a", Outcome.FAILED)
    finished(ledger, "f/done", "run-a")
    entries = select(ledger, Selection(prefix="f/"), PHRASING, limit=10)
    rows = {r.key: r for r in plan(entries, "force", ledger.now(), PHRASING)}
    assert (rows["f/done"].change, rows["f/failed"].change) == ("force", "none")
    assert "proceeds anyway" in rows["f/failed"].note


def test_the_force_hint_names_the_force_tag():
    assert f"{IDEMPOTENCY_TAG}={FORCE_VALUE}" == FORCE_TAG_HINT


# --- applying ---------------------------------------------------------------------------------------


def test_apply_writes_one_audited_event_per_change(adopted: Ledger):
    planned = plan(
        select(adopted, Selection(touched_by="run-a", state=State.SUCCEEDED), PHRASING, limit=10),
        "force",
        adopted.now(),
        PHRASING,
    )

    done = {r.key: r.result for r in apply(adopted, planned, by="an operator", reason="re-ingest")}

    assert done == {"m/1/load": "forced", "n/1/extract": "forced"}
    for key in done:
        event = adopted.history(key)[-1]
        assert event.kind == EventKind.RESET
        assert event.detail is not None
        assert event.detail.startswith("forced by an operator: re-ingest; forgot the succeeded")
        assert adopted.claim(key, "next-run").should_run


def test_a_key_that_changed_after_the_check_is_left_alone(ledger: Ledger):
    ledger.claim("c/1", "holder")
    fence = ledger.claim("c/2", "holder").fence
    assert fence is not None
    rows = plan(
        select(ledger, Selection(prefix="c/"), PHRASING, limit=10),
        "release",
        ledger.now(),
        PHRASING,
    )
    ledger.finalize("c/2", fence, Outcome.SUCCEEDED)  # the holder finished meanwhile

    done = {r.key: r.result for r in apply(ledger, rows, by="a test", reason=None)}

    assert done == {"c/1": "released", "c/2": LEFT_ALONE}
    entry = ledger.get("c/2")
    assert entry is not None and entry.state == State.SUCCEEDED


def test_a_bad_reason_is_refused_before_the_first_write(ledger: Ledger):
    ledger.claim("r/1", "holder")
    rows = plan(
        select(ledger, Selection(key="r/1"), PHRASING, limit=1), "release", ledger.now(), PHRASING
    )
    with pytest.raises(InvalidArgumentError, match="reason"):
        list(apply(ledger, rows, by="x", reason="x" * 5000))
    entry = ledger.get("r/1")
    assert entry is not None and entry.state == State.IN_FLIGHT
