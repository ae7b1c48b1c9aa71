"""The SQLite ledger's layout: files written by an older rocky_dagster keep working (migrated
in place), and the queries that must stay cheap on a large ledger go through an index."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from ledger_helpers import CLOCK_START, CONFIG, RETENTION, FakeClock

from rocky_dagster.ledger import (
    Decision,
    FinalizeReason,
    LedgerConfig,
    Outcome,
    State,
    open_ledger,
)
from rocky_dagster.ledger.model import ENTRY_COLUMNS
from rocky_dagster.ledger.sqlite import (
    _QUERIES,
    _SWEEP_DOOMED,
    DUE_SECOND,
    ENTRIES,
    HOLDER,
    SCHEMA_VERSION,
)

# Schema version 1 exactly as rocky_dagster wrote it (two partial indexes on the entries).
_V1 = """
CREATE TABLE rocky_ledger_entries (
    key TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL, run_id TEXT NOT NULL,
    fence INTEGER NOT NULL, pipeline TEXT, fingerprint TEXT, claimed_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL, lease_expires_at TEXT NOT NULL, finalized_at TEXT,
    expires_at TEXT, dedup_on TEXT NOT NULL, result TEXT, prior_run_id TEXT
) WITHOUT ROWID;
CREATE TABLE rocky_ledger_events (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, run_id TEXT,
    fence INTEGER, at TEXT NOT NULL, detail TEXT
);
CREATE TABLE rocky_ledger_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX rocky_ledger_entries_expiry ON rocky_ledger_entries (expires_at)
    WHERE state != 'in_flight';
CREATE INDEX rocky_ledger_entries_in_flight ON rocky_ledger_entries (run_id)
    WHERE state = 'in_flight';
CREATE INDEX rocky_ledger_events_key_id ON rocky_ledger_events (key, id);
INSERT INTO rocky_ledger_meta (name, value) VALUES ('schema_version', 1);
INSERT INTO rocky_ledger_meta (name, value) VALUES ('last_fence', 0);
"""


def _ts(delta: timedelta) -> str:
    return (CLOCK_START + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_v1_ledger(path: Path) -> None:
    """A version-1 file with a live success, an expired success and run-1's in-flight claim."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_V1)
    rows = [
        ("done", "succeeded", "run-0", 1, _ts(-timedelta(hours=1)), _ts(RETENTION), '{"rows":3}'),
        ("old", "succeeded", "run-0", 3, _ts(-RETENTION * 2), _ts(-RETENTION), None),
        ("live", "in_flight", "run-1", 5, _ts(-timedelta(seconds=1)), None, None),
    ]
    for key, state, run_id, fence, claimed, expires, result in rows:
        lease = _ts(timedelta(seconds=59))
        finalized = None if expires is None else claimed
        conn.execute(
            f"INSERT INTO {ENTRIES} VALUES (?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, 'success', ?, "
            "NULL)",
            (key, state, run_id, fence, claimed, claimed, lease, finalized, expires, result),
        )
        conn.execute(
            "INSERT INTO rocky_ledger_events (id, key, kind, run_id, fence, at) "
            "VALUES (?, ?, 'claimed', ?, ?, ?)",
            (fence, key, run_id, fence, claimed),
        )
    conn.close()


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    finally:
        conn.close()


def test_a_version_1_file_is_migrated_in_place_and_keeps_every_row(tmp_path: Path):
    path = tmp_path / "ledger.db"
    _write_v1_ledger(path)
    clock = FakeClock()
    ledger = open_ledger(f"sqlite:///{path}", CONFIG, clock=clock)
    try:
        assert _indexes(path) == {"rocky_ledger_entries_due"}
        conn = sqlite3.connect(path)
        assert conn.execute(
            "SELECT value FROM rocky_ledger_meta WHERE name = 'schema_version'"
        ).fetchone() == (SCHEMA_VERSION,)
        conn.close()

        skip = ledger.claim("done", "run-2")
        assert (skip.decision, skip.prior_run_id, skip.result) == (
            Decision.SKIPPED_COMPLETED,
            "run-0",
            {"rows": 3},
        )
        assert [e.key for e in ledger.entries(State.IN_FLIGHT, run_id="run-1")] == ["live"]
        assert ledger.claim("live", "run-2").decision == Decision.SKIPPED_IN_FLIGHT
        fresh = ledger.claim("new", "run-2")
        assert fresh.fence is not None and fresh.fence > 5  # fences never go back
        assert ledger.finalize("live", 5, Outcome.SUCCEEDED).applied
        assert ledger.sweep() == 1  # the expired success, found through the new index
        assert ledger.get("old") is None and ledger.get("done") is not None
    finally:
        ledger.close()
    # a second opener finds the file current and changes nothing
    open_ledger(f"sqlite:///{path}").close()
    assert _indexes(path) == {"rocky_ledger_entries_due"}


_V2_LAYOUTS = {
    # the `due` index on version 1's columns
    "due_index": (
        "DROP INDEX rocky_ledger_entries_expiry",
        "DROP INDEX rocky_ledger_entries_in_flight",
        f"CREATE INDEX rocky_ledger_entries_due ON rocky_ledger_entries ({HOLDER}, expires_at)",
    ),
    # the `generation` column on version 1's indexes
    "generation_column": ("ALTER TABLE rocky_ledger_entries ADD COLUMN generation INTEGER",),
}


@pytest.mark.parametrize("layout", sorted(_V2_LAYOUTS))
def test_either_pre_release_version_2_file_is_brought_to_the_current_layout(
    tmp_path: Path, layout: str
):
    """Two pre-release layouts both said version 2; each ends as a fresh file's layout."""
    path = tmp_path / "ledger.db"
    _write_v1_ledger(path)
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _V2_LAYOUTS[layout]:
        conn.execute(statement)
    conn.execute("UPDATE rocky_ledger_meta SET value = 2 WHERE name = 'schema_version'")
    conn.close()

    clock = FakeClock()
    with open_ledger(f"sqlite:///{path}", CONFIG, clock=clock) as ledger:
        assert _indexes(path) == {"rocky_ledger_entries_due"}
        assert ledger.get("live").generation == 5
        assert ledger.claim("done", "run-2").decision == Decision.SKIPPED_COMPLETED
        clock.advance(seconds=60)
        adopted = ledger.claim("live", "run-2")
        assert (adopted.decision, adopted.generation) == (Decision.ADOPTED_STALE, 5)
        fresh = ledger.claim("new", "run-2")
        assert fresh.generation == fresh.fence and fresh.fence > adopted.fence
        assert ledger.get("new").generation == fresh.fence
        assert ledger.check() == []
    conn = sqlite3.connect(path)
    try:
        # the one-statement claim stores the generation (not NULL-means-fence)
        assert conn.execute(
            "SELECT generation FROM rocky_ledger_entries WHERE key = 'new'"
        ).fetchone() == (fresh.fence,)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(rocky_ledger_entries)")]
        assert columns.count("generation") == 1
        assert conn.execute(
            "SELECT value FROM rocky_ledger_meta WHERE name = 'schema_version'"
        ).fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


def _plan(path: Path, sql: str, params: tuple[object, ...]) -> str:
    conn = sqlite3.connect(path)
    try:
        return " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()


def test_sweep_and_the_reconcilers_query_search_an_index_not_the_table(tmp_path: Path):
    """Both cost what they find, however many finished entries the ledger holds."""
    path = tmp_path / "ledger.db"
    with open_ledger(f"sqlite:///{path}", CONFIG, clock=FakeClock()) as ledger:
        for n in range(50):
            claim = ledger.claim(f"k{n}", f"run-{n % 3}")
            assert claim.fence is not None
            if n % 5:
                ledger.finalize(f"k{n}", claim.fence, Outcome.SUCCEEDED)
        now = _ts(timedelta(0))
        sweep = _plan(path, _SWEEP_DOOMED, (now, now))
        assert sweep.count("USING INDEX rocky_ledger_entries_due") == 2, sweep
        assert "SCAN" not in sweep, sweep
        # what entries(State.IN_FLIGHT, run_id=…) runs for the run-status reconcilers
        by_run = _plan(path, *_QUERIES.entries(State.IN_FLIGHT, run_id="run-1"))
        assert "USING INDEX rocky_ledger_entries_due" in by_run, by_run
        # a key prefix walks the primary key
        by_prefix = _plan(path, *_QUERIES.entries(prefix="k1"))
        assert "USING PRIMARY KEY (key>? AND key<?)" in by_prefix, by_prefix
        assert [e.key for e in ledger.entries(State.IN_FLIGHT, run_id="run-1")] == [
            f"k{n}" for n in (40, 25, 10)
        ]


# Schema version 4 exactly as rocky_dagster wrote it: each key's history through a (key, id)
# index, which every claim and finalize wrote a page of.
_V4 = f"""
CREATE TABLE rocky_ledger_entries (
    key TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL, run_id TEXT NOT NULL,
    fence INTEGER NOT NULL, pipeline TEXT, fingerprint TEXT, claimed_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL, lease_expires_at TEXT NOT NULL, finalized_at TEXT,
    expires_at TEXT, dedup_on TEXT NOT NULL, result TEXT, prior_run_id TEXT,
    generation INTEGER, holder_process TEXT
) WITHOUT ROWID;
CREATE TABLE rocky_ledger_events (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, run_id TEXT,
    fence INTEGER, at TEXT NOT NULL, detail TEXT
);
CREATE TABLE rocky_ledger_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX rocky_ledger_entries_due ON rocky_ledger_entries ({HOLDER}, expires_at);
CREATE INDEX rocky_ledger_events_key_id ON rocky_ledger_events (key, id);
INSERT INTO rocky_ledger_meta (name, value) VALUES ('schema_version', 4);
"""
_V4_ENTRY_COLUMNS = ", ".join(ENTRY_COLUMNS)
_EVENT_COLUMNS = "id, key, kind, run_id, fence, at, detail"
_KEYS = ("done", "swept", "reset", "lost", "live", "never")


def _lived_ledger(path: Path, clock: FakeClock) -> None:
    """A ledger with every kind of history: entries, keys swept or reset (events but no
    entry), a finalize that found no entry, a trimmed log, interleaved keys."""
    brief = LedgerConfig(**{**CONFIG.model_dump(), "retention_days": 1 / 24})
    with (
        open_ledger(f"sqlite:///{path}", CONFIG, clock=clock) as ledger,
        open_ledger(f"sqlite:///{path}", brief, clock=clock) as short_lived,
    ):
        ledger.claim("trimmed", "run-0")
        clock.advance(hours=25)
        for key in ("done", "swept", "reset"):
            claim = ledger.claim(key, "run-1")
            assert claim.fence is not None
            (short_lived if key == "swept" else ledger).finalize(
                key, claim.fence, Outcome.SUCCEEDED, result={"key": key}
            )
        assert ledger.claim("done", "run-2").decision == Decision.SKIPPED_COMPLETED
        assert ledger.reset("reset")
        assert not ledger.finalize("lost", 7, Outcome.FAILED).applied
        ledger.claim("live", "run-2")
        clock.advance(hours=2)
        assert ledger.sweep() == 2  # "swept", and "trimmed" (abandoned a day): its claim goes
        assert ledger.get("swept") is None and ledger.history("swept")


def _write_v4_ledger(path: Path, clock: FakeClock) -> dict[str, list[tuple[object, ...]]]:
    """A version-4 file (its own DDL) holding a lived ledger's rows, and each key's history
    as version 4 read it (`WHERE key = ? ORDER BY id`, through the index)."""
    source = path.with_name("source.db")
    _lived_ledger(source, clock)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_V4)
    conn.execute("ATTACH DATABASE ? AS source", (str(source),))
    conn.execute(
        f"INSERT INTO {ENTRIES} ({_V4_ENTRY_COLUMNS}) "
        f"SELECT {_V4_ENTRY_COLUMNS} FROM source.{ENTRIES}"
    )
    conn.execute(
        f"INSERT INTO rocky_ledger_events ({_EVENT_COLUMNS}) "
        f"SELECT {_EVENT_COLUMNS} FROM source.rocky_ledger_events"
    )
    conn.execute(
        "INSERT INTO rocky_ledger_meta SELECT * FROM source.rocky_ledger_meta "
        "WHERE name = 'last_fence'"
    )
    histories = {
        key: conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM rocky_ledger_events WHERE key = ? ORDER BY id", (key,)
        ).fetchall()
        for key in (*_KEYS, "trimmed")
    }
    conn.execute("DETACH DATABASE source")
    conn.close()
    return histories


def _due_index(path: Path) -> str:
    """The `due` index's DDL."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'rocky_ledger_entries_due'"
        ).fetchone()[0]
    finally:
        conn.close()


def test_a_version_4_file_is_upgraded_in_place_and_every_history_reads_as_before(
    tmp_path: Path,
):
    path = tmp_path / "ledger.db"
    clock = FakeClock()
    before = _write_v4_ledger(path, clock)
    assert [kind for (_, _, kind, *_) in before["swept"]] == ["claimed", "succeeded", "swept"]
    assert [kind for (_, _, kind, *_) in before["trimmed"]] == ["swept"]
    assert before["lost"] and before["never"] == []

    with open_ledger(f"sqlite:///{path}", CONFIG, clock=clock) as ledger:
        assert _indexes(path) == {"rocky_ledger_entries_due"}
        assert _due_index(path).endswith(f"({HOLDER}, {DUE_SECOND})")  # expiries to the second
        for key, rows in before.items():
            assert [(e.id, e.key, e.kind.value, e.run_id, e.fence, e.detail) for e in
                    ledger.history(key)] == [(r[0], *r[1:5], r[6]) for r in rows], key  # fmt: skip
            assert ledger.history(key, limit=2) == ledger.history(key)[-2:]
        assert ledger.check() == []

        # the upgraded chains go on: a swept key claimed again, a reset key too
        for key in ("swept", "reset"):
            claim = ledger.claim(key, "run-3")
            assert claim.decision == Decision.PROCEED and claim.fence is not None
            assert [e.kind.value for e in ledger.history(key)][-2:] == [
                before[key][-1][2],
                "claimed",
            ]
            assert len(ledger.history(key)) == len(before[key]) + 1
        assert ledger.finalize("done", 1, Outcome.FAILED).reason == FinalizeReason.STALE_FENCE
        assert len(ledger.history("done")) == len(before["done"]) + 1

    conn = sqlite3.connect(path)
    try:
        assert conn.execute(
            "SELECT value FROM rocky_ledger_meta WHERE name = 'schema_version'"
        ).fetchone() == (SCHEMA_VERSION,)
        assert SCHEMA_VERSION == 5
    finally:
        conn.close()
    open_ledger(f"sqlite:///{path}").close()  # current: nothing more to do
    assert _indexes(path) == {"rocky_ledger_entries_due"}


def test_history_walks_its_key_by_event_id_not_the_log(tmp_path: Path):
    """A key's history costs its own events, with no index on the log: a fresh file has none."""
    path = tmp_path / "ledger.db"
    with open_ledger(f"sqlite:///{path}", CONFIG, clock=FakeClock()) as ledger:
        for n in range(20):
            claim = ledger.claim(f"k{n % 4}", "run-1", force=True)
            assert claim.fence is not None
            ledger.finalize(f"k{n % 4}", claim.fence, Outcome.SUCCEEDED)
        assert len(ledger.history("k1")) == 10 and len(ledger.history("k1", limit=3)) == 3
    assert _indexes(path) == {"rocky_ledger_entries_due"}
    for limit in (None, 3):
        plan = _plan(path, *_QUERIES.history("k1", limit=limit))
        assert "SCAN rocky_ledger_events" not in plan, plan
        assert "USING INTEGER PRIMARY KEY" in plan, plan
