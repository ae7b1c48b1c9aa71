"""The SQLite ledger commits durably: a success record must survive a power cut, so every
connection it opens runs with ``synchronous = FULL`` in WAL mode (fsync at every commit)."""

from __future__ import annotations

from pathlib import Path

from rocky_dagster.ledger import Outcome, open_ledger

FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_the_sqlite_ledger_runs_with_synchronous_full_in_wal_mode(tmp_path: Path) -> None:
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        claim = ledger.claim("k", "run-1")
        assert ledger.finalize("k", claim.fence, Outcome.SUCCEEDED).applied
        conn = ledger._connection()  # the connection every call of this ledger uses
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == FULL
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_reopened_connection_runs_with_synchronous_full_too(tmp_path: Path) -> None:
    """The pragma is per connection: a ledger that reconnects (after a fork, or a closed
    handle) must set it again."""
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.claim("k", "run-1")
        ledger.close()
        ledger.claim("k2", "run-1")
        assert ledger._connection().execute("PRAGMA synchronous").fetchone()[0] == FULL
