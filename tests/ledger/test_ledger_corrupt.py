"""A damaged row or page is a named error (`LedgerCorruptError`), never a `proceed`.

Rows are damaged with raw SQL behind the ledger's back, as a bad disk, a bad restore or a
hand edit would. The row-level cases run on both backends as far as the store's column types
allow (PostgreSQL's typed columns refuse a bad timestamp or fence themselves).
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ledger_helpers import CONFIG, FakeClock, MakeLedger

from rocky_dagster.ledger import (
    Ledger,
    LedgerCorruptError,
    LedgerUnavailableError,
    Outcome,
    open_ledger,
)
from rocky_dagster.ledger.postgres import parse_url


def raw_sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run one statement on the ledger's store directly, bypassing the ledger."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()
        return
    conninfo, schema = parse_url(url)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute(statement, params)  # type: ignore[arg-type]


@pytest.fixture
def settled(make_ledger: MakeLedger, clock: FakeClock) -> Ledger:
    ledger = make_ledger(CONFIG, clock)
    claim = ledger.claim("k", "run-1")
    assert ledger.finalize("k", claim.fence, Outcome.FAILED).applied  # claimable again
    return ledger


def assert_corrupt_everywhere(ledger: Ledger, key: str = "k") -> None:
    """Every call that reads the row names the damage; no claim proceeds."""
    for call in (
        lambda: ledger.claim(key, "run-2"),
        lambda: ledger.claim(key, "run-2", force=True),
        lambda: ledger.get(key),
        lambda: ledger.entries(),
        lambda: ledger.finalize(key, 1, Outcome.SUCCEEDED),
    ):
        with pytest.raises(LedgerCorruptError) as raised:
            call()
        assert isinstance(raised.value, LedgerUnavailableError)  # callers fail closed
        assert repr(key) in str(raised.value) and "ledger check" in str(raised.value)
    with suppress(LedgerCorruptError):  # PostgreSQL's heartbeat reads no row back
        assert ledger.heartbeat(key, 1) is False


ROW_DAMAGE = {
    "result-not-json": "UPDATE rocky_ledger_entries SET result = '{\"rows\": 4' WHERE key = 'k'",
    "result-not-an-object": "UPDATE rocky_ledger_entries SET result = '[1, 2]' WHERE key = 'k'",
    "result-too-deep": "UPDATE rocky_ledger_entries SET result = '"
    + '{"a":' * 5000
    + "1"
    + "}" * 5000
    + "' WHERE key = 'k'",
}
SQLITE_ONLY_DAMAGE = {
    "timestamp-unparsable": "UPDATE rocky_ledger_entries SET claimed_at = 'yesterday' WHERE key = 'k'",
    "timestamp-without-zone": "UPDATE rocky_ledger_entries SET lease_expires_at = "
    "'2031-03-14T15:09:26' WHERE key = 'k'",
    "unknown-state": "UPDATE rocky_ledger_entries SET state = 'finished' WHERE key = 'k'",
    "fence-not-an-integer": "UPDATE rocky_ledger_entries SET fence = 'seven' WHERE key = 'k'",
    "fence-fractional": "UPDATE rocky_ledger_entries SET fence = 1.5 WHERE key = 'k'",
}
ROW_DAMAGE.update(
    {
        "fence-zero": "UPDATE rocky_ledger_entries SET fence = 0 WHERE key = 'k'",
        "generation-above-fence": "UPDATE rocky_ledger_entries SET generation = fence + 1 "
        "WHERE key = 'k'",
        "unknown-dedup-policy": "UPDATE rocky_ledger_entries SET dedup_on = 'never' "
        "WHERE key = 'k'",
        "finished-without-expiry": "UPDATE rocky_ledger_entries SET expires_at = NULL "
        "WHERE key = 'k'",
    }
)


@pytest.mark.parametrize("damage", ROW_DAMAGE.values(), ids=ROW_DAMAGE.keys())
def test_a_damaged_entry_is_a_corrupt_error_on_every_backend(
    settled: Ledger, ledger_url: str, damage: str
):
    raw_sql(ledger_url, damage)
    assert_corrupt_everywhere(settled)


@pytest.mark.parametrize("damage", SQLITE_ONLY_DAMAGE.values(), ids=SQLITE_ONLY_DAMAGE.keys())
def test_a_damaged_sqlite_entry_is_a_corrupt_error(tmp_path: Path, damage: str):
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url, CONFIG, clock=FakeClock()) as ledger:
        claim = ledger.claim("k", "run-1")
        ledger.finalize("k", claim.fence, Outcome.FAILED)
        raw_sql(url, damage)
        assert_corrupt_everywhere(ledger)


def test_a_damaged_event_is_a_corrupt_error(settled: Ledger, ledger_url: str):
    raw_sql(ledger_url, "UPDATE rocky_ledger_events SET kind = 'exploded' WHERE key = 'k'")

    with pytest.raises(LedgerCorruptError, match="rocky_ledger_events row of key 'k'"):
        settled.history("k")


# --- damaged pages (SQLite) -------------------------------------------------------------------------


@pytest.fixture
def big_ledger(tmp_path: Path) -> Iterator[Path]:
    """A checkpointed ledger file of many pages, closed."""
    path = tmp_path / "ledger.db"
    with open_ledger(f"sqlite:///{path}") as ledger:
        for n in range(300):
            claim = ledger.claim(f"key/{n:04d}", f"run-{n}")
            ledger.finalize(f"key/{n:04d}", claim.fence, Outcome.SUCCEEDED, result={"n": n})
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    yield path


def flip_bits(path: Path, *, seed: int, skip_header: bool = True) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    start = 100 if skip_header else 0
    for _ in range(64):
        at = rng.randrange(start, len(data))
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("seed", range(8))
def test_flipped_bits_never_let_a_claim_proceed_on_a_finished_key(big_ledger: Path, seed: int):
    """Whatever the damage, a claim of a key that succeeded is a skip or a named error."""
    flip_bits(big_ledger, seed=seed)
    try:
        ledger = open_ledger(f"sqlite:///{big_ledger}")
    except LedgerUnavailableError:
        return  # refused at open: named, and nothing ran
    try:
        for n in range(0, 300, 7):
            try:
                claim = ledger.claim(f"key/{n:04d}", "run-new")
            except LedgerUnavailableError:
                continue  # named (LedgerCorruptError is one): fail closed
            # an intact row still dedups; a row the damage removed from the index is the one
            # case SQLite itself cannot tell: `ledger check` reports that file as damaged
            if claim.should_run:
                assert not _intact(big_ledger), f"key/{n:04d} proceeded on an intact ledger"
    finally:
        ledger.close()


def _intact(path: Path) -> bool:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def test_a_damaged_page_is_a_corrupt_error_naming_the_file(big_ledger: Path):
    with open_ledger(f"sqlite:///{big_ledger}") as ledger:
        data = bytearray(big_ledger.read_bytes())
        page = 4096
        for at in range(2 * page, len(data) - page, page):  # every b-tree page header but one
            data[at] = 0x42  # not a valid page type
        big_ledger.write_bytes(bytes(data))
        with pytest.raises(LedgerCorruptError) as raised:
            for n in range(300):
                ledger.claim(f"key/{n:04d}", "run-new")
        assert str(big_ledger) in str(raised.value)


def test_a_damaged_fence_floor_is_a_corrupt_error_not_a_type_error(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        ledger.claim("k", "run-1")
        raw_sql(url, "UPDATE rocky_ledger_meta SET value = 'many' WHERE name = 'last_fence'")
        for call in (lambda: ledger.claim("new", "run-2"), ledger.stats, ledger.sweep):
            with pytest.raises(LedgerCorruptError, match="last_fence"):
                call()
        assert ledger.get("new") is None
