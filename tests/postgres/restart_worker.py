"""Worker processes for the server-restart test, and the checks that read their results
against the ledger's event log. Workers are started with the `spawn` method (as Dagster's
multiprocess executor does), so they import this module by name. (The plain race on both
backends is tests/ledger/test_ledger_race.py.)"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocky_dagster.ledger import (
    Decision,
    EventKind,
    FinalizeReason,
    Ledger,
    LedgerUnavailableError,
    Outcome,
    open_ledger,
)

SUCCESS_CHANCE = 0.03
"""Most winners report failure, so each key goes through many claim generations."""


def _one(ledger: Ledger, rng: random.Random, key: str, run_id: str) -> dict[str, Any]:
    """Claim; a winner heartbeats and finalizes. Errors are recorded, never raised: the parent
    judges them. After an error the worker cleans up like the Dagster layer would (release its
    possible orphan claim, repeat its finalize) until the ledger answers."""
    rec: dict[str, Any] = {"key": key, "run_id": run_id, "start": time.time()}
    try:
        claim = ledger.claim(key, run_id)
    except Exception as exc:
        rec["claim_error"] = type(exc).__name__
        rec["claim_error_text"] = str(exc)
        rec["released"] = _until_answered(lambda: ledger.release(key, run_id=run_id))
        rec["end"] = time.time()
        return rec
    rec["decision"] = claim.decision.value
    rec["fence"] = claim.fence
    if claim.should_run:
        assert claim.fence is not None
        fence = claim.fence
        outcome = Outcome.SUCCEEDED if rng.random() < SUCCESS_CHANCE else Outcome.FAILED
        rec["outcome"] = outcome.value
        try:
            rec["heartbeat"] = ledger.heartbeat(key, fence)
        except Exception as exc:
            rec["heartbeat_error"] = type(exc).__name__
        try:
            result = ledger.finalize(key, fence, outcome)
        except Exception as exc:
            rec["finalize_error"] = type(exc).__name__
            result = _until_answered(lambda: ledger.finalize(key, fence, outcome))
        rec["finalize"] = result.reason.value
        rec["final_state"] = None if result.state is None else result.state.value
    rec["end"] = time.time()
    return rec


def _until_answered(call, seconds: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except LedgerUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def through_restart(
    url: str, worker: int, keys: int, warmed: Any, restarted: Any, after: int, out: str
) -> None:
    """Claim until the parent restarted the server, then `after` more claims that must all work."""
    rng = random.Random(1000 + worker)
    records = []
    done_after = 0
    with open_ledger(url) as ledger:
        i = 0
        while done_after < after:
            was_restarted = restarted.is_set()
            rec = _one(ledger, rng, f"key-{rng.randrange(keys)}", f"w{worker}-{i}")
            rec["after_restart"] = was_restarted
            records.append(rec)
            i += 1
            if i == 20:
                with warmed.get_lock():
                    warmed.value += 1
            if was_restarted:
                done_after += 1
            if i > 20000:
                break
    Path(out).write_text(json.dumps(records))


def load(paths: list[Path]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in paths:
        records.extend(json.loads(path.read_text()))
    return records


# --- checks ----------------------------------------------------------------------------------------


@dataclass
class Replay:
    """What the event log says happened, key by key, checked transition by transition."""

    generations: int
    problems: list[str]


def replay_events(ledger: Ledger, keys: list[str]) -> Replay:
    """Walk each key's events in order: a claim only on a free (or failed) key, a terminal event
    or release only by the fence that holds it, skips only in the matching state."""
    problems: list[str] = []
    generations = 0
    for key in keys:
        holder: int | None = None
        done = False
        for ev in ledger.history(key):
            where = f"{key} event {ev.id} ({ev.kind.value}, fence {ev.fence})"
            if ev.kind == EventKind.CLAIMED:
                if holder is not None or done:
                    problems.append(f"{where}: claimed while held by {holder} / done={done}")
                holder = ev.fence
                generations += 1
            elif ev.kind in (EventKind.FAILED, EventKind.SUCCEEDED, EventKind.RELEASED):
                if holder is None or ev.fence != holder:
                    problems.append(f"{where}: ends a claim it does not hold (holder {holder})")
                holder = None
                done = ev.kind == EventKind.SUCCEEDED
            elif ev.kind == EventKind.SKIPPED_IN_FLIGHT:
                if holder is None:
                    problems.append(f"{where}: skipped as in flight, but nobody held it")
            elif ev.kind == EventKind.SKIPPED_COMPLETED:
                if not done:
                    problems.append(f"{where}: skipped as completed, but it never succeeded")
            else:
                problems.append(f"{where}: unexpected event kind")
        entry = ledger.get(key)
        if holder is not None and (entry is None or entry.fence != holder):
            problems.append(f"{key}: log says fence {holder} holds it, row says {entry}")
        if done and (entry is None or entry.state.value != "succeeded"):
            problems.append(f"{key}: log says succeeded, row says {entry}")
    return Replay(generations, problems)


def compare_with_log(ledger: Ledger, records: list[dict[str, Any]]) -> list[str]:
    """Every answer a worker got is in the log, and every logged decision was given to a worker
    (or to one whose call failed: then its claim, if any, was released)."""
    problems: list[str] = []
    keys = sorted({r["key"] for r in records})
    logged: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for key in keys:
        for ev in ledger.history(key):
            if ev.run_id is not None:
                logged[(key, ev.run_id)].append(ev)
    fences = [r["fence"] for r in records if r.get("fence") is not None]
    if len(fences) != len(set(fences)):
        dupes = [f for f, n in Counter(fences).items() if n > 1]
        problems.append(f"fences handed out twice: {dupes[:10]}")
    for r in records:
        events = logged.get((r["key"], r["run_id"]), [])
        kinds = [e.kind.value for e in events]
        if "claim_error" in r:
            claimed = [e for e in events if e.kind == EventKind.CLAIMED]
            released = [e for e in events if e.kind == EventKind.RELEASED]
            if len(claimed) != len(released) or (claimed and not r["released"]):
                problems.append(
                    f"{r['run_id']}: failed claim left {kinds} (released={r['released']})"
                )
            continue
        decision = Decision(r["decision"])
        if decision.should_run:
            want = ["claimed", r["outcome"]]
            got = [(e.kind.value, e.fence) for e in events]
            if got != [(w, r["fence"]) for w in want]:
                problems.append(f"{r['run_id']} won fence {r['fence']}, log says {got}")
            ok = r["finalize"] == FinalizeReason.APPLIED.value or (
                "finalize_error" in r
                and r["finalize"] == FinalizeReason.ALREADY_FINAL.value
                and r["final_state"] == r["outcome"]
            )
            if not ok:
                problems.append(f"{r['run_id']}: finalize of its own claim said {r['finalize']}")
        elif kinds != [decision.value]:
            problems.append(f"{r['run_id']} was told {decision.value}, log says {kinds}")
    return problems
