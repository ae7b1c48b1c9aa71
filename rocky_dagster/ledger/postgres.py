"""PostgreSQL backend: one ledger shared by every host of a deployment (extra `postgres`).

The generic path (`Ledger` over `transaction()`) locks the key's row with `SELECT … FOR UPDATE`
and decides in Python (machine.decide), so both backends share one decision table. A round
trip is what a call costs here, so the three writes on every run's hot path are offered as
`Ledger`'s one-statement primitives: `_insert_new` (a claim of a key with no row, with its
event, in one CTE), `_finalize_live` (compare-and-set `UPDATE … WHERE fence = … AND state =
'in_flight'`) and `_extend_lease` (a heartbeat). Anything else (a row exists, a stale fence)
takes the generic path, which re-decides under the row lock, so a primitive can only ever
agree with the decision table (tests/ledger/test_ledger_differential.py holds them to it).

Time is the database's clock (so worker clock skew cannot expire or extend a lease) unless a
clock was injected. Fences come from a sequence: strictly increasing, never reused, but with
gaps (a rolled-back claim burns its number).

Connections: a small psycopg-pool per process (recreated after fork; the parent's is never
touched). A connection lost before COMMIT is retried once on a fresh connection. When the
outcome of a commit is unknown the backend learns it (`pg_xact_status` of the transaction, or
a token written with the row) before deciding to retry; if it cannot, the caller gets
`LedgerUnavailableError` and does no work.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from .backend import (
    Clock,
    Ledger,
    NewClaim,
    redact_url,
    row_problems,
    validate_finalize,
)
from .config import LedgerConfig
from .errors import (
    InvalidArgumentError,
    LedgerConfigError,
    LedgerSchemaError,
    LedgerUnavailableError,
)
from .model import (
    ENTRY_COLUMNS,
    TIME_COLUMNS,
    Entry,
    Event,
    EventKind,
    FinalizeReason,
    FinalizeResult,
    Outcome,
    State,
    Stats,
    corrupt_row,
    decode_result,
    encode_result,
)
from .queries import Dialect, ReadQueries, decode_event

SCHEMA_VERSION = 4
"""1: the first release. 2: one partial index on in-flight rows instead of three (fewer index
entries per claim+finalize). 3: `generation` column on entries (NULL reads as the entry's
fence). 4: `holder_process` column on entries (NULL: written before v4, holder unknown). A schema of either pre-release layout that called itself 2 is brought to 3 as well:
see `_Sql.migrations`."""
DEFAULT_SCHEMA = "rocky_ledger"
ENTRIES = "rocky_ledger_entries"
EVENTS = "rocky_ledger_events"
META = "rocky_ledger_meta"
FENCES = "rocky_ledger_fence_seq"

CONNECT_TIMEOUT_SECONDS = 10
POOL_TIMEOUT_SECONDS = 5.0
"""How long a call waits for a pooled connection before it connects directly."""
POOL_MAX_SIZE = 4
LOCK_TIMEOUT_SECONDS = 30
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = 60
"""The server ends a transaction whose client vanished after this long, so an unknown
commit outcome always settles (see `_settle`)."""

_IDENTITY = "SELECT current_database(), pg_postmaster_start_time(), to_regclass(%s)::oid::bigint"
"""What tells one database (and one ledger's tables in it) from another, seen from a session."""
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MICROSECOND = timedelta(microseconds=1)


T = TypeVar("T")

_LIVE: weakref.WeakSet[PostgresLedger] = weakref.WeakSet()
_ORPHANED_POOLS: list[ConnectionPool] = []
"""Pools inherited through fork. Kept referenced so their finalizers never run in the child:
the connections belong to the parent and must not be closed (or used) here."""


def _after_fork_in_child() -> None:
    for ledger in list(_LIVE):
        ledger._forget_pool_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Retry(LedgerUnavailableError):
    """Nothing was committed and the connection was lost: the call may be made again."""


# --- SQL ------------------------------------------------------------------------------------------


class _Sql:
    """Every statement, with the schema quoted in once."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.schema = s
        self.entries = f"{s}.{ENTRIES}"
        self.events = f"{s}.{EVENTS}"
        self.meta = f"{s}.{META}"
        self.fences = f"{s}.{FENCES}"
        cols = ", ".join(ENTRY_COLUMNS)
        placeholders = ", ".join(f"%({c})s" for c in ENTRY_COLUMNS)
        self.reads = ReadQueries(Dialect("%s", binary=' COLLATE "C"'), self.entries, self.events)
        self.select = self.reads.select_entry
        # The clock is read in the outer query, after the lateral subquery took the row lock,
        # so a claim that waited for the lock decides with the time it got it.
        self.load = (
            f"SELECT clock_timestamp(), pg_current_xact_id()::text, e.* FROM (SELECT) AS one "
            f"LEFT JOIN LATERAL ({self.select} WHERE key = %s FOR UPDATE) AS e ON true"
        )
        self.insert = (
            f"INSERT INTO {self.entries} ({cols}) VALUES ({placeholders}) "
            "ON CONFLICT (key) DO NOTHING RETURNING 1"
        )
        self.update = (
            f"UPDATE {self.entries} SET "
            + ", ".join(f"{c} = %({c})s" for c in ENTRY_COLUMNS[1:])
            + ", write_token = NULL WHERE key = %(key)s"
        )
        self.delete = f"DELETE FROM {self.entries} WHERE key = %s"
        self.next_fence = f"SELECT nextval('{self.fences}')"
        self.log = (
            f"INSERT INTO {self.events} (key, kind, run_id, fence, at, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        )
        # One statement = one round trip = one implicit transaction (autocommit).
        self.fast_claim = f"""
            WITH t AS (SELECT coalesce(%(now)s::timestamptz, statement_timestamp()) AS now),
            ins AS (
                INSERT INTO {self.entries} (key, state, run_id, fence, pipeline, fingerprint,
                    claimed_at, heartbeat_at, lease_expires_at, dedup_on, write_token,
                    holder_process)
                SELECT %(key)s, 'in_flight', %(run_id)s, nextval('{self.fences}'), %(pipeline)s,
                    %(fingerprint)s, t.now, t.now, t.now + %(lease_us)s * interval '1 microsecond',
                    %(dedup_on)s, %(token)s, %(holder)s
                FROM t
                WHERE NOT EXISTS (SELECT 1 FROM {self.entries} WHERE key = %(key)s)
                ON CONFLICT (key) DO NOTHING
                RETURNING key, run_id, fence, claimed_at, lease_expires_at
            ),
            ev AS (
                INSERT INTO {self.events} (key, kind, run_id, fence, at, detail)
                SELECT key, %(kind)s, run_id, fence, claimed_at, %(detail)s FROM ins
            )
            SELECT fence, lease_expires_at FROM ins"""
        self.fast_finalize = f"""
            WITH t AS (SELECT coalesce(%(now)s::timestamptz, statement_timestamp()) AS now),
            upd AS (
                UPDATE {self.entries} AS e
                SET state = %(state)s, finalized_at = t.now,
                    expires_at = t.now + %(retention_us)s * interval '1 microsecond',
                    result = %(result)s, write_token = %(token)s
                FROM t
                WHERE e.key = %(key)s AND e.fence = %(fence)s AND e.state = 'in_flight'
                RETURNING e.key, e.run_id, e.fence, e.state, e.expires_at, t.now AS at
            ),
            ev AS (
                INSERT INTO {self.events} (key, kind, run_id, fence, at, detail)
                SELECT key, state, run_id, fence, at, %(detail)s FROM upd
            )
            SELECT run_id, expires_at FROM upd"""
        # backend.renew_lease in one statement (SET reads the row's old values)
        self.heartbeat = f"""
            UPDATE {self.entries}
            SET claimed_at = least(claimed_at, t.now), heartbeat_at = t.now,
                lease_expires_at = least(t.now + %(lease_us)s * interval '1 microsecond',
                    least(claimed_at, t.now) + %(ttl_us)s * interval '1 microsecond')
            FROM (SELECT coalesce(%(now)s::timestamptz, statement_timestamp()) AS now) AS t
            WHERE key = %(key)s AND fence = %(fence)s AND state = 'in_flight'
                AND t.now < least(claimed_at, t.now) + %(ttl_us)s * interval '1 microsecond'
            RETURNING 1"""
        self.written_by = (
            f"SELECT state, run_id, fence, expires_at, lease_expires_at FROM {self.entries} "
            "WHERE key = %s AND write_token = %s FOR UPDATE"
        )
        self.sweep = f"""
            WITH done AS (
                DELETE FROM {self.entries}
                WHERE state <> 'in_flight' AND expires_at <= %(now)s
                RETURNING key, run_id, fence, state
            ),
            abandoned AS (
                DELETE FROM {self.entries}
                WHERE state = 'in_flight' AND lease_expires_at <= %(before)s
                RETURNING key, run_id, fence, state
            ),
            gone AS (SELECT * FROM done UNION ALL SELECT * FROM abandoned),
            -- events are appended in time order, so the old ones are a prefix in id order:
            -- walking it from the first id costs what it deletes, with no index on `at`
            logged AS (
                INSERT INTO {self.events} (key, kind, run_id, fence, at, detail)
                SELECT key, 'swept', run_id, fence, %(now)s, state || ' entry expired' FROM gone
            ),
            pruned AS (
                DELETE FROM {self.events}
                WHERE at < %(before)s AND id < coalesce(
                    (SELECT id FROM {self.events} WHERE at >= %(before)s ORDER BY id LIMIT 1),
                    (SELECT max(id) + 1 FROM {self.events}))
            )
            SELECT count(*) FROM gone"""
        self.stats = f"""
            SELECT count(*),
                   count(*) FILTER (WHERE state = 'in_flight'),
                   count(*) FILTER (WHERE state = 'succeeded'),
                   count(*) FILTER (WHERE state = 'failed'),
                   count(*) FILTER (WHERE state <> 'in_flight' AND expires_at <= %(now)s),
                   count(*) FILTER (WHERE state = 'in_flight' AND lease_expires_at <= %(now)s),
                   (SELECT count(*) FROM {self.events}),
                   (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {self.fences})
            FROM {self.entries}"""

    def create_v1(self) -> list[str]:
        """Schema version 1. Claim and finalize go by primary key; the partial indexes serve
        sweep (costs what it deletes), run_id the reconcilers, (key, id) history."""
        return [
            f"CREATE SCHEMA IF NOT EXISTS {self.schema}",
            f"""CREATE TABLE {self.entries} (
                key text PRIMARY KEY,
                state text NOT NULL CHECK (state IN ('in_flight', 'succeeded', 'failed')),
                run_id text NOT NULL,
                fence bigint NOT NULL,
                pipeline text,
                fingerprint text,
                claimed_at timestamptz NOT NULL,
                heartbeat_at timestamptz NOT NULL,
                lease_expires_at timestamptz NOT NULL,
                finalized_at timestamptz,
                expires_at timestamptz,
                dedup_on text NOT NULL,
                result text,
                prior_run_id text,
                write_token text
            )""",
            f"""CREATE TABLE {self.events} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                key text NOT NULL,
                kind text NOT NULL,
                run_id text,
                fence bigint,
                at timestamptz NOT NULL,
                detail text
            )""",
            f"CREATE TABLE {self.meta} (name text PRIMARY KEY, value bigint NOT NULL)",
            f"CREATE SEQUENCE {self.fences} AS bigint MINVALUE 1 NO CYCLE",
            f"CREATE INDEX ON {self.entries} (expires_at) WHERE state <> 'in_flight'",
            f"CREATE INDEX ON {self.entries} (lease_expires_at) WHERE state = 'in_flight'",
            f"CREATE INDEX ON {self.entries} (run_id)",
            f"CREATE INDEX ON {self.events} (key, id)",
            f"CREATE INDEX ON {self.events} (at)",
            f"INSERT INTO {self.meta} (name, value) VALUES ('schema_version', 1)",
        ]

    def migrations(self) -> dict[int, list[str]]:
        """Statements taking the schema from a version (the key) to the next; new schemas are
        created as version 1 and migrated, so fresh and upgraded ledgers are the same.

        Version 2 writes fewer index entries per claim+finalize (each is WAL to flush): one
        partial index on in-flight rows (run_id, lease_expires_at) serves the reconcilers
        (by run) and sweep of abandoned claims, instead of a lease index plus a run_id index
        over every row; and sweep trims the event log as a prefix in id order (costs what it
        deletes), so events need no index on `at`. Version 3 adds the generation a claim
        continues (NULL: the entry's own fence, which is what every older row and every claim
        that begins a generation have). Version 4 records the process holding an in-flight
        claim (NULL on older rows: unknown, see `process.holder`).

        Two pre-release layouts both called themselves version 2 (one with step 1 done, the
        other with step 2 done on version 1's indexes), so every statement is a no-op where
        its result is already there and a schema below the current version runs all steps.
        """
        s = self.schema
        return {
            1: [
                f"DROP INDEX IF EXISTS {s}.rocky_ledger_entries_lease_expires_at_idx",
                f"DROP INDEX IF EXISTS {s}.rocky_ledger_entries_run_id_idx",
                f"DROP INDEX IF EXISTS {s}.rocky_ledger_events_at_idx",
                f"CREATE INDEX IF NOT EXISTS rocky_ledger_entries_in_flight ON {self.entries} "
                "(run_id, lease_expires_at) WHERE state = 'in_flight'",
            ],
            2: [f"ALTER TABLE {self.entries} ADD COLUMN IF NOT EXISTS generation bigint"],
            3: [f"ALTER TABLE {self.entries} ADD COLUMN IF NOT EXISTS holder_process text"],
        }


# --- URL --------------------------------------------------------------------------------------------


def parse_url(url: str) -> tuple[dict[str, Any], str]:
    """libpq connection parameters and the ledger schema from a `postgresql://` URL.

    `?schema=` is ours (default `rocky_ledger`); every other query parameter goes to libpq.
    `postgres://` and SQLAlchemy's `postgresql+driver://` spellings are accepted.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower().split("+")[0] not in ("postgresql", "postgres"):
        raise LedgerConfigError(
            f"url: {redact_url(url)!r} is not a postgresql:// URL; use "
            "postgresql://user:password@host:5432/dbname"
        )
    parts = urlsplit("postgresql://" + rest)
    schema = DEFAULT_SCHEMA
    query: list[str] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "schema":
            schema = value
        else:
            query.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    if not _SCHEMA_NAME.match(schema):
        raise LedgerConfigError(
            f"url: schema={schema!r} in {redact_url(url)!r} is not a plain PostgreSQL name; use "
            "1-63 lowercase letters, digits and underscores, not starting with a digit "
            f"(default {DEFAULT_SCHEMA!r})"
        )
    libpq_url = urlunsplit(parts._replace(query="&".join(query)))
    try:
        params = conninfo_to_dict(libpq_url)
        problem = None
    except psycopg.Error as exc:
        problem = str(exc)
    if problem is not None:
        # libpq may quote the offending part of the URL, which can be the password itself; so
        # the message is scrubbed, and raised outside the handler to carry no __context__
        text = _scrub(_scrub(problem, parts.password), unquote(parts.password or ""))
        raise LedgerConfigError(f"url: {redact_url(url)!r} is not a valid PostgreSQL URL: {text}")
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    params.setdefault("application_name", "rocky_dagster")
    return params, schema


def _scrub(text: str, password: str | None) -> str:
    """A message with the password gone, wherever it appears (not only inside a URL)."""
    text = redact_url(text)
    return text.replace(password, "***") if password else text


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _entry(row: tuple[Any, ...] | list[Any]) -> Entry:
    data = dict(zip(ENTRY_COLUMNS, row, strict=True))
    try:
        for name in TIME_COLUMNS:
            data[name] = _utc(data[name])
        data["result"] = decode_result(data["result"])
        if data["generation"] is None:
            data["generation"] = data["fence"]
        return Entry.model_validate(data).checked()
    except (ValueError, TypeError, RecursionError) as exc:  # pydantic's errors are ValueErrors
        raise corrupt_row(ENTRIES, data["key"], exc) from None


def _event(row: tuple[Any, ...]) -> Event:
    return decode_event(row, _utc)


def _entry_params(entry: Entry) -> dict[str, Any]:
    params = {c: getattr(entry, c) for c in ENTRY_COLUMNS}
    params["state"] = entry.state.value
    params["result"] = encode_result(entry.result)
    return params


def _micros(delta: timedelta) -> int:
    return delta // _MICROSECOND


def _lost(conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """Whether the error means the session is gone (as opposed to a statement that failed)."""
    return conn.broken or isinstance(
        exc,
        psycopg.errors.AdminShutdown
        | psycopg.errors.CrashShutdown
        | psycopg.errors.CannotConnectNow
        | psycopg.errors.IdleInTransactionSessionTimeout,
    )


# --- the transaction --------------------------------------------------------------------------------


class _PgTransaction:
    """One `BEGIN … COMMIT` on a pooled connection; `load` locks the key's row.

    Round trips are what a claim costs, so statements whose answer is not needed are held
    back and pipelined: BEGIN goes out with the first query, and the writes with COMMIT.
    """

    def __init__(self, sql: _Sql, conn: psycopg.Connection[Any], now: datetime | None) -> None:
        self._sql = sql
        self.conn = conn
        self._now = now
        self._injected = now is not None
        self.xid: int | None = None
        self.begun = False
        self._pending: list[tuple[str, Any]] = []

    def _ask(self, statement: str, params: Any = None) -> tuple[Any, ...] | None:
        """One row of `statement`, sent after BEGIN and the held-back writes, in one round trip."""
        if self.begun and not self._pending:
            return self.conn.execute(statement, params).fetchone()  # type: ignore[arg-type]
        with self.conn.pipeline():
            self._send_held()
            cur = self.conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchone()

    def _send_held(self) -> None:
        if not self.begun:
            self.begun = True
            self.conn.execute("BEGIN")
        for statement, params in self._pending:
            self.conn.execute(statement, params)  # type: ignore[arg-type]
        self._pending.clear()

    def commit(self) -> None:
        if not self.begun and not self._pending:
            return  # nothing was read or written
        with self.conn.pipeline():
            self._send_held()
            self.conn.execute("COMMIT")

    def flush(self) -> None:
        """Send the held-back writes inside a transaction someone else began and will commit."""
        assert self.begun
        if self._pending:
            with self.conn.pipeline():
                self._send_held()

    @property
    def now(self) -> datetime:
        if self._now is None:
            (value,) = self._ask("SELECT clock_timestamp()")  # type: ignore[misc]
            self._now = _utc(value)
        return self._now

    def load(self, key: str) -> Entry | None:
        row = self._ask(self._sql.load, (key,))
        assert row is not None
        if not self._injected:
            self._now = _utc(row[0])
        self.xid = int(row[1])
        return None if row[2] is None else _entry(row[2:])

    def insert(self, entry: Entry) -> bool:
        return self._ask(self._sql.insert, _entry_params(entry)) is not None

    def update(self, entry: Entry) -> None:
        self._pending.append((self._sql.update, _entry_params(entry)))

    def delete(self, key: str) -> None:
        self._pending.append((self._sql.delete, (key,)))

    def next_fence(self) -> int:
        (value,) = self._ask(self._sql.next_fence)  # type: ignore[misc]
        return int(value)

    def log(
        self, kind: EventKind, key: str, run_id: str | None, fence: int | None, detail: str | None
    ) -> None:
        self._pending.append((self._sql.log, (key, kind.value, run_id, fence, self.now, detail)))


# --- the ledger --------------------------------------------------------------------------------------


class PostgresLedger(Ledger):
    """A ledger in a PostgreSQL schema. Safe across threads, processes (fork or spawn) and hosts."""

    def __init__(
        self,
        url: str,
        config: LedgerConfig | None = None,
        clock: Clock | None = None,
        *,
        pool_timeout: float = POOL_TIMEOUT_SECONDS,
        pool_max_size: int = POOL_MAX_SIZE,
    ) -> None:
        super().__init__(url, config, clock)
        self.url = redact_url(url)
        params, self.schema = parse_url(url)
        self._password: str | None = params.get("password") or None
        self._conninfo = make_conninfo("", **params)
        self._sql = _Sql(self.schema)
        self._pool_timeout = pool_timeout
        self._pool_max_size = pool_max_size
        self._lease_us = _micros(self.config.lease)
        self._claim_lease_us = _micros(min(self.config.lease, self.config.in_flight_ttl))
        self._ttl_us = _micros(self.config.in_flight_ttl)
        self._retention_us = _micros(self.config.retention)
        self._lock = threading.Lock()
        self._pool_obj: ConnectionPool | None = None
        self._pool_pid = -1
        self._identity: tuple[Any, ...] | None = None
        self._lost_claims: dict[str, list[str]] = {}
        self._calls = threading.local()
        """Per call of this thread: whether a one-statement finalize lost its reply."""
        """Write tokens, by key, of this process's one-statement claims whose outcome was lost."""
        self._ensure_schema()
        _LIVE.add(self)

    # --- connections ------------------------------------------------------------------------------

    def _pool(self) -> ConnectionPool:
        """This process's pool, created on first use (and again in a forked or unpickled child)."""
        pool = self._pool_obj
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._lock:
            if self._pool_obj is None or self._pool_pid != os.getpid():
                self._pool_obj = ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True},
                    min_size=1,
                    max_size=self._pool_max_size,
                    timeout=self._pool_timeout,
                    configure=_configure,
                    name=f"rocky-ledger-{os.getpid()}",
                    num_workers=1,
                    open=True,
                )
                self._pool_pid = os.getpid()
            return self._pool_obj

    def _forget_pool_after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._pool_obj is not None:
            _ORPHANED_POOLS.append(self._pool_obj)
        self._pool_obj = None
        self._pool_pid = -1
        self._lost_claims = {}  # the parent's

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a direct one when the pool has none ready in time (the server
        was away and the pool's reconnect is still backing off), so recovery is immediate."""
        pool = self._pool()
        try:
            conn = pool.getconn()
        except PoolTimeout:
            conn = None
        if conn is not None:
            try:
                yield conn
            finally:
                pool.putconn(conn)
            return
        try:
            direct = psycopg.connect(self._conninfo, autocommit=True)
            _configure(direct)
        except psycopg.Error as exc:
            raise LedgerUnavailableError(
                f"cannot reach the PostgreSQL ledger {self.url}: "
                f"{_scrub(str(exc).strip(), self._password)}; no work was done"
            ) from None
        try:
            yield direct
        finally:
            direct.close()

    def _recycle(self) -> None:
        """After a lost connection, drop the pool's other dead connections before retrying."""
        pool = self._pool_obj
        if pool is not None and self._pool_pid == os.getpid():
            with suppress(Exception):  # the retry reports what matters
                pool.check()

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Run `fn`; once more on a fresh connection if it lost its connection before committing."""
        try:
            return fn()
        except _Retry:
            self._recycle()
        try:
            return fn()
        except _Retry as exc:
            raise LedgerUnavailableError(f"{exc} (after one retry); no work was done") from None

    def _error(self, exc: psycopg.Error, *, retry: bool) -> LedgerUnavailableError:
        """A ledger error for a psycopg error, with every secret removed."""
        text = _scrub(str(exc).strip() or type(exc).__name__, self._password)
        if retry:
            return _Retry(f"lost the connection to the PostgreSQL ledger {self.url}: {text}")
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            return LedgerSchemaError(
                f"the ledger tables in schema {self.schema!r} of {self.url} are gone ({text}); "
                "open the ledger again to recreate them"
            )
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return LedgerUnavailableError(
                f"a ledger row in {self.url} stayed locked for {LOCK_TIMEOUT_SECONDS} s ({text}); "
                "another session holds a long transaction; no work was done"
            )
        return LedgerUnavailableError(
            f"PostgreSQL ledger {self.url} failed: {text}; no work was done"
        )

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """One autocommit read (or idempotent write) on a pooled connection."""
        with self._connection() as conn:
            try:
                return fn(conn)
            except psycopg.Error as exc:
                raise self._error(exc, retry=_lost(conn, exc)) from None

    _decode_entry = staticmethod(_entry)
    _decode_event = staticmethod(_event)

    @property
    def _reads(self) -> ReadQueries:
        return self._sql.reads

    def _read(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self._retrying(lambda: self._run(lambda c: c.execute(sql, params).fetchall()))  # type: ignore[arg-type]

    def _clock_now(self) -> datetime | None:
        """The injected clock's time, or None to use the database's."""
        if self._clock is None:
            return None
        return self._now(lambda: datetime.now(UTC))

    # --- schema -------------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        """Create or migrate the schema in one transaction, one opener at a time.

        The advisory lock is taken before BEGIN (so the transaction's catalog view is fresh:
        an xact lock taken inside it would not make the winner's tables visible), on a
        connection of its own that is closed right after, so the lock cannot outlive this call.
        """
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                version = self._schema_version(conn)
                if version == SCHEMA_VERSION:
                    return
                self._check_version(version)
                lock_key = f"rocky_dagster.ledger:{self.schema}"
                conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock_key,))
                try:
                    with conn.transaction():
                        version = self._schema_version(conn)
                        self._check_version(version)
                        if version is None:
                            for statement in self._sql.create_v1():
                                conn.execute(statement)  # type: ignore[arg-type]
                        migrations = self._sql.migrations()
                        for step in range(1, SCHEMA_VERSION):  # all: see `_Sql.migrations`
                            for statement in migrations[step]:
                                conn.execute(statement)  # type: ignore[arg-type]
                        conn.execute(
                            f"UPDATE {self._sql.meta} SET value = %s "  # type: ignore[arg-type]
                            "WHERE name = 'schema_version'",
                            (SCHEMA_VERSION,),
                        )
                finally:
                    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock_key,))
        except psycopg.OperationalError as exc:
            raise LedgerUnavailableError(
                f"cannot reach the PostgreSQL ledger {self.url}: "
                f"{_scrub(str(exc).strip(), self._password)}; check host, port, database name "
                "and credentials; no work was done"
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise LedgerUnavailableError(
                f"cannot create the ledger schema {self.schema!r} in {self.url}: "
                f"{_scrub(str(exc).strip(), self._password)}; grant CREATE on the database, or "
                "have an administrator open the ledger once"
            ) from None
        except psycopg.Error as exc:
            raise LedgerUnavailableError(
                f"cannot set up the PostgreSQL ledger {self.url}: "
                f"{_scrub(str(exc).strip(), self._password)}; no work was done"
            ) from None

    def _schema_version(self, conn: psycopg.Connection[Any]) -> int | None:
        (exists,) = conn.execute("SELECT to_regclass(%s)", (self._sql.meta,)).fetchone()  # type: ignore[misc]
        if exists is None:
            return None
        row = conn.execute(
            f"SELECT value FROM {self._sql.meta} WHERE name = 'schema_version'"  # type: ignore[arg-type]
        ).fetchone()
        if row is None:
            raise LedgerSchemaError(
                f"{self.url}: table {self._sql.meta} has no schema_version row; it was not "
                "written by rocky_dagster. Use another ?schema= for the ledger"
            )
        return int(row[0])

    def _check_version(self, version: int | None) -> None:
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"schema {self.schema!r} of {self.url} holds ledger schema version {version}, but "
                f"this rocky_dagster understands up to {SCHEMA_VERSION}: upgrade rocky_dagster"
            )

    # --- the store interface ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_PgTransaction]:
        with self._connection() as conn:
            tx = _PgTransaction(self._sql, conn, self._clock_now())
            try:
                yield tx
            except BaseException as exc:
                self._rollback(tx)
                if isinstance(exc, psycopg.Error):
                    # COMMIT was never sent: the server rolled back, so retrying is safe.
                    raise self._error(exc, retry=_lost(conn, exc)) from None
                raise
            try:
                tx.commit()
            except psycopg.Error as exc:
                if not _lost(conn, exc):
                    self._rollback(tx)
                    raise self._error(exc, retry=False) from None
                committed = self._settle(tx.xid)
                if committed is None:
                    raise LedgerUnavailableError(
                        f"lost the connection to the PostgreSQL ledger {self.url} while "
                        f"committing, and could not learn whether the commit happened "
                        f"({_scrub(str(exc).strip(), self._password)}); no work was done"
                    ) from None
                if not committed:
                    raise self._error(exc, retry=True) from None

    @staticmethod
    def _rollback(tx: _PgTransaction) -> None:
        if tx.begun and not tx.conn.broken:
            with suppress(psycopg.Error):
                tx.conn.execute("ROLLBACK")

    def _settle(self, xid: int | None) -> bool | None:
        """Whether transaction `xid` committed, waiting while it is still in progress (its
        session may outlive our broken socket). None if that cannot be learned."""
        if xid is None:
            return None
        self._recycle()
        deadline = time.monotonic() + IDLE_IN_TRANSACTION_TIMEOUT_SECONDS + 10
        while True:
            try:
                rows = self._run(
                    lambda c: c.execute("SELECT pg_xact_status(%s::text::xid8)", (xid,)).fetchall()
                )
            except LedgerUnavailableError:
                return None
            status = rows[0][0]
            if status == "committed":
                return True
            if status == "aborted":
                return False
            if status != "in progress" or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def now(self) -> datetime:
        clocked = self._clock_now()
        if clocked is not None:
            return clocked
        ((value,),) = self._read("SELECT clock_timestamp()")
        return value.astimezone(UTC)

    # --- the hot path: one round trip each ----------------------------------------------------------

    def _attempt(self, call: Callable[[], T]) -> T:
        return self._retrying(call)

    def _insert_new(self, new: NewClaim) -> tuple[int, datetime] | None:
        """The claim of a key with no row, in one statement (one round trip); None if it has
        one (or just got one), unless that row is this process's own lost insert.

        The write token of an insert whose outcome was lost is remembered: the next claim of
        the key that finds it taken checks whether that insert committed (see
        `_recover_lost_claim`).
        """
        token = secrets.token_hex(8)
        params = {
            "now": self._clock_now(),
            "key": new.key,
            "run_id": new.run_id,
            "pipeline": new.pipeline,
            "fingerprint": new.fingerprint,
            "lease_us": _micros(new.lease),
            "dedup_on": new.dedup_on,
            "token": token,
            "holder": new.holder_process,
            "kind": new.event.value,
            "detail": new.detail,
        }
        key = new.key
        with self._connection() as conn:
            try:
                row = conn.execute(self._sql.fast_claim, params).fetchone()
            except psycopg.Error as exc:
                if not _lost(conn, exc):
                    raise self._error(exc, retry=False) from None
                with self._lock:
                    self._lost_claims.setdefault(key, []).append(token)
                written = self._written_by(key, token, exc)
                if written is None:
                    raise self._error(exc, retry=True) from None
                with self._lock:
                    self._lost_claims[key].remove(token)
                    if not self._lost_claims[key]:
                        del self._lost_claims[key]
                row = (written[2], written[4])
        if row is None:
            return self._recover_lost_claim(key, new.run_id)
        return int(row[0]), _utc(row[1])

    def _recover_lost_claim(self, key: str, run_id: str) -> tuple[int, datetime] | None:
        """The claim an earlier call of this process made but never learned of, if it holds
        the key for `run_id`: its call failed, so no one works on it. Without this the run
        would find its own claim held by "another live attempt" (this very process) and skip.

        By now the lost insert is settled: our own insert waited for it on the key's conflict.
        """
        with self._lock:
            tokens = self._lost_claims.pop(key, None)
        if not tokens:
            return None
        try:
            for token in tokens:
                row = self._run(
                    lambda c, t=token: c.execute(self._sql.written_by, (key, t)).fetchone()
                )
                if row is not None and row[0] == State.IN_FLIGHT.value and row[1] == run_id:
                    return int(row[2]), _utc(row[4])
        except LedgerUnavailableError:
            with self._lock:
                self._lost_claims.setdefault(key, []).extend(tokens)
            raise
        return None

    def _written_by(self, key: str, token: str, exc: psycopg.Error) -> tuple[Any, ...] | None:
        """After a lost single-statement write: the row if that write committed, else None.

        For a finalize, `FOR UPDATE` waits out the original statement if its session still runs,
        so the answer is final. A claim's insert still running is invisible here; the retry's
        insert then waits for it and finds the key taken, and `claim` looks for the lost
        insert's token again: the row it wrote is this claim's (a same-run claim would
        otherwise be skipped, the holder being this very process).
        """
        self._recycle()
        try:
            rows = self._run(lambda c: c.execute(self._sql.written_by, (key, token)).fetchall())
        except LedgerUnavailableError:
            raise LedgerUnavailableError(
                f"lost the connection to the PostgreSQL ledger {self.url} during a write and "
                f"could not learn whether it committed "
                f"({_scrub(str(exc).strip(), self._password)}); no work was done"
            ) from None
        return rows[0] if rows else None

    def _finalize_live(
        self, key: str, fence: int, outcome: Outcome, encoded: str | None, detail: str | None
    ) -> tuple[str, datetime] | None:
        """The compare-and-set in one statement; a lost reply is settled by its write token."""
        token = secrets.token_hex(8)
        params = {
            "now": self._clock_now(),
            "key": key,
            "fence": fence,
            "state": outcome.value,
            "retention_us": self._retention_us,
            "result": encoded,
            "token": token,
            "detail": detail,
        }
        with self._connection() as conn:
            try:
                row = conn.execute(self._sql.fast_finalize, params).fetchone()
            except psycopg.Error as exc:
                if not _lost(conn, exc):
                    raise self._error(exc, retry=False) from None
                self._calls.lost = True
                written = self._written_by(key, token, exc)
                if written is None:
                    raise self._error(exc, retry=True) from None
                row = (written[1], written[3])
        return None if row is None else (row[0], _utc(row[1]))

    def _attempt_finalize(self, call: Callable[[], FinalizeResult]) -> FinalizeResult:
        self._calls.lost = False
        done = self._retrying(call)
        if (
            self._calls.lost
            and done.reason == FinalizeReason.ALREADY_FINAL
            and done.state == State(done.outcome.value)
        ):
            # Our first attempt may have been the one that applied (its reply was lost); only
            # the holder of `fence` finalizes it, so report it as applied.
            return done.model_copy(update={"applied": True, "reason": FinalizeReason.APPLIED})
        return done

    def finalize_in(
        self,
        conn: psycopg.Connection[Any],
        key: str,
        fence: int,
        outcome: Outcome | str,
        *,
        result: dict[str, Any] | None = None,
    ) -> FinalizeResult:
        """As `finalize`, but on your connection, inside the transaction it has open: the stamp
        commits (or rolls back) with whatever else that transaction writes. Nothing is committed
        here, and nothing is retried: if the transaction fails, none of it happened.

        The ledger's tables must be in the connection's database (`LedgerConfigError`
        otherwise). The same rules and events as `finalize` (a stale fence is refused with
        `applied=False`; roll your transaction back then, as `exactly_once(..., ledger=)` does).
        """
        key, fence, outcome, encoded = validate_finalize(key, fence, outcome, result)
        self._require_open_transaction(conn, "finalize_in")
        self.check_shared_database(conn)
        tx = _PgTransaction(self._sql, conn, self._clock_now())
        tx.begun = True  # the caller's transaction
        try:
            done = self._finalize_locked(tx, key, fence, outcome, encoded, result)
            tx.flush()
        except psycopg.Error as exc:
            raise self._error(exc, retry=False) from None
        return done

    @staticmethod
    def _require_open_transaction(conn: object, what: str) -> None:
        if not isinstance(conn, psycopg.Connection):
            raise InvalidArgumentError(
                f"{what}: conn must be a psycopg (3) Connection, got {type(conn).__name__}"
            )
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
            raise InvalidArgumentError(
                f"{what}: the connection has no open transaction "
                f"({conn.info.transaction_status.name}); call it inside `with conn.transaction():`"
            )

    def check_shared_database(self, conn: psycopg.Connection[Any]) -> None:
        """Raise `LedgerConfigError` unless `conn` is to the database holding this ledger's
        tables (same server, same database, the very same entries table)."""
        self._require_open_transaction(conn, "check_shared_database")
        try:
            theirs = conn.execute(_IDENTITY, (self._sql.entries,)).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc, retry=False) from None
        assert theirs is not None
        if theirs[2] is not None and theirs == self._identity:
            return
        self._identity = ours = self._read(_IDENTITY, (self._sql.entries,))[0]
        if theirs[2] is not None and theirs == ours:
            return  # the server restarted since the last look
        if theirs[:2] != ours[:2]:
            problem = (
                f"database {theirs[0]!r} is not the ledger's database {ours[0]!r} of {self.url}"
            )
        elif theirs[2] is None:
            problem = f"database {theirs[0]!r} has no ledger tables in schema {self.schema!r}"
        else:
            problem = f"database {theirs[0]!r} has other ledger tables than {self.url}"
        raise LedgerConfigError(
            f"the connection's {problem}: one transaction for the ledger stamp and your writes "
            "needs the ledger's tables in the same PostgreSQL database as the connection"
        )

    def _extend_lease(self, key: str, fence: int) -> bool:
        # idempotent: repeating it after a lost reply extends the same lease again
        params = {
            "now": self._clock_now(),
            "key": key,
            "fence": fence,
            "lease_us": self._lease_us,
            "ttl_us": self._ttl_us,
        }
        return bool(self._run(lambda c: c.execute(self._sql.heartbeat, params).fetchall()))

    # --- reads and housekeeping ---------------------------------------------------------------------

    def check(self) -> list[str]:
        """The ledger's tables and fence sequence exist at this schema version, every entry
        and event decodes as a call would, and no stored fence is above the sequence."""
        problems: list[str] = []
        try:
            for name in (self._sql.entries, self._sql.events, self._sql.meta, self._sql.fences):
                ((found,),) = self._read("SELECT to_regclass(%s)", (name,))
                if found is None:
                    problems.append(f"{name} is missing")
            if problems:
                return problems
            ((version,),) = self._read(
                f"SELECT max(value) FROM {self._sql.meta} WHERE name = 'schema_version'"
            )
            if version != SCHEMA_VERSION:
                problems.append(f"schema_version is {version!r}, expected {SCHEMA_VERSION}")
            problems += row_problems(self._read(self._sql.select), _entry)
            problems += row_problems(
                self._read(
                    f"SELECT id, key, kind, run_id, fence, at, detail FROM {self._sql.events}"
                ),
                _event,
            )
            ((top, issued),) = self._read(
                f"SELECT (SELECT max(fence) FROM {self._sql.entries}), "
                f"(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {self._sql.fences})"
            )
            if top is not None and top > issued:
                problems.append(
                    f"an entry holds fence {top}, above the last one the sequence {self._sql.fences} "
                    f"handed out ({issued}): a new claim could reuse a fence"
                )
        except LedgerUnavailableError as exc:
            problems.append(str(exc))
        return problems

    def stats(self) -> Stats:
        ((n, in_flight, ok, failed, expired, stale, events, fence),) = self._read(
            self._sql.stats, {"now": self.now()}
        )
        return Stats(
            entries=n,
            in_flight=in_flight,
            succeeded=ok,
            failed=failed,
            expired=expired,
            stale_in_flight=stale,
            events=events,
            last_fence=int(fence),
        )

    def _sweep(self, now: datetime, abandoned_before: datetime) -> int:
        # one statement; repeating it after a lost reply only finds what is left
        ((count,),) = self._read(self._sql.sweep, {"now": now, "before": abandoned_before})
        return int(count)

    def close(self) -> None:
        """Close this process's pool; a later call opens a new one (as SQLite reconnects)."""
        with self._lock:
            pool, self._pool_obj = self._pool_obj, None
            if pool is not None and self._pool_pid == os.getpid():
                pool.close(timeout=5.0)

    # --- pickling (spawned workers may receive a ledger) ------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_pool_obj"] = None
        state["_pool_pid"] = -1
        state["_calls"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._calls = threading.local()
        _LIVE.add(self)


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Per-session limits, set once per new connection (not as startup options, which some
    poolers reject): never wait forever on a row lock, and let the server end a transaction
    whose client vanished so its outcome settles."""
    conn.execute(
        f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'; "  # type: ignore[arg-type]
        f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT_SECONDS}s'"
    )
