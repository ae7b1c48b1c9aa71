"""Embedded SQLite backend: one file, many processes on one host.

WAL lets readers run beside the single writer; `BEGIN IMMEDIATE` takes the
write lock before the row is read, so read-decide-write is atomic across
processes; the busy timeout makes contenders wait instead of failing.
`synchronous=FULL` because a success record must survive a power cut.

Every commit fsyncs the pages it dirtied, so the layout keeps that number low: entries
in one key-ordered B-tree (WITHOUT ROWID), one index serving both reconcilers and sweep,
no fence counter of its own (fences are event ids, see `next_fence`), and no index on the
event log (each key's events are chained instead, see `_create_schema`). The two writes of
every run's hot path are `Ledger`'s one-statement primitives (a claim of a key with no row is
an insert-if-absent, a finalize of a live claim a compare-and-set UPDATE, each with its event
and under the write lock); anything else takes `Ledger`'s transaction path (load, decide,
write what changed). `benchmarks/ledger_bench.py` measures the pages a cycle writes.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .backend import Clock, Ledger, NewClaim, row_problems
from .config import LedgerConfig
from .errors import (
    LedgerConfigError,
    LedgerCorruptError,
    LedgerSchemaError,
    LedgerUnavailableError,
)
from .model import (
    ENTRY_COLUMNS,
    Entry,
    Event,
    EventKind,
    Outcome,
    Stats,
    corrupt_row,
    decode_result,
    encode_result,
)
from .queries import Dialect, Query, ReadQueries, decode_event, history_limit

SCHEMA_VERSION = 5
"""1: the first release. 2: one `due` index instead of two partial ones (fewer pages per
claim+finalize). 3: `generation` column on entries (NULL reads as the entry's fence).
4: `holder_process` column on entries (NULL: written before v4, holder unknown).
5: each key's events chained (`prev_id`, the entry's `last_event`, `heads` for keys with no
entry) instead of the `(key, id)` index, and `due` keeps expiries to the second (`DUE_SECOND`):
~7 pages per claim+finalize instead of ~9.
A file of either pre-release layout that called itself 2 (`due` only, or `generation` only)
is brought to 3 as well: see `_migrate`."""
SQLITE_MAGIC = b"SQLite format 3\x00"
ENTRIES = "rocky_ledger_entries"
EVENTS = "rocky_ledger_events"
META = "rocky_ledger_meta"
HEADS = "rocky_ledger_heads"
BUSY_TIMEOUT_SECONDS = 30.0
WAL_AUTOCHECKPOINT_PAGES = 4000

# insert-if-absent (the protocol's `insert` reports a conflict) and a plain UPDATE: an
# INSERT OR REPLACE would delete and re-insert the row, rewriting every index. The new entry
# continues the chain of its key's earlier events (`HEADS`), if any.
_INSERT_ENTRY = (
    f"INSERT INTO {ENTRIES} ({', '.join(ENTRY_COLUMNS)}, last_event) "
    f"VALUES ({', '.join('?' for _ in ENTRY_COLUMNS)}, ?) ON CONFLICT (key) DO NOTHING"
)


@functools.cache
def _update_sql(columns: tuple[str, ...]) -> str:
    """UPDATE of the given columns by key (one text per column set, so statements are cached)."""
    return f"UPDATE {ENTRIES} SET {', '.join(f'{c} = ?' for c in columns)} WHERE key = ?"


FAST_PATH = sqlite3.sqlite_version_info >= (3, 35, 0)
"""`RETURNING` came with SQLite 3.35 (2021); an older library takes the generic path."""

HOLDER = "(CASE WHEN state = 'in_flight' THEN run_id END)"
"""The run holding an in-flight row, NULL for a terminal one: the first column of the `due`
index. Queries that should use the index spell it exactly so (SQLite matches expressions)."""
_SECOND = "CAST(strftime('%s', substr({}, 1, 19)) AS INTEGER)"
DUE_SECOND = _SECOND.format("expires_at")
"""The whole second of `expires_at` (its fixed-width text cut before the fraction, so never
rounded up) as an integer: the `due` index's second column. A few bytes where the text takes
27, so the index that every finalize appends to grows half as fast (fewer page splits)."""
_NO_LIMIT = 2**62
"""`history` without a limit walks the whole chain (the walk's step count is bounded by it)."""


class _ChainReads(ReadQueries):
    """The shared reads, but `history` walks the key's chain (the event log has no key index)."""

    def history(self, key: str, *, limit: int | None = None) -> Query:
        """The key's events oldest first; with `limit`, its last `limit` events.

        From the key's newest event back along `prev_id`. Ids only go down, and the key must
        match: a link to an event that sweep trimmed (always a prefix of the log, so every
        older event of the key is gone too) or to a reused id ends the walk.
        """
        chain = f"""
            WITH RECURSIVE chain(id, prev, n) AS (
                SELECT id, prev_id, 1 FROM {EVENTS}
                WHERE key = ?1 AND ?2 > 0 AND id = coalesce(
                    (SELECT last_event FROM {ENTRIES} WHERE key = ?1),
                    (SELECT id FROM {HEADS} WHERE key = ?1))
                UNION ALL
                SELECT e.id, e.prev_id, chain.n + 1 FROM chain JOIN {EVENTS} AS e
                ON e.id = chain.prev AND e.id < chain.id AND e.key = ?1 AND chain.n < ?2
            )
            {self.select_event} WHERE id IN (SELECT id FROM chain) ORDER BY id"""
        return chain, (key, _NO_LIMIT if limit is None else history_limit(limit))


_QUERIES = _ChainReads(Dialect("?", holder=HOLDER), ENTRIES, EVENTS)
_SELECT_ENTRY = _QUERIES.select_entry

_FAST_CLAIM = f"""
    INSERT INTO {ENTRIES} (key, state, run_id, fence, pipeline, fingerprint, claimed_at,
        heartbeat_at, lease_expires_at, dedup_on, generation, holder_process, last_event)
    SELECT ?1, 'in_flight', ?2, top.fence, ?3, ?4, ?5, ?5, ?6, ?7, top.fence, ?8, top.fence
    FROM (
        SELECT max(coalesce((SELECT max(id) FROM {EVENTS}), 0), value) + 1 AS fence,
            typeof(value) AS kind
        FROM {META} WHERE name = 'last_fence'
    ) AS top
    WHERE top.kind = 'integer'
    ON CONFLICT (key) DO NOTHING
    RETURNING fence"""
"""A claim of a key with no row, its fence computed in place (see `next_fence`) and written as
its generation too (a new key begins one), and as its last event (the claim's, logged next
with that id). No row back means the key has one, or the fence floor is damaged: the claim
then goes through the decision table, which says which."""
_FAST_FINALIZE = (
    f"UPDATE {ENTRIES} SET state = ?, finalized_at = ?, expires_at = ?, result = ? "
    "WHERE key = ? AND fence = ? AND state = 'in_flight' RETURNING run_id"
)
"""Compare-and-set of the live claim `fence`; no row back sends the finalize to the generic path,
which finds out why under the same write lock."""
_INSERT_EVENT_AS = (
    f"INSERT INTO {EVENTS} (id, key, kind, run_id, fence, at, detail, prev_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

_SWEEP_DOOMED = f"""
    SELECT key, run_id, fence, state, last_event FROM {ENTRIES}
        WHERE {HOLDER} IS NULL AND {DUE_SECOND} <= {_SECOND.format("?1")} AND expires_at <= ?1
    UNION ALL
    SELECT key, run_id, fence, state, last_event FROM {ENTRIES}
        WHERE {HOLDER} >= '' AND lease_expires_at <= ?2"""
"""Terminal rows past retention and claims abandoned for a retention period, both found through
the `due` index (a range of it each), so a sweep costs what it deletes, not the ledger's size.
The index knows expiries to the second; the row's own `expires_at` decides."""

_FENCE_TOP = (
    f"SELECT max(coalesce((SELECT max(id) FROM {EVENTS}), 0), "
    f"(SELECT value FROM {META} WHERE name = 'last_fence'))"
)
"""No fence ever handed out is above this: every claim logs an event, sweep keeps the floor."""
_RAISE_FENCE_FLOOR = f"UPDATE {META} SET value = max(value, ?) WHERE name = 'last_fence'"
_INSERT_EVENT = (
    f"INSERT INTO {EVENTS} (key, kind, run_id, fence, at, detail, prev_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_LAST_EVENT = f"SELECT last_event FROM {ENTRIES} WHERE key = ?"
_SET_LAST_EVENT = f"UPDATE {ENTRIES} SET last_event = ? WHERE key = ?"
_HEAD = f"SELECT id FROM {HEADS} WHERE key = ?"
_SET_HEAD = f"INSERT OR REPLACE INTO {HEADS} (id, key) VALUES (?, ?)"
"""The key's chain head moves to its newest event (REPLACE drops the old row of the key)."""
_KEEP_HEAD = (
    f"INSERT OR REPLACE INTO {HEADS} (id, key) "
    f"SELECT last_event, key FROM {ENTRIES} WHERE key = ? AND last_event IS NOT NULL"
)
"""Before an entry is deleted: its key's events stay (one retention period), so their chain
head moves to `HEADS`, where the key's next event or entry picks it up."""

T = TypeVar("T")


def _ts(value: datetime | None) -> str | None:
    """Fixed-width UTC text, so string order is time order in SQL."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 -- 2x faster than strftime
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def _dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return parsed


_VALUE_FIELDS = ENTRY_COLUMNS[1:]
_TIME_FIELDS = frozenset(
    ("claimed_at", "heartbeat_at", "lease_expires_at", "finalized_at", "expires_at")
)


def _column(name: str, value: Any) -> Any:
    """One entry field as stored in its column."""
    if value is None:
        return None
    if name in _TIME_FIELDS:
        return _ts(value)
    if name == "state":
        return value.value
    if name == "result":
        return encode_result(value)
    return value


def _row(entry: Entry) -> tuple[Any, ...]:
    """All columns of an entry, in `ENTRY_COLUMNS` order."""
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
        None if entry.result is None else encode_result(entry.result),
        entry.prior_run_id,
        entry.generation,
        entry.holder_process,
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    try:
        return _decode_entry(row)
    except (ValueError, TypeError, RecursionError) as exc:  # pydantic's errors are ValueErrors
        raise corrupt_row(ENTRIES, row[0] if row else None, exc) from None


def _event(row: tuple[Any, ...]) -> Event:
    return decode_event(row, _dt)


def _decode_entry(row: tuple[Any, ...]) -> Entry:
    (
        key,
        state,
        run_id,
        fence,
        pipeline,
        fingerprint,
        claimed_at,
        heartbeat_at,
        lease_expires_at,
        finalized_at,
        expires_at,
        dedup_on,
        result,
        prior_run_id,
        generation,
        holder_process,
    ) = row
    return Entry(
        key=key,
        state=state,
        run_id=run_id,
        fence=fence,
        pipeline=pipeline,
        fingerprint=fingerprint,
        claimed_at=_dt(claimed_at),
        heartbeat_at=_dt(heartbeat_at),
        lease_expires_at=_dt(lease_expires_at),
        finalized_at=_dt(finalized_at),
        expires_at=_dt(expires_at),
        dedup_on=dedup_on,
        result=decode_result(result),
        prior_run_id=prior_run_id,
        generation=fence if generation is None else generation,
        holder_process=holder_process,
    ).checked()


class _SQLiteTransaction:
    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.now_text = _ts(now)
        self._stored: dict[str, Entry] = {}
        """The rows as loaded or written in this transaction, so `update` writes only changes."""
        self._fence = 0
        """The last fence handed out in this transaction."""
        self._last_event_id = 0

    def load(self, key: str) -> Entry | None:
        row = self.conn.execute(f"{_SELECT_ENTRY} WHERE key = ?", (key,)).fetchone()
        if row is None:
            self._stored.pop(key, None)
            return None
        entry = self._stored[key] = _entry(row)
        return entry

    def insert(self, entry: Entry) -> bool:
        head = self._head(entry.key)
        # BEGIN IMMEDIATE already excludes every other writer, so a conflict means a caller bug
        if self.conn.execute(_INSERT_ENTRY, (*_row(entry), head)).rowcount != 1:
            return False
        if head is not None:  # the entry carries the key's chain from here on
            self.conn.execute(f"DELETE FROM {HEADS} WHERE key = ?", (entry.key,))
        self._stored[entry.key] = entry
        return True

    def update(self, entry: Entry) -> None:
        """SET only the columns that changed: fewer bytes, and untouched indexes stay clean."""
        before = self._stored.get(entry.key)
        names, params = [], []
        for name in _VALUE_FIELDS:
            value = getattr(entry, name)
            if before is None or value != getattr(before, name):
                names.append(name)
                params.append(_column(name, value))
        if names:
            self.conn.execute(_update_sql(tuple(names)), (*params, entry.key))
        self._stored[entry.key] = entry

    def delete(self, key: str) -> None:
        self.conn.execute(_KEEP_HEAD, (key,))
        self.conn.execute(f"DELETE FROM {ENTRIES} WHERE key = ?", (key,))
        self._stored.pop(key, None)

    def _head(self, key: str) -> int | None:
        """The newest event of a key with no entry (None: it has none left)."""
        row = self.conn.execute(_HEAD, (key,)).fetchone()
        return None if row is None else row[0]

    def next_fence(self) -> int:
        """Fences are event ids: the claim's own event, logged next, takes exactly this id.

        The event log is append-only and its ids are never reused (`sweep` records the
        highest id in META before trimming), so the log itself is the fence counter and
        a claim writes no counter page of its own (a page less to fsync per claim).
        """
        (top,) = self.conn.execute(_FENCE_TOP).fetchone()
        self._fence = max(_fence_top(top), self._fence) + 1
        return self._fence

    def log(
        self, kind: EventKind, key: str, run_id: str | None, fence: int | None, detail: str | None
    ) -> None:
        """Append the event to the key's chain: after the entry's last event (the entry page is
        written in this transaction anyway), or after its head in `HEADS` if it has no entry."""
        conn = self.conn
        row = conn.execute(_LAST_EVENT, (key,)).fetchone()
        prev = self._head(key) if row is None else row[0]
        cursor = conn.execute(
            _INSERT_EVENT, (key, kind.value, run_id, fence, self.now_text, detail, prev)
        )
        self._last_event_id = cursor.lastrowid or 0
        conn.execute(_SET_HEAD if row is None else _SET_LAST_EVENT, (self._last_event_id, key))

    def log_claim(self, fence: int, kind: EventKind, key: str, run_id: str, detail: str) -> None:
        """Log the event of a claim the fast path made: its id is the fence (see `next_fence`),
        already written as the new entry's last event; it follows the key's head, if any."""
        head = self._head(key)
        self.conn.execute(
            _INSERT_EVENT_AS, (fence, key, kind.value, run_id, fence, self.now_text, detail, head)
        )
        if head is not None:
            self.conn.execute(f"DELETE FROM {HEADS} WHERE key = ?", (key,))

    def seal(self) -> None:
        """Before commit: a fence handed out with no event after it still must never recur."""
        if self._fence > self._last_event_id:
            self.conn.execute(_RAISE_FENCE_FLOOR, (self._fence,))


def _fence_top(value: object) -> int:
    """The fence high-water mark as read; damage there could hand out a fence twice."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise corrupt_row(META, "last_fence", ValueError(f"fence floor is {value!r}"))
    return value


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _WriteTransaction:
    """`BEGIN IMMEDIATE` … `COMMIT` under the ledger's thread lock; rolled back if the block raises.

    A plain class rather than @contextmanager: it runs twice per claim/finalize cycle.
    """

    __slots__ = ("conn", "ledger", "tx")

    def __init__(self, ledger: SQLiteLedger) -> None:
        self.ledger = ledger

    def __enter__(self) -> _SQLiteTransaction:
        ledger = self.ledger
        if not _FORK_GATE.is_set():
            _FORK_GATE.wait(FORK_WAIT_SECONDS)  # let a pending fork take the lock first
        ledger._lock.acquire()
        try:
            conn = self.conn = ledger._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise ledger._translate(exc) from exc
            try:
                # under the write lock: the path still names the file this connection writes
                ledger._check_file(writing=True)
                self.tx = _SQLiteTransaction(conn, ledger._now(_utcnow))
                return self.tx
            except BaseException:
                _rollback(conn)
                raise
        except BaseException:
            ledger._lock.release()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        ledger, conn = self.ledger, self.conn
        try:
            if exc is None:
                try:
                    self.tx.seal()
                    conn.execute("COMMIT")
                except sqlite3.Error as error:
                    _rollback(conn)  # never leave the connection inside a failed transaction
                    raise ledger._translate(error) from error
                return
            _rollback(conn)
            if isinstance(exc, sqlite3.Error | UnicodeDecodeError):
                raise ledger._translate(exc) from exc
        finally:
            ledger._lock.release()


def _rollback(conn: sqlite3.Connection) -> None:
    with suppress(sqlite3.Error):  # the original error is the one worth reporting
        if conn.in_transaction:
            conn.execute("ROLLBACK")


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
        try:
            parent_is_dir, is_dir = self.path.parent.is_dir(), self.path.is_dir()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise LedgerConfigError(f"url: {self.path} cannot be a ledger file: {exc}") from None
        if not parent_is_dir:
            raise LedgerConfigError(
                f"url: directory {self.path.parent} does not exist; create it first or point the "
                "ledger url at a file in an existing directory"
            )
        if is_dir:
            raise LedgerConfigError(f"url: {self.path} is a directory; give a file path")
        self._busy_timeout = busy_timeout_seconds
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        """(st_dev, st_ino) of the file the connection has open; set once it is a ledger."""
        self._gone: str | None = None
        """Why every call fails: the file was deleted or replaced under this handle."""
        with self._lock:
            self._connection()
        _OPEN_LEDGERS.add(self)

    # --- connection -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (a forked child drops its parent's: see `_after_fork`)."""
        conn = self._conn
        if conn is None:
            if self._gone is not None:
                raise LedgerUnavailableError(self._gone)
            conn = self._conn = self._guard(self._connect)
            _OPEN_LEDGERS.add(self)  # again after close(): forks must see it
        return conn

    def _after_fork_in_child(self) -> None:
        # The parent's connection is not ours: never use it, and never close it here (closing
        # would checkpoint and unlock on the parent's behalf), so keep it referenced forever.
        if self._conn is not None:
            _ORPHANED_CONNECTIONS.append(self._conn)
        self._conn = None
        self._lock = threading.RLock()

    def _connect(self) -> sqlite3.Connection:
        """Open the file, but only write to it once it is known to be a ledger (or empty)."""
        must_exist = self._identity is not None
        self._inspect(must_exist=must_exist)
        conn = sqlite3.connect(
            f"file:{quote(str(self.path))}?mode={'rw' if must_exist else 'rwc'}",
            uri=True,
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
            # A claim+finalize cycle appends ~7 pages to the WAL: checkpoint (random writes into
            # the file and two more fsyncs) every ~16 MB of WAL rather than SQLite's 4 MB.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            self._ensure_schema(conn)
            opened = os.stat(self.path)
            self._identity = (opened.st_dev, opened.st_ino)
        except BaseException:
            conn.close()
            raise
        return conn

    def _inspect(self, *, must_exist: bool) -> None:
        """Refuse a file that is not a ledger without writing a byte to it (or beside it).

        Runs before the read-write connection, whose `journal_mode = WAL` would rewrite the
        header of another application's database (and SQLite treats a file shorter than a
        page as empty, so it would overwrite a 1-byte file). `immutable=1` reads the file with
        no locks and no -wal/-shm files.
        """
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            if must_exist:
                raise LedgerUnavailableError(
                    f"ledger file {self.path} was deleted while in use; no work was done. "
                    "Restore it from a backup (a new, empty ledger would run every key again)"
                ) from None
            return
        except OSError as exc:
            raise LedgerUnavailableError(f"ledger file {self.path} cannot be used: {exc}") from None
        if size == 0:
            return  # a new ledger (created, or touched beforehand)
        try:
            with open(self.path, "rb") as file:
                magic = file.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise LedgerUnavailableError(f"ledger file {self.path} cannot be read: {exc}") from None
        if magic != SQLITE_MAGIC:
            raise LedgerConfigError(
                f"url: {self.path} is not a SQLite database; point the ledger url at a ledger "
                "file or at a path that does not exist yet"
            )
        look = sqlite3.connect(
            f"file:{quote(str(self.path))}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        try:
            version = self._guard(lambda: self._schema_version(look))
            if version is None:
                self._guard(lambda: self._refuse_foreign_tables(look))
            else:
                self._check_version(version)
        finally:
            look.close()

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = self._schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        self._check_version(version)
        self._check_writable()
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version(conn)
            if version is None:
                self._refuse_foreign_tables(conn)
                _create_schema(conn)
            elif version < SCHEMA_VERSION:
                _migrate(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _refuse_foreign_tables(self, conn: sqlite3.Connection) -> None:
        """Never add ledger tables to another application's database (e.g. Dagster's): one
        with any table, view or trigger, or an application id / user version of its own."""
        objects = [
            f"{kind} {name}" if kind != "table" else name
            for (kind, name) in conn.execute(
                "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                "ORDER BY type = 'table' DESC, name"
            )
        ]
        for pragma in ("application_id", "user_version"):
            (value,) = conn.execute(f"PRAGMA {pragma}").fetchone()
            if value:
                objects.append(f"{pragma} {value}")
        if objects:
            shown = ", ".join(objects[:5]) + (", …" if len(objects) > 5 else "")
            raise LedgerSchemaError(
                f"{self.path} is a SQLite database of something else (tables: {shown}), not a "
                "ledger: point the ledger url at a file of its own"
            )

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (META,)
        ).fetchone()
        if not exists:
            return None
        row = conn.execute(f"SELECT value FROM {META} WHERE name = 'schema_version'").fetchone()
        if row is None or isinstance(row[0], bool) or not isinstance(row[0], int):
            raise LedgerSchemaError(
                f"{self.path}: table {META} has no valid schema_version row (found "
                f"{None if row is None else row[0]!r}); it was not written by rocky_dagster"
            )
        return row[0]

    def _check_version(self, version: int | None) -> None:
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"{self.path} holds ledger schema version {version}, but this rocky_dagster "
                f"understands up to {SCHEMA_VERSION}: upgrade rocky_dagster to use this ledger"
            )

    def _check_writable(self) -> None:
        """Refuse a file marked read-only even where the OS would let us write (root)."""
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return
        self._refuse_read_only(mode)

    def _refuse_read_only(self, mode: int) -> None:
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise LedgerUnavailableError(
                f"ledger file {self.path} is read-only (mode {stat.filemode(mode)}): make it "
                "writable (chmod u+w) or point the ledger url at a writable file; no work was done"
            )

    def _check_file(self, *, writing: bool) -> None:
        """The path still names the file our connection has open, else the call fails.

        A ledger file deleted or replaced under a running process would otherwise take its
        writes into an unlinked inode and report success. One stat per call (a claim fsyncs;
        a stat is microseconds). The failure is final for this handle: the -wal file beside
        the path still holds the old file's pages, which SQLite would lay over the new file,
        so only a deliberate reopen (a new process, or `open_ledger` again) uses the path.
        """
        if self._gone is not None:
            raise LedgerUnavailableError(self._gone)
        try:
            now = os.stat(self.path)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # e.g. the directory lost its x bit
                raise LedgerUnavailableError(
                    f"ledger file {self.path} cannot be checked ({exc}); no work was done"
                ) from None
            self._gone = (
                f"ledger file {self.path} was deleted while in use; no work was done. Restore "
                "it from a backup (a new, empty ledger would run every key again)"
            )
        else:
            if (now.st_dev, now.st_ino) != self._identity:
                self._gone = (
                    f"ledger file {self.path} was replaced by another file while in use; no "
                    "work was done. Stop every process using it, then open the ledger again"
                )
            elif writing:
                self._refuse_read_only(now.st_mode)
                return
            else:
                return
        self._drop_connection()
        raise LedgerUnavailableError(self._gone)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _rollback(conn)
            with suppress(sqlite3.Error):
                conn.close()

    def _guard(self, fn: Callable[[], T]) -> T:
        """Run `fn`, turning sqlite3 errors into ledger errors that say what to do."""
        try:
            return fn()
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error | UnicodeDecodeError) -> Exception:
        text = str(exc)
        if isinstance(exc, UnicodeDecodeError):  # the module decodes TEXT as it reads a row
            return LedgerCorruptError(
                f"ledger file {self.path} holds text that is not UTF-8 ({text}); it is damaged "
                "and no work was done. See `rocky-dagster ledger check` and restore the ledger "
                "from a backup"
            )
        name = getattr(exc, "sqlite_errorname", "")
        if self._identity is not None and (
            name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or "malformed" in text
            or "file is not a database" in text
        ):
            return LedgerCorruptError(
                f"ledger file {self.path} is damaged ({text}); no work was done. See "
                "`rocky-dagster ledger check` and restore the ledger from a backup"
            )
        if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
            return LedgerCorruptError(
                f"{self.path} is a damaged SQLite database ({text}); restore it from a backup "
                "or point the ledger url elsewhere"
            )
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

    def transaction(self) -> _WriteTransaction:
        return _WriteTransaction(self)

    def now(self) -> datetime:
        return self._now(_utcnow)

    # --- the one-statement primitives (see `Ledger`): the hot path's two writes -------------

    def _insert_new(self, new: NewClaim) -> tuple[int, datetime] | None:
        """One insert-if-absent, its fence computed in place (see `next_fence`)."""
        if not FAST_PATH:
            return None
        with self.transaction() as tx:
            lease_expires_at = tx.now + new.lease
            row = tx.conn.execute(
                _FAST_CLAIM,
                (
                    new.key,
                    new.run_id,
                    new.pipeline,
                    new.fingerprint,
                    tx.now_text,
                    _ts(lease_expires_at),
                    new.dedup_on,
                    new.holder_process,
                ),
            ).fetchone()
            if row is None:
                return None
            (fence,) = row
            tx.log_claim(fence, new.event, new.key, new.run_id, new.detail)
        return fence, lease_expires_at

    def _finalize_live(
        self, key: str, fence: int, outcome: Outcome, encoded: str | None, detail: str | None
    ) -> tuple[str, datetime] | None:
        """One compare-and-set UPDATE of the live claim `fence`."""
        if not FAST_PATH:
            return None
        with self.transaction() as tx:
            expires_at = tx.now + self.config.retention
            row = tx.conn.execute(
                _FAST_FINALIZE, (outcome.value, tx.now_text, _ts(expires_at), encoded, key, fence)
            ).fetchone()
            if row is None:
                return None
            (holder,) = row
            tx.log(EventKind(outcome.value), key, holder, fence, detail)
        return holder, expires_at

    _reads = _QUERIES
    _decode_entry = staticmethod(_entry)
    _decode_event = staticmethod(_event)

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not _FORK_GATE.is_set():
            _FORK_GATE.wait(FORK_WAIT_SECONDS)
        with self._lock:
            conn = self._connection()
            self._check_file(writing=False)
            return self._guard(lambda: conn.execute(sql, params).fetchall())

    def check(self) -> list[str]:
        """`PRAGMA integrity_check`, then every entry and event decoded as a call would."""
        problems: list[str] = []
        try:
            problems += [
                f"integrity_check: {message}"
                for (message,) in self._read("PRAGMA integrity_check")
                if message != "ok"
            ]
            problems += row_problems(self._read(_SELECT_ENTRY), _entry)
            problems += row_problems(
                self._read(f"SELECT id, key, kind, run_id, fence, at, detail FROM {EVENTS}"),
                _event,
            )
        except LedgerUnavailableError as exc:
            problems.append(str(exc))
        return problems

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
        ((fence,),) = self._read(_FENCE_TOP)
        return Stats(
            entries=counts[0],
            in_flight=counts[1],
            succeeded=counts[2],
            failed=counts[3],
            expired=counts[4],
            stale_in_flight=counts[5],
            events=events,
            last_fence=_fence_top(fence),
        )

    def _sweep(self, now: datetime, abandoned_before: datetime) -> int:
        with self.transaction() as tx:
            conn = tx.conn
            doomed = conn.execute(_SWEEP_DOOMED, (_ts(now), _ts(abandoned_before))).fetchall()
            conn.executemany(f"DELETE FROM {ENTRIES} WHERE key = ?", [(d[0],) for d in doomed])
            for key, run_id, fence, state, last_event in doomed:
                # the key's events outlive its entry: the swept event heads their chain now
                swept = conn.execute(
                    _INSERT_EVENT,
                    (key, EventKind.SWEPT.value, run_id, fence, _ts(now), f"{state} entry expired",
                     last_event),
                ).lastrowid  # fmt: skip
                conn.execute(_SET_HEAD, (swept, key))
            # the event log keeps one retention period of history, like the entries it explains;
            # events are appended in time order, so the old ones are a prefix in id order
            # (found by walking it: costs what it deletes, and no index on `at` to maintain).
            # Event ids are the fence counter: keep their high-water mark before trimming.
            conn.execute(_RAISE_FENCE_FLOOR, (_fence_top(conn.execute(_FENCE_TOP).fetchone()[0]),))
            young = conn.execute(
                f"SELECT id FROM {EVENTS} WHERE at >= ? ORDER BY id LIMIT 1",
                (_ts(abandoned_before),),
            ).fetchone()
            if young is None:
                conn.execute(f"DELETE FROM {EVENTS} WHERE at < ?", (_ts(abandoned_before),))
                conn.execute(f"DELETE FROM {HEADS}")  # no event is left to head a chain
            else:
                conn.execute(f"DELETE FROM {EVENTS} WHERE id < ?", young)
                # heads of fully trimmed chains, found by id like the events (`HEADS` is keyed
                # by it): a key's chain that loses only its older events just ends earlier
                conn.execute(f"DELETE FROM {HEADS} WHERE id < ?", young)
            return len(doomed)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            _OPEN_LEDGERS.discard(self)


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {ENTRIES} (
    key TEXT NOT NULL PRIMARY KEY,
    state TEXT NOT NULL,
    run_id TEXT NOT NULL,
    fence INTEGER NOT NULL,
    pipeline TEXT,
    fingerprint TEXT,
    claimed_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    lease_expires_at TEXT NOT NULL,
    finalized_at TEXT,
    expires_at TEXT,
    dedup_on TEXT NOT NULL,
    result TEXT,
    prior_run_id TEXT,
    generation INTEGER,
    holder_process TEXT,
    last_event INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {EVENTS} (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    run_id TEXT,
    fence INTEGER,
    at TEXT NOT NULL,
    detail TEXT,
    prev_id INTEGER
);
CREATE TABLE IF NOT EXISTS {META} (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {HEADS} (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS {ENTRIES}_due ON {ENTRIES} ({HOLDER}, {DUE_SECOND});
INSERT OR REPLACE INTO {META} (name, value) VALUES ('schema_version', {SCHEMA_VERSION});
INSERT OR REPLACE INTO {META} (name, value) VALUES ('last_fence', 0);
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    """Few indexes, because each one is a page every claim or finalize writes and fsyncs.

    Entries are keyed by their text key (WITHOUT ROWID: one B-tree, not a table plus an
    index): claim, finalize and heartbeat go by key. One index, `due`, on (`HOLDER`,
    `DUE_SECOND`) serves both the run-status reconcilers (in-flight rows by run) and sweep
    (terminal rows by expiry; costs what it deletes). Its NULL-holder group (terminal rows)
    ends with the newest expiries, right before the few in-flight rows, so the finalize
    that moves a row from one group to the other dirties one index page, not two (schema
    version 1 had two partial indexes). A heartbeat touches no index. Up to version 4 its
    second column was `expires_at` itself: 27 bytes of text where the second takes 4.

    The event log has no index but its id (time order: fences, and sweep's trim of a
    prefix). A key's history is a chain instead: each event's `prev_id` is the key's event
    before it, and the newest is the entry's `last_event` (a column of the row the same
    transaction writes anyway, so no extra page) or, for a key with no entry (swept, reset),
    its row in `HEADS`, which a later claim of the key takes back. Up to version 4 a
    `(key, id)` index served history: two pages more per claim+finalize.
    """
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _due_index(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: the `due` index replaces version 1's two partial indexes; version 4 -> 5:
    its second column is `DUE_SECOND` (an expression) instead of `expires_at`."""
    conn.execute(f"DROP INDEX IF EXISTS {ENTRIES}_expiry")
    conn.execute(f"DROP INDEX IF EXISTS {ENTRIES}_in_flight")
    columns = conn.execute(f"PRAGMA index_info({ENTRIES}_due)").fetchall()
    if [cid for (_, cid, _) in columns] != [-2, -2]:  # both columns expressions
        conn.execute(f"DROP INDEX IF EXISTS {ENTRIES}_due")
        conn.execute(f"CREATE INDEX {ENTRIES}_due ON {ENTRIES} ({HOLDER}, {DUE_SECOND})")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a ledger file written by an older rocky_dagster up to `SCHEMA_VERSION`, in the
    caller's write transaction (all or nothing). Every row and event is kept; up to version 4
    no data was rewritten (a new column reads NULL), version 5 writes each event's link once.

    Two pre-release layouts both called themselves version 2: one had the `due` index, the
    other the `generation` column on version 1's indexes. So each step is skipped where its
    result is already there, and every file below the current version runs all of them.
    """
    _due_index(conn)
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({ENTRIES})")}
    if "generation" not in columns:  # version 2 -> 3
        conn.execute(f"ALTER TABLE {ENTRIES} ADD COLUMN generation INTEGER")
    if "holder_process" not in columns:  # version 3 -> 4
        conn.execute(f"ALTER TABLE {ENTRIES} ADD COLUMN holder_process TEXT")
    if "last_event" not in columns:  # version 4 -> 5
        _chain_events(conn)
    conn.execute(f"UPDATE {META} SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION,))


def _chain_events(conn: sqlite3.Connection) -> None:
    """Version 4 -> 5: link every key's events as the `(key, id)` index orders them (the
    history a version-4 file shows), give each entry its newest event and each key without
    an entry a head, then drop the index. One statement each, through that index."""
    conn.execute(f"ALTER TABLE {ENTRIES} ADD COLUMN last_event INTEGER")
    conn.execute(f"ALTER TABLE {EVENTS} ADD COLUMN prev_id INTEGER")
    conn.execute(f"CREATE TABLE {HEADS} (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE)")
    conn.execute(f"CREATE INDEX IF NOT EXISTS {EVENTS}_key_id ON {EVENTS} (key, id)")
    conn.execute(
        f"UPDATE {EVENTS} SET prev_id = (SELECT max(p.id) FROM {EVENTS} AS p "
        f"WHERE p.key = {EVENTS}.key AND p.id < {EVENTS}.id)"
    )
    conn.execute(
        f"UPDATE {ENTRIES} SET last_event = (SELECT max(e.id) FROM {EVENTS} AS e "
        f"WHERE e.key = {ENTRIES}.key)"
    )
    conn.execute(
        f"INSERT INTO {HEADS} (id, key) SELECT max(id), key FROM {EVENTS} AS e "
        f"WHERE NOT EXISTS (SELECT 1 FROM {ENTRIES} WHERE key = e.key) GROUP BY key"
    )
    conn.execute(f"DROP INDEX {EVENTS}_key_id")


_OPEN_LEDGERS: weakref.WeakSet[SQLiteLedger] = weakref.WeakSet()
_ORPHANED_CONNECTIONS: list[sqlite3.Connection] = []
"""Connections inherited through fork: the parent's, so the child never closes them."""
_HELD_FOR_FORK: list[SQLiteLedger] = []
FORK_WAIT_SECONDS = BUSY_TIMEOUT_SECONDS + 5
"""How long a fork waits for another thread's ledger call to end (each call is bounded by
the busy timeout); past that it forks anyway."""


_FORK_GATE = threading.Event()
"""Cleared while a fork waits for the ledgers' locks: new calls wait, so a thread looping
ledger calls cannot starve the fork (locks are not fair)."""
_FORK_GATE.set()


def _before_fork() -> None:
    """Let no other thread be inside a ledger call while the process forks.

    SQLite keeps per-process lock state for each open file. A child forked while another
    thread was inside a transaction inherits "this process holds the write lock" with no
    thread left to release it, so its own connection would wait out the busy timeout and
    fail. Holding every ledger's lock across `fork()` makes the child start clean.
    """
    ledgers = list(_OPEN_LEDGERS)
    if not ledgers:
        return
    _FORK_GATE.clear()
    for ledger in ledgers:
        if ledger._lock.acquire(timeout=FORK_WAIT_SECONDS):
            _HELD_FOR_FORK.append(ledger)


def _after_fork_in_parent() -> None:
    while _HELD_FOR_FORK:
        _HELD_FOR_FORK.pop()._lock.release()
    _FORK_GATE.set()


def _after_fork_in_child() -> None:
    global _FORK_GATE
    # fresh objects: another thread of the parent may have been inside the old ones
    _FORK_GATE = threading.Event()
    _FORK_GATE.set()
    _HELD_FOR_FORK.clear()
    for ledger in list(_OPEN_LEDGERS):
        ledger._after_fork_in_child()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
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
