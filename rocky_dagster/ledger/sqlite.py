"""Embedded SQLite backend: one file, many processes on one host.

WAL lets readers run beside the single writer; `BEGIN IMMEDIATE` takes the
write lock before the row is read, so read-decide-write is atomic across
processes; the busy timeout makes contenders wait instead of failing.
`synchronous=FULL` because a success record must survive a power cut.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from .backend import Clock, Ledger
from .config import LedgerConfig
from .errors import LedgerConfigError, LedgerSchemaError, LedgerUnavailableError
from .model import Entry, Event, EventKind, State, Stats, decode_result, encode_result

SCHEMA_VERSION = 1
ENTRIES = "rocky_ledger_entries"
EVENTS = "rocky_ledger_events"
META = "rocky_ledger_meta"
BUSY_TIMEOUT_SECONDS = 30.0

_ENTRY_COLUMNS = (
    "key",
    "state",
    "run_id",
    "fence",
    "pipeline",
    "fingerprint",
    "claimed_at",
    "heartbeat_at",
    "lease_expires_at",
    "finalized_at",
    "expires_at",
    "dedup_on",
    "result",
    "prior_run_id",
)
_SELECT_ENTRY = f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM {ENTRIES}"
_UPSERT_ENTRY = (
    f"INSERT OR REPLACE INTO {ENTRIES} ({', '.join(_ENTRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _ENTRY_COLUMNS)})"
)
_INSERT_EVENT = (
    f"INSERT INTO {EVENTS} (key, kind, run_id, fence, at, detail) VALUES (?, ?, ?, ?, ?, ?)"
)

T = TypeVar("T")


def _ts(value: datetime | None) -> str | None:
    """Fixed-width UTC text, so string order is time order in SQL."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _entry(row: tuple[Any, ...]) -> Entry:
    data = dict(zip(_ENTRY_COLUMNS, row, strict=True))
    for name in ("claimed_at", "heartbeat_at", "lease_expires_at", "finalized_at", "expires_at"):
        data[name] = _dt(data[name])
    data["result"] = decode_result(data["result"])
    return Entry.model_validate(data)


def _entry_params(entry: Entry) -> tuple[Any, ...]:
    return (
        entry.key,
        entry.state.value,
        entry.run_id,
        entry.fence,
        entry.pipeline,
        entry.fingerprint,
        _ts(entry.claimed_at),
        _ts(entry.heartbeat_at),
        _ts(entry.lease_expires_at),
        _ts(entry.finalized_at),
        _ts(entry.expires_at),
        entry.dedup_on,
        encode_result(entry.result),
        entry.prior_run_id,
    )


class _SQLiteTransaction:
    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now

    def load(self, key: str) -> Entry | None:
        row = self.conn.execute(f"{_SELECT_ENTRY} WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry(row)

    def insert(self, entry: Entry) -> bool:
        self.conn.execute(_UPSERT_ENTRY, _entry_params(entry))
        return True  # BEGIN IMMEDIATE already excludes every other writer

    def update(self, entry: Entry) -> None:
        self.conn.execute(_UPSERT_ENTRY, _entry_params(entry))

    def delete(self, key: str) -> None:
        self.conn.execute(f"DELETE FROM {ENTRIES} WHERE key = ?", (key,))

    def next_fence(self) -> int:
        (value,) = self.conn.execute(
            f"UPDATE {META} SET value = value + 1 WHERE name = 'last_fence' RETURNING value"
        ).fetchone()
        return int(value)

    def log(
        self, kind: EventKind, key: str, run_id: str | None, fence: int | None, detail: str | None
    ) -> None:
        self.conn.execute(_INSERT_EVENT, (key, kind.value, run_id, fence, _ts(self.now), detail))


class SQLiteLedger(Ledger):
    """A ledger in one SQLite file (WAL). Safe across threads, processes and forks on one host."""

    def __init__(
        self,
        url: str,
        path: str | os.PathLike[str],
        config: LedgerConfig | None = None,
        clock: Clock | None = None,
        *,
        busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(url, config, clock)
        self.path = Path(path).expanduser().absolute()
        if not self.path.parent.is_dir():
            raise LedgerConfigError(
                f"url: directory {self.path.parent} does not exist; create it first or point the "
                "ledger url at a file in an existing directory"
            )
        if self.path.is_dir():
            raise LedgerConfigError(f"url: {self.path} is a directory; give a file path")
        self._busy_timeout = busy_timeout_seconds
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self._lock:
            self._connection()

    # --- connection -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; a forked child never reuses its parent's."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = None
            self._conn = self._guard(self._connect)
            self._pid = os.getpid()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path),
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._check_writable()
                _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = FULL")
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = self._schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"{self.path} holds ledger schema version {version}, but this rocky_dagster "
                f"understands up to {SCHEMA_VERSION}: upgrade rocky_dagster to use this ledger"
            )
        self._check_writable()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._schema_version(conn) is None:
                _create_schema(sqlite_utils.Database(conn))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (META,)
        ).fetchone()
        if not exists:
            return None
        row = conn.execute(f"SELECT value FROM {META} WHERE name = 'schema_version'").fetchone()
        if row is None:
            raise LedgerSchemaError(f"{self.path}: table {META} has no schema_version row")
        return int(row[0])

    def _check_writable(self) -> None:
        """Refuse a file marked read-only even where the OS would let us write (root)."""
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise LedgerUnavailableError(
                f"ledger file {self.path} is read-only (mode {stat.filemode(mode)}): make it "
                "writable (chmod u+w) or point the ledger url at a writable file; no work was done"
            )

    def _guard(self, fn: Callable[[], T]) -> T:
        """Run `fn`, turning sqlite3 errors into ledger errors that say what to do."""
        try:
            return fn()
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> Exception:
        text = str(exc)
        if "file is not a database" in text or "file is encrypted" in text:
            return LedgerConfigError(
                f"url: {self.path} is not a SQLite database; point the ledger url at a ledger "
                "file or at a path that does not exist yet"
            )
        if "readonly" in text or "read-only" in text:
            return LedgerUnavailableError(
                f"ledger file {self.path} is read-only ({text}): make it and its directory "
                "writable, or point the ledger url elsewhere; no work was done"
            )
        if "locked" in text or "busy" in text:
            return LedgerUnavailableError(
                f"ledger file {self.path} stayed locked for {self._busy_timeout:g} s ({text}); "
                "another process holds a long write transaction"
            )
        return LedgerUnavailableError(f"ledger file {self.path} cannot be used: {text}")

    # --- the store interface -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_SQLiteTransaction]:
        with self._lock:
            conn = self._connection()
            self._check_writable()
            self._guard(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                tx = _SQLiteTransaction(conn, self._now(lambda: datetime.now(UTC)))
                try:
                    yield tx
                except sqlite3.Error as exc:
                    raise self._translate(exc) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._guard(lambda: conn.execute("COMMIT"))

    def now(self) -> datetime:
        return self._now(lambda: datetime.now(UTC))

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connection()
            return self._guard(lambda: conn.execute(sql, params).fetchall())

    def get(self, key: str) -> Entry | None:
        rows = self._read(f"{_SELECT_ENTRY} WHERE key = ?", (key,))
        return _entry(rows[0]) if rows else None

    def entries(
        self, state: State | str | None = None, *, run_id: str | None = None, limit: int = 100
    ) -> list[Entry]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(State(state).value)
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        sql = _SELECT_ENTRY + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY claimed_at DESC, fence DESC LIMIT ?"
        return [_entry(r) for r in self._read(sql, (*params, int(limit)))]

    def history(self, key: str, *, limit: int | None = None) -> list[Event]:
        sql = f"SELECT id, key, kind, run_id, fence, at, detail FROM {EVENTS} WHERE key = ? ORDER BY id"
        params: tuple[Any, ...] = (key,)
        if limit is not None:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT ?) ORDER BY id"
            params = (key, int(limit))
        return [
            Event(id=r[0], key=r[1], kind=r[2], run_id=r[3], fence=r[4], at=_dt(r[5]), detail=r[6])
            for r in self._read(sql, params)
        ]

    def stats(self) -> Stats:
        now = _ts(self.now())
        (counts,) = self._read(
            f"""SELECT count(*),
                   coalesce(sum(state = 'in_flight'), 0),
                   coalesce(sum(state = 'succeeded'), 0),
                   coalesce(sum(state = 'failed'), 0),
                   coalesce(sum(state != 'in_flight' AND expires_at <= ?), 0),
                   coalesce(sum(state = 'in_flight' AND lease_expires_at <= ?), 0)
                FROM {ENTRIES}""",
            (now, now),
        )
        ((events,),) = self._read(f"SELECT count(*) FROM {EVENTS}")
        ((fence,),) = self._read(f"SELECT value FROM {META} WHERE name = 'last_fence'")
        return Stats(
            entries=counts[0],
            in_flight=counts[1],
            succeeded=counts[2],
            failed=counts[3],
            expired=counts[4],
            stale_in_flight=counts[5],
            events=events,
            last_fence=int(fence),
        )

    def _sweep(self, now: datetime, abandoned_before: datetime) -> int:
        with self.transaction() as tx:
            conn = tx.conn
            doomed = conn.execute(
                f"""SELECT key, run_id, fence, state FROM {ENTRIES}
                    WHERE state != 'in_flight' AND expires_at <= ?
                    UNION ALL
                    SELECT key, run_id, fence, state FROM {ENTRIES}
                    WHERE state = 'in_flight' AND lease_expires_at <= ?""",
                (_ts(now), _ts(abandoned_before)),
            ).fetchall()
            conn.executemany(f"DELETE FROM {ENTRIES} WHERE key = ?", [(d[0],) for d in doomed])
            conn.executemany(
                _INSERT_EVENT,
                [
                    (d[0], EventKind.SWEPT.value, d[1], d[2], _ts(now), f"{d[3]} entry expired")
                    for d in doomed
                ],
            )
            # the event log keeps one retention period of history, like the entries it explains
            conn.execute(f"DELETE FROM {EVENTS} WHERE at < ?", (_ts(abandoned_before),))
            return len(doomed)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _create_schema(db: sqlite_utils.Database) -> None:
    db[ENTRIES].create(
        {
            "key": str,
            "state": str,
            "run_id": str,
            "fence": int,
            "pipeline": str,
            "fingerprint": str,
            "claimed_at": str,
            "heartbeat_at": str,
            "lease_expires_at": str,
            "finalized_at": str,
            "expires_at": str,
            "dedup_on": str,
            "result": str,
            "prior_run_id": str,
        },
        pk="key",
        not_null={"state", "run_id", "fence", "claimed_at", "heartbeat_at", "lease_expires_at"},
        if_not_exists=True,
    )
    db[EVENTS].create(
        {
            "id": int,
            "key": str,
            "kind": str,
            "run_id": str,
            "fence": int,
            "at": str,
            "detail": str,
        },
        pk="id",
        not_null={"key", "kind", "at"},
        if_not_exists=True,
    )
    db[META].create({"name": str, "value": int}, pk="name", if_not_exists=True)
    # claim/finalize go by primary key; these serve sweep (costs what it deletes),
    # the run-status reconcilers (by run) and history (by key).
    db.execute(
        f"CREATE INDEX IF NOT EXISTS {ENTRIES}_expiry ON {ENTRIES} (expires_at) WHERE state != 'in_flight'"
    )
    db.execute(
        f"CREATE INDEX IF NOT EXISTS {ENTRIES}_lease ON {ENTRIES} (lease_expires_at) WHERE state = 'in_flight'"
    )
    db[ENTRIES].create_index(["run_id"], if_not_exists=True)
    db[EVENTS].create_index(["key", "id"], if_not_exists=True)
    db[EVENTS].create_index(["at"], if_not_exists=True)
    db[META].insert_all(
        [{"name": "schema_version", "value": SCHEMA_VERSION}, {"name": "last_fence", "value": 0}],
        replace=True,
    )


def _retry_busy(fn: Callable[[], T], attempts: int = 50) -> T:
    """journal_mode changes ignore the busy handler; retry them briefly under contention."""
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(0.02 * (i + 1))
    raise AssertionError("unreachable")
