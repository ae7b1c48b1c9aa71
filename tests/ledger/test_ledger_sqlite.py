"""What only the SQLite backend promises: threads share one handle and the file is a WAL
file. Forks, deleted/replaced files and foreign files: test_ledger_files.py.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections import Counter
from pathlib import Path

from ledger_helpers import replay

from rocky_dagster.ledger import Outcome, open_ledger
from rocky_dagster.ledger import sqlite as sqlite_backend
from rocky_dagster.ledger.sqlite import SCHEMA_VERSION


def test_threads_sharing_one_ledger_get_one_winner_per_generation(tmp_path: Path):
    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.db")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        rng = random.Random(worker)
        try:
            start.wait()
            for i in range(40):
                key = f"t/{rng.randrange(6)}"
                claim = ledger.claim(key, f"w{worker}-{i}")
                if claim.should_run:
                    outcome = Outcome.SUCCEEDED if rng.random() < 0.2 else Outcome.FAILED
                    assert ledger.finalize(key, claim.fence, outcome).applied
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors, errors[:3]
    kinds: Counter[str] = Counter()
    for n in range(6):
        events = ledger.history(f"t/{n}")
        kinds.update(e.kind.value for e in events)
        state, run_id, fence, _ = replay(events)
        entry = ledger.get(f"t/{n}")
        assert (entry.state.value, entry.run_id, entry.fence) == (state, run_id, fence)
    assert sum(kinds[k] for k in ("claimed", "skipped_in_flight", "skipped_completed")) == 320
    ledger.close()


def test_the_file_is_in_wal_mode_for_every_later_reader(tmp_path: Path):
    with open_ledger(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        ledger.claim("k", "run-1")
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute(
            "SELECT value FROM rocky_ledger_meta WHERE name = 'schema_version'"
        ).fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


def test_without_returning_the_generic_path_gives_the_same_answers(tmp_path: Path, monkeypatch):
    """SQLite older than 3.35 has no RETURNING: claim and finalize take the decision table."""
    fast_path_answers = _a_small_history(tmp_path / "fast.db")
    monkeypatch.setattr(sqlite_backend, "FAST_PATH", False)
    assert _a_small_history(tmp_path / "generic.db") == fast_path_answers


def _a_small_history(path: Path) -> list[object]:
    answers: list[object] = []
    with open_ledger(f"sqlite:///{path}") as ledger:
        first = ledger.claim("k", "run-1")
        answers += [first.decision, first.fence, ledger.claim("k", "run-2").decision]
        answers += [first.generation, ledger.get("k").generation]  # a new key begins one
        done = ledger.finalize("k", first.fence, Outcome.SUCCEEDED, result={"rows": 1})
        answers += [done.applied, done.reason, done.run_id]
        again = ledger.finalize("k", first.fence, Outcome.FAILED)
        answers += [again.applied, again.reason, ledger.claim("k", "run-3").result]
        answers += [[(e.kind, e.run_id, e.fence) for e in ledger.history("k")]]
    return answers
