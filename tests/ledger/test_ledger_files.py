"""SQLite files and processes: forks mid-call, files deleted or replaced under a running
process, and files that are not ledgers (refused byte-for-byte untouched)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from rocky_dagster.ledger import (
    Decision,
    Ledger,
    LedgerConfigError,
    LedgerSchemaError,
    LedgerUnavailableError,
    Outcome,
    State,
    open_ledger,
)


def _child_uses_the_ledger(ledger: Ledger, key: str) -> None:
    claim = ledger.claim(key, f"child-{key}")
    assert claim.decision == Decision.PROCEED and claim.fence is not None
    assert ledger.heartbeat(key, claim.fence)
    assert ledger.finalize(key, claim.fence, Outcome.SUCCEEDED).applied


def test_a_fork_while_other_threads_are_inside_ledger_calls_leaves_the_child_a_working_ledger(
    tmp_path: Path,
):
    """One thread loops claim/heartbeat/finalize; another keeps a write transaction open (as a
    slow call would). The main thread forks; each child uses the inherited ledger at once.

    Without the fork hooks, the child inherits SQLite's "this process holds the write lock"
    state from the thread caught inside the transaction: its claim waits out the 30 s busy
    timeout and fails.
    """
    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.db")
    stop = threading.Event()
    errors: list[BaseException] = []
    loops = [0, 0]

    def loop_calls() -> None:
        try:
            while not stop.is_set():
                key = f"loop/{loops[0] % 5}"
                claim = ledger.claim(key, f"loop-{loops[0]}")
                if claim.should_run:
                    ledger.heartbeat(key, claim.fence)
                    ledger.finalize(key, claim.fence, Outcome.FAILED)
                loops[0] += 1
                time.sleep(0.001)  # other processes get the write lock too
        except BaseException as exc:
            errors.append(exc)

    def hold_transactions() -> None:
        try:
            while not stop.is_set():
                with ledger.transaction() as tx:  # inside a ledger call, holding the write lock
                    tx.load("held")
                    time.sleep(0.05)
                loops[1] += 1
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop_calls), threading.Thread(target=hold_transactions)]
    for thread in threads:
        thread.start()
    try:
        while min(loops) < 3:  # both threads are in their loops
            time.sleep(0.01)
        context = multiprocessing.get_context("fork")
        for n in range(3):
            child = context.Process(target=_child_uses_the_ledger, args=(ledger, f"child/{n}"))
            child.start()
            child.join(timeout=120)
            if child.is_alive():
                child.kill()
                child.join()
            assert child.exitcode == 0, f"child {n} failed (exit code {child.exitcode})"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert not errors, errors
    for n in range(3):
        assert ledger.get(f"child/{n}").state == State.SUCCEEDED
    ledger.close()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


# --- a ledger file deleted or replaced under a running process ------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> tuple[Ledger, Path, int]:
    path = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite:///{path}")
    claim = ledger.claim("k", "run-1")
    assert claim.fence is not None
    return ledger, path, claim.fence


def _calls(ledger: Ledger, fence: int):
    return {
        "finalize": lambda: ledger.finalize("k", fence, Outcome.SUCCEEDED),
        "claim": lambda: ledger.claim("new", "run-2"),
        "heartbeat": lambda: ledger.heartbeat("k", fence),
        "release": lambda: ledger.release("k"),
        "get": lambda: ledger.get("k"),
        "history": lambda: ledger.history("k"),
        "entries": lambda: ledger.entries(),
        "stats": ledger.stats,
        "sweep": ledger.sweep,
    }


def test_a_deleted_ledger_file_fails_every_later_call_and_is_not_recreated(
    live: tuple[Ledger, Path, int],
):
    ledger, path, fence = live
    os.unlink(path)

    for name, call in _calls(ledger, fence).items():
        with pytest.raises(LedgerUnavailableError) as raised:
            call()
        assert str(path) in str(raised.value), name
        assert "deleted" in str(raised.value), name
    assert not path.exists()  # never silently replaced by a new, empty ledger
    ledger.close()


def test_a_replaced_ledger_file_fails_every_later_call_and_is_left_untouched(
    live: tuple[Ledger, Path, int], tmp_path: Path
):
    ledger, path, fence = live
    other = tmp_path / "other.db"
    with open_ledger(f"sqlite:///{other}") as restored:
        restored.claim("restored", "run-0")
    os.replace(other, path)
    before = path.read_bytes()

    for name, call in _calls(ledger, fence).items():
        with pytest.raises(LedgerUnavailableError) as raised:
            call()
        assert str(path) in str(raised.value) and "replaced" in str(raised.value), name

    assert path.read_bytes() == before
    ledger.close()


def _files(directory: Path) -> dict[str, bytes]:
    """Every file's bytes but the -shm index (a read marks its slot there)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.endswith("-shm")}


@pytest.mark.parametrize("call", ["finalize", "claim", "heartbeat", "release", "get"])
def test_no_call_reports_success_from_an_unlinked_file(
    live: tuple[Ledger, Path, int], tmp_path: Path, call: str
):
    ledger, path, fence = live
    os.rename(path, tmp_path / "moved.db")  # the open file lives on under another name
    before = _files(tmp_path)

    with pytest.raises(LedgerUnavailableError, match="deleted"):
        _calls(ledger, fence)[call]()

    assert _files(tmp_path) == before  # nothing was written anywhere
    ledger.close()


# --- files that are not ledgers are refused untouched ----------------------------------------------


def _foreign_sqlite(path: Path, *, wal: bool) -> None:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT)")
    conn.execute("INSERT INTO runs VALUES ('r1', 'SUCCESS')")
    conn.commit()
    conn.close()


def _sqlite_with(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()
    assert path.stat().st_size > 0


NOT_LEDGERS = {
    "one-byte": lambda p: p.write_bytes(b"x"),
    "random-bytes": lambda p: p.write_bytes(bytes(range(256)) * 40),
    "short-random": lambda p: p.write_bytes(b"\x00\x01\x02garbage"),
    "sqlite-magic-then-garbage": lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 4080),
    "other-app-rollback-journal": lambda p: _foreign_sqlite(p, wal=False),
    "other-app-wal": lambda p: _foreign_sqlite(p, wal=True),
    "other-app-view-only": lambda p: _sqlite_with(p, "CREATE VIEW answer AS SELECT 42"),
    "other-app-user-version": lambda p: _sqlite_with(p, "PRAGMA user_version = 7"),
    "other-app-application-id": lambda p: _sqlite_with(p, "PRAGMA application_id = 1234"),
}


@pytest.mark.parametrize("make", NOT_LEDGERS.values(), ids=NOT_LEDGERS.keys())
def test_a_file_that_is_not_a_ledger_is_refused_byte_for_byte_untouched(tmp_path: Path, make):
    path = tmp_path / "app.db"
    make(path)
    before = path.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())

    for _ in range(2):  # and a second try finds it just as it was
        with pytest.raises(
            (LedgerConfigError, LedgerSchemaError, LedgerUnavailableError)
        ) as raised:
            open_ledger(f"sqlite:///{path}")
        assert str(path) in str(raised.value)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_an_empty_sqlite_database_becomes_a_ledger(tmp_path: Path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).execute("VACUUM").connection.close()
    assert path.stat().st_size > 0

    with open_ledger(f"sqlite:///{path}") as ledger:
        assert ledger.claim("k", "run-1").should_run


def test_a_path_the_file_system_cannot_hold_is_a_config_error(tmp_path: Path):
    with pytest.raises(LedgerConfigError, match="cannot be a ledger file"):
        open_ledger(f"sqlite:///{tmp_path}/{'x' * 300}/ledger.db")
