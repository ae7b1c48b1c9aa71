"""What only the PostgreSQL backend has: URL and schema handling, the database clock, the pool
across threads, fork and spawn, lost connections, and passwords kept out of every message.
The shared behaviour is the ledger contract suite (tests/ledger), run on both backends."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from cutting_proxy import CuttingProxy
from pg_server import PostgresServer

from rocky_dagster.ledger import (
    Decision,
    EventKind,
    FinalizeReason,
    LedgerConfigError,
    LedgerError,
    LedgerSchemaError,
    LedgerUnavailableError,
    Outcome,
    State,
    open_ledger,
)
from rocky_dagster.ledger.postgres import DEFAULT_SCHEMA, SCHEMA_VERSION, PostgresLedger, _Sql

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _schema(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def _tables(url: str, schema: str) -> set[str]:
    with psycopg.connect(url.split("?")[0]) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchall()
    return {r[0] for r in rows}


@pytest.fixture
def ledger(postgres_url: str) -> Iterator[PostgresLedger]:
    with open_ledger(postgres_url) as opened:
        assert isinstance(opened, PostgresLedger)
        yield opened


# --- URL, schema, versions --------------------------------------------------------------------------


def test_schema_from_the_url_is_created_with_a_version(postgres_url):
    schema = _schema(postgres_url)
    with open_ledger(postgres_url) as ledger:
        assert ledger.schema == schema
        ledger.claim("k", "run-1")
    assert {"rocky_ledger_entries", "rocky_ledger_events", "rocky_ledger_meta"} <= _tables(
        postgres_url, schema
    )
    with psycopg.connect(postgres_url.split("?")[0]) as conn:
        (version,) = conn.execute(
            f'SELECT value FROM "{schema}".rocky_ledger_meta WHERE name = %s', ("schema_version",)
        ).fetchone()
    assert version == SCHEMA_VERSION
    with open_ledger(postgres_url) as again:  # reopening keeps the data
        assert again.get("k").run_id == "run-1"


def test_default_schema_and_url_spellings(postgres_database):
    base = postgres_database.partition("://")[2]
    for scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        with open_ledger(f"{scheme}://{base}") as ledger:
            assert ledger.schema == DEFAULT_SCHEMA
            assert ledger.claim(f"key-{scheme}", "r").decision == Decision.PROCEED
    assert "rocky_ledger_entries" in _tables(postgres_database, DEFAULT_SCHEMA)


@pytest.mark.parametrize("schema", ["Upper", "1abc", "a-b", 'x"; drop table y; --', "", "a" * 64])
def test_bad_schema_names_are_config_errors(postgres_server, schema):
    url = postgres_server.url("postgres") + "?schema=" + schema.replace(" ", "%20")
    with pytest.raises(LedgerConfigError, match="schema"):
        open_ledger(url)


def test_first_open_from_many_threads_creates_the_schema_once(postgres_url):
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def open_one() -> None:
        try:
            barrier.wait()
            with open_ledger(postgres_url) as ledger:
                ledger.claim(f"k-{threading.get_ident()}", "r")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with open_ledger(postgres_url) as ledger:
        assert ledger.stats().entries == 8


def test_newer_schema_version_is_refused(postgres_url):
    with open_ledger(postgres_url) as ledger:
        schema = ledger.schema
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as conn:
        conn.execute(
            f"UPDATE \"{schema}\".rocky_ledger_meta SET value = 99 WHERE name = 'schema_version'"
        )
    with pytest.raises(LedgerSchemaError, match="version 99"):
        open_ledger(postgres_url)


def _indexes(url: str, schema: str) -> set[str]:
    with psycopg.connect(url.split("?")[0]) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    return {r[0] for r in rows}


V2_INDEXES = {
    "rocky_ledger_entries_pkey",
    "rocky_ledger_entries_expires_at_idx",
    "rocky_ledger_entries_in_flight",
    "rocky_ledger_events_pkey",
    "rocky_ledger_events_key_id_idx",
    "rocky_ledger_meta_pkey",
}


def test_a_version_1_schema_is_migrated_in_place_and_keeps_every_row(postgres_url):
    schema = _schema(postgres_url)
    sql = _Sql(schema)
    clock = Clock()
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as conn:
        for statement in sql.create_v1():  # exactly what rocky_dagster wrote as version 1
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {sql.entries} (key, state, run_id, fence, claimed_at, heartbeat_at, "
            "lease_expires_at, finalized_at, expires_at, dedup_on, result) VALUES "
            "('done', 'succeeded', 'run-0', 1, %(t)s, %(t)s, %(t)s, %(t)s, %(later)s, 'success', "
            "'{\"rows\": 3}'), ('old', 'succeeded', 'run-0', 2, %(t)s, %(t)s, %(t)s, %(t)s, %(t)s, "
            "'success', NULL), ('live', 'in_flight', 'run-1', 3, %(t)s, %(t)s, %(later)s, NULL, "
            "NULL, 'success', NULL)",
            {"t": clock.now - timedelta(days=40), "later": clock.now + timedelta(minutes=1)},
        )
        conn.execute(f"SELECT setval('{sql.fences}', 3)")
    assert "rocky_ledger_events_at_idx" in _indexes(postgres_url, schema)

    with open_ledger(postgres_url, clock=clock) as ledger:
        assert _indexes(postgres_url, schema) == V2_INDEXES
        skip = ledger.claim("done", "run-2")
        assert (skip.decision, skip.result) == (Decision.SKIPPED_COMPLETED, {"rows": 3})
        assert [e.key for e in ledger.entries(State.IN_FLIGHT, run_id="run-1")] == ["live"]
        fresh = ledger.claim("new", "run-2")
        assert fresh.fence is not None and fresh.fence > 3
        assert ledger.finalize("live", 3, Outcome.SUCCEEDED).applied
        assert ledger.sweep() == 1  # the expired success
        assert ledger.get("old") is None and ledger.get("done") is not None
    with psycopg.connect(postgres_url.split("?")[0]) as conn:
        (version,) = conn.execute(
            f"SELECT value FROM {sql.meta} WHERE name = 'schema_version'"
        ).fetchone()
    assert version == SCHEMA_VERSION == 4


@pytest.mark.parametrize("layout", ["due_index", "generation_column"])
def test_either_pre_release_version_2_schema_is_brought_to_the_current_one(postgres_url, layout):
    """Two pre-release layouts both said version 2: the lean in-flight index on version 1's
    columns, or the generation column on version 1's indexes. Each ends as a fresh schema."""
    schema = _schema(postgres_url)
    sql = _Sql(schema)
    clock = Clock()
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as conn:
        for statement in sql.create_v1():
            conn.execute(statement)
        if layout == "due_index":
            for statement in sql.migrations()[1]:
                conn.execute(statement)
        else:
            conn.execute(f"ALTER TABLE {sql.entries} ADD COLUMN generation bigint")
        conn.execute(f"UPDATE {sql.meta} SET value = 2 WHERE name = 'schema_version'")
        conn.execute(
            f"INSERT INTO {sql.entries} (key, state, run_id, fence, claimed_at, heartbeat_at, "
            "lease_expires_at, dedup_on) VALUES ('live', 'in_flight', 'run-1', 3, %(t)s, %(t)s, "
            "%(t)s, 'success')",
            {"t": clock.now - timedelta(minutes=5)},
        )
        conn.execute(f"SELECT setval('{sql.fences}', 3)")

    with open_ledger(postgres_url, clock=clock) as ledger:
        assert _indexes(postgres_url, schema) == V2_INDEXES
        assert ledger.get("live").generation == 3
        adopted = ledger.claim("live", "run-2")
        assert (adopted.decision, adopted.generation) == (Decision.ADOPTED_STALE, 3)
        assert ledger.get("live").generation == 3 and ledger.get("live").fence > 3
        assert ledger.check() == []
    with psycopg.connect(postgres_url.split("?")[0]) as conn:
        (version,) = conn.execute(
            f"SELECT value FROM {sql.meta} WHERE name = 'schema_version'"
        ).fetchone()
    assert version == SCHEMA_VERSION


def test_a_new_schema_has_the_migrated_layout(postgres_url):
    with open_ledger(postgres_url) as ledger:
        ledger.claim("k", "run-1")
    assert _indexes(postgres_url, _schema(postgres_url)) == V2_INDEXES


def test_a_foreign_meta_table_is_refused(postgres_url):
    schema = _schema(postgres_url)
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".rocky_ledger_meta (name text, value bigint)')
    with pytest.raises(LedgerSchemaError, match="schema_version"):
        open_ledger(postgres_url)


def test_dropped_tables_are_a_ledger_error_not_a_psycopg_error(ledger, postgres_url):
    ledger.claim("k", "r")
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{ledger.schema}" CASCADE')
    with pytest.raises(LedgerSchemaError, match="gone"):
        ledger.claim("k2", "r")
    with pytest.raises(LedgerSchemaError):
        ledger.get("k")


def test_missing_extra_names_it():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None  # as if the extra were not installed
        from rocky_dagster.ledger import LedgerConfigError, open_ledger
        try:
            open_ledger("postgresql://u:hunter2secret@127.0.0.1:1/db")
        except LedgerConfigError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "pip install 'psycopg[binary]>=3.2,<4' 'psycopg-pool>=3.2,<4'" in out
    assert "hunter2secret" not in out


# --- time ------------------------------------------------------------------------------------------------


def test_time_is_the_databases_not_the_workers(postgres_url, tmp_path):
    """A worker whose clock runs a day ahead neither expires another run's lease nor gets a
    longer one itself: every time is the server's. The same skew does move the SQLite
    ledger's times (its clock is the host's), which shows the skew really applies."""
    with open_ledger(postgres_url) as ledger:
        held = ledger.claim("held", "run-A")
    code = textwrap.dedent(
        f"""
        import datetime as _dt, sys, time
        import rocky_dagster.ledger, rocky_dagster.ledger.postgres, rocky_dagster.ledger.sqlite
        class Skewed(_dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return _dt.datetime.now(tz) + _dt.timedelta(days=1)
        for name, module in list(sys.modules.items()):
            if name.startswith("rocky_dagster") and getattr(module, "datetime", None) is _dt.datetime:
                module.datetime = Skewed
        _real = time.time
        time.time = lambda: _real() + 86400
        from rocky_dagster.ledger import open_ledger
        with open_ledger({postgres_url!r}) as ledger:
            print(ledger.claim("held", "run-B").decision.value)
            print(ledger.claim("fresh", "run-B").lease_expires_at.isoformat())
            print(ledger.now().isoformat())
        with open_ledger({str(tmp_path / "skewed.db")!r}) as ledger:
            print(ledger.claim("fresh", "run-B").lease_expires_at.isoformat())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    with psycopg.connect(postgres_url.split("?")[0]) as conn:
        (server_now,) = conn.execute("SELECT now()").fetchone()
    assert out[0] == Decision.SKIPPED_IN_FLIGHT.value
    assert datetime.fromisoformat(out[1]) - server_now < timedelta(hours=1)  # not a day ahead
    assert datetime.fromisoformat(out[2]) - server_now < timedelta(hours=1)
    assert held.lease_expires_at - server_now < timedelta(hours=1)
    assert datetime.fromisoformat(out[3]) - server_now > timedelta(hours=23)  # the control


def test_an_injected_clock_still_drives_every_path(postgres_url):
    clock = Clock()
    with open_ledger(postgres_url, {"lease_seconds": 60}, clock=clock) as ledger:
        first = ledger.claim("k", "run-A")  # fast path: no row
        assert first.lease_expires_at == clock.now + timedelta(seconds=60)
        clock.now += timedelta(seconds=30)
        assert ledger.heartbeat("k", first.fence)
        assert ledger.get("k").lease_expires_at == clock.now + timedelta(seconds=60)
        clock.now += timedelta(seconds=61)
        adopted = ledger.claim("k", "run-B")  # generic path: the row exists
        assert adopted.decision == Decision.ADOPTED_STALE
        assert adopted.prior_run_id == "run-A"
        clock.now += timedelta(seconds=5)
        done = ledger.finalize("k", adopted.fence, Outcome.SUCCEEDED)  # fast path
        assert done.reason == FinalizeReason.APPLIED
        entry = ledger.get("k")
        assert entry.finalized_at == clock.now
        assert entry.expires_at == clock.now + ledger.config.retention
        assert [e.at for e in ledger.history("k")][-1] == clock.now
        assert ledger.finalize("k", first.fence, Outcome.SUCCEEDED).reason == (
            FinalizeReason.STALE_FENCE
        )
        clock.now += ledger.config.retention
        assert ledger.sweep() == 1
        assert ledger.get("k") is None


def test_fences_strictly_increase_across_ledgers_on_one_schema(postgres_url):
    with open_ledger(postgres_url) as a, open_ledger(postgres_url) as b:
        fences = []
        for i in range(10):
            for ledger in (a, b):
                claim = ledger.claim(f"k{i}", f"run-{id(ledger)}")
                if claim.fence is not None:
                    fences.append(claim.fence)
                    ledger.finalize(f"k{i}", claim.fence, Outcome.FAILED)
        assert fences == sorted(set(fences))
        assert a.stats().last_fence == fences[-1]


# --- processes and threads ------------------------------------------------------------------------------


def test_threads_share_one_ledger(ledger):
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                claim = ledger.claim(f"t{n}-{i}", f"run-{n}")
                assert ledger.heartbeat(claim.key, claim.fence)
                assert ledger.finalize(claim.key, claim.fence, Outcome.SUCCEEDED).applied
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ledger.stats().succeeded == 200


def _use_in_child(ledger: PostgresLedger, key: str, queue: multiprocessing.Queue) -> None:
    try:
        claim = ledger.claim(key, f"child-{os.getpid()}")
        ledger.finalize(key, claim.fence, Outcome.SUCCEEDED)
        queue.put(("ok", claim.decision.value, os.getpid()))
    except BaseException as exc:
        queue.put(("error", repr(exc), os.getpid()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_ledger_opened_in_the_parent_works_in_children(ledger, method):
    """fork: the child gets its own pool and never touches the parent's sockets; spawn: the
    ledger pickles without its pool. Either way the parent keeps working afterwards."""
    ledger.claim("parent-before", "parent")
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_use_in_child, args=(ledger, f"{method}-{i}", queue)) for i in range(3)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok"] * 3, results
    assert {r[2] for r in results}.isdisjoint({os.getpid()})
    # the parent's pooled connection survived the children (none of them closed it)
    assert ledger.claim("parent-after", "parent").decision == Decision.PROCEED
    assert ledger.stats().succeeded == 3


# --- lost connections -------------------------------------------------------------------------------------


@pytest.fixture
def proxied(
    postgres_server: PostgresServer, postgres_url: str
) -> Iterator[tuple[CuttingProxy, str]]:
    proxy = CuttingProxy(postgres_server.host, postgres_server.port)
    try:
        yield proxy, postgres_url.replace(f":{postgres_server.port}/", f":{proxy.port}/")
    finally:
        proxy.close()


def _kinds(ledger: PostgresLedger, key: str) -> list[str]:
    return [e.kind.value for e in ledger.history(key)]


def test_a_dropped_session_is_retried_on_a_fresh_connection(ledger, postgres_url):
    first = ledger.claim("k", "run-A")
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'rocky_dagster' AND datname = current_database()"
        ).fetchone()[0]
    assert killed >= 1
    done = ledger.finalize("k", first.fence, Outcome.SUCCEEDED)
    assert done.reason == FinalizeReason.APPLIED
    assert _kinds(ledger, "k") == ["claimed", "succeeded"]


def test_fast_claim_whose_reply_is_lost_is_not_claimed_twice(proxied):
    proxy, url = proxied
    with open_ledger(url) as ledger:
        ledger.get("warm-up")
        proxy.cut_next_reply(b"SELECT 1")  # the one-statement claim of a key with no row
        claim = ledger.claim("k", "run-A")
        assert proxy.cuts == 1
        assert claim.decision == Decision.PROCEED
        assert ledger.get("k").fence == claim.fence
        assert _kinds(ledger, "k") == ["claimed"]


def test_generic_claim_whose_commit_reply_is_lost_learns_the_outcome(proxied):
    proxy, url = proxied
    with open_ledger(url) as ledger:
        first = ledger.claim("k", "run-A")
        ledger.finalize("k", first.fence, Outcome.FAILED)
        proxy.cut_next_reply(b"COMMIT")  # the row exists, so this claim is BEGIN … COMMIT
        again = ledger.claim("k", "run-B")
        assert proxy.cuts == 1
        assert again.decision == Decision.PROCEED
        assert again.prior_run_id == "run-A"
        assert ledger.get("k").fence == again.fence
        assert _kinds(ledger, "k") == ["claimed", "failed", "claimed"]


def test_finalize_whose_reply_is_lost_reports_applied_once(proxied):
    proxy, url = proxied
    with open_ledger(url) as ledger:
        claim = ledger.claim("k", "run-A")
        proxy.cut_next_reply(b"SELECT 1")  # the one-statement compare-and-set
        done = ledger.finalize("k", claim.fence, Outcome.SUCCEEDED, result={"rows": 3})
        assert proxy.cuts == 1
        assert done.applied and done.reason == FinalizeReason.APPLIED
        assert ledger.get("k").result == {"rows": 3}
        assert _kinds(ledger, "k") == ["claimed", "succeeded"]


def test_a_cut_before_commit_is_retried_once(proxied):
    proxy, url = proxied
    with open_ledger(url) as ledger:
        first = ledger.claim("k", "run-A")
        proxy.cut_next_reply(b"BEGIN")  # dies before anything is written
        skipped = ledger.claim("k", "run-B")
        assert proxy.cuts == 1
        assert skipped.decision == Decision.SKIPPED_IN_FLIGHT
        assert skipped.held_by_run_id == "run-A"
        assert _kinds(ledger, "k") == ["claimed", "skipped_in_flight"]
        assert ledger.get("k").fence == first.fence


def test_a_server_that_stays_away_fails_closed(proxied):
    proxy, url = proxied
    ledger = PostgresLedger(url, pool_timeout=2)
    try:
        ledger.claim("k", "run-A")
        proxy.refuse_all()
        with pytest.raises(LedgerUnavailableError) as caught:
            ledger.claim("k2", "run-A")
        assert "no work was done" in str(caught.value)
        with pytest.raises(LedgerUnavailableError):
            ledger.finalize("k", 1, Outcome.SUCCEEDED)
        proxy.refuse_all(False)
        # and it recovers once the server is back
        assert ledger.claim("k2", "run-A").decision == Decision.PROCEED
        assert ledger.get("k").state == State.IN_FLIGHT
    finally:
        ledger.close()


# --- secrets ------------------------------------------------------------------------------------------------


def _everything_said(exc: BaseException) -> str:
    """Every message of the error and of whatever it was raised from or during."""
    said = []
    seen: BaseException | None = exc
    while seen is not None:
        said += [*traceback.format_exception_only(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "".join(said)


def test_passwords_never_appear_in_errors_or_reprs(postgres_server, proxied):
    proxy, url = proxied
    secret = postgres_server.password
    with open_ledger(url) as ledger:
        assert secret not in repr(ledger) and secret not in ledger.url
        assert "***" in ledger.url
    wrong = url.replace(secret, "Wr0ngPassw0rd-xyz")
    with pytest.raises(LedgerUnavailableError) as caught:
        open_ledger(wrong)
    said = _everything_said(caught.value)
    assert "Wr0ngPassw0rd-xyz" not in said and "password authentication failed" in said
    query_form = (
        f"postgresql://{postgres_server.user}@127.0.0.1:{proxy.port}/nope"
        f"?password={secret}&schema=x"
    )
    with pytest.raises(LedgerUnavailableError) as caught:
        open_ledger(query_form)
    assert secret not in _everything_said(caught.value)
    with pytest.raises(LedgerConfigError) as caught:  # libpq quotes the bad token it found
        open_ledger("postgresql://app:p%zzSecretX@127.0.0.1/db")
    assert "SecretX" not in _everything_said(caught.value)
    ledger = PostgresLedger(url, pool_timeout=1)
    try:
        proxy.refuse_all()
        for call in (lambda: ledger.claim("k", "r"), lambda: ledger.get("k")):
            with pytest.raises(LedgerError) as caught:
                call()
            assert secret not in _everything_said(caught.value)
    finally:
        proxy.refuse_all(False)
        ledger.close()


def test_events_after_lost_connections_match_what_callers_were_told(proxied):
    """Sanity over the whole cycle with cuts at each reply kind: one event per decision."""
    proxy, url = proxied
    with open_ledger(url) as ledger:
        told = []
        for i, tag in enumerate([b"SELECT 1", b"COMMIT", b"BEGIN", b"SELECT 1"]):
            proxy.cut_next_reply(tag)
            claim = ledger.claim("shared", f"run-{i}")
            told.append(claim.decision)
            if claim.should_run:
                ledger.finalize("shared", claim.fence, Outcome.FAILED)
        history = ledger.history("shared")
        claimed = [e for e in history if e.kind == EventKind.CLAIMED]
        assert len(claimed) == sum(d.should_run for d in told) == 4
        assert [e.kind for e in history].count(EventKind.FAILED) == 4
