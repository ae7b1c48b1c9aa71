"""`exactly_once` on a PostgreSQL connection, and with `ledger=` the ledger's stamp in the same
transaction as the writes and the marker, against a real server.

Before `exactly_once` took a psycopg connection every test here failed (it read
`conn.in_transaction`, which a psycopg connection does not have: AttributeError), and before
`ledger=` / `PostgresLedger.finalize_in` the one-transaction tests failed with TypeError.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_server import TEST_DATABASE, PostgresServer

from rocky_dagster import exactly_once
from rocky_dagster.effects.postgres import read_pg_marker
from rocky_dagster.ledger import (
    Decision,
    InvalidArgumentError,
    LedgerConfigError,
    State,
    open_ledger,
)
from rocky_dagster.ledger.postgres import PostgresLedger
from rocky_dagster.pipelines import FenceLostError, PipelineError

REPO = Path(__file__).resolve().parents[2]
_count = iter(range(1, 10_000))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Holder:
    """A claim as the ledger hands it out (only what exactly_once reads)."""

    def __init__(self, key: str, generation: int, fence: int, run_id: str) -> None:
        self.key, self.generation, self.fence, self.run_id = key, generation, fence, run_id
        self.should_run = True


@pytest.fixture
def db(postgres_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """(connection URL of the test database, a schema of its own for the table and markers)."""
    url = postgres_server.url(TEST_DATABASE)
    schema = f"fx{os.getpid()}_{next(_count)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')  # type: ignore[arg-type]
        conn.execute(f'CREATE TABLE "{schema}".invoices (n int, by text)')  # type: ignore[arg-type]
    yield url, schema


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(db: tuple[str, str], clock: Clock) -> Iterator[PostgresLedger]:
    """A ledger in the same database as the warehouse (its own schema)."""
    url, schema = db
    with open_ledger(f"{url}?schema={schema}_ledger", clock=clock) as opened:
        assert isinstance(opened, PostgresLedger)
        yield opened


def rows(url: str, schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(f'SELECT n, by FROM "{schema}".invoices ORDER BY n, by').fetchall()  # type: ignore[arg-type]


def marker(url: str, schema: str, key: str) -> tuple[int, int, str] | None:
    with psycopg.connect(url, autocommit=True) as conn:
        found = read_pg_marker(conn, key, schema=schema)
    return None if found is None else (found.generation, found.fence, found.run_id)


def send(
    conn: psycopg.Connection[Any], holder: Any, schema: str, *, ledger: Any = None
) -> tuple[bool, Any]:
    with exactly_once(conn, holder, name="send_invoices", schema=schema, ledger=ledger) as effect:
        if effect.already_applied:
            return True, effect.recorded
        conn.execute(
            f'INSERT INTO "{schema}".invoices VALUES (1, %s), (2, %s)',  # type: ignore[arg-type]
            (holder.run_id, holder.run_id),
        )
        effect.result = {"invoices": 2, "by": holder.run_id}
        return False, effect.result


# --- the marker rules, as on SQLite ---------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
def test_writes_apply_once_per_generation(db: tuple[str, str], autocommit: bool) -> None:
    url, schema = db
    with psycopg.connect(url, autocommit=autocommit) as conn:
        assert send(conn, Holder("k", 1, 1, "zombie"), schema) == (
            False,
            {"invoices": 2, "by": "zombie"},
        )
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert send(conn, Holder("k", 1, 2, "adopter"), schema) == (
            True,
            {"invoices": 2, "by": "zombie"},
        )
        assert send(conn, Holder("k", 3, 4, "next"), schema)[0] is False
        with pytest.raises(FenceLostError, match="older generation 1"):
            send(conn, Holder("k", 1, 2, "adopter"), schema)
        with pytest.raises(FenceLostError, match="later holder"):
            send(conn, Holder("k", 3, 3, "stale"), schema)
    assert rows(url, schema) == [(1, "next"), (1, "zombie"), (2, "next"), (2, "zombie")]
    assert marker(url, schema, "k") == (3, 4, "next")


def test_the_marker_table_goes_to_the_current_schema_by_default(db: tuple[str, str]) -> None:
    url, schema = db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')  # type: ignore[arg-type]
        with exactly_once(conn, Holder("k", 1, 1, "r")) as effect:
            effect.result = {"n": 0}
        (found,) = conn.execute("SELECT to_regclass('_rocky_effects')::text").fetchone()  # type: ignore[misc]
    assert found == "_rocky_effects"
    assert marker(url, schema, "k") == (1, 1, "r")


def test_a_failing_body_commits_nothing(db: tuple[str, str]) -> None:
    url, schema = db
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(RuntimeError), exactly_once(conn, Holder("k", 1, 1, "r"), schema=schema):
            conn.execute(f'INSERT INTO "{schema}".invoices VALUES (1, %s)', ("r",))  # type: ignore[arg-type]
            raise RuntimeError("the body failed")
        with (
            pytest.raises(PipelineError, match="result is not JSON"),
            exactly_once(conn, Holder("k", 1, 1, "r"), schema=schema) as effect,
        ):
            conn.execute(f'INSERT INTO "{schema}".invoices VALUES (1, %s)', ("r",))  # type: ignore[arg-type]
            effect.result = {"n": object()}
    assert rows(url, schema) == []
    assert marker(url, schema, "k") is None


def test_a_connection_inside_a_transaction_is_refused(db: tuple[str, str]) -> None:
    url, schema = db
    with psycopg.connect(url) as conn:  # not autocommit: a SELECT opens a transaction
        conn.execute("SELECT 1")
        with (
            pytest.raises(PipelineError, match=r"already inside a transaction \(INTRANS\)"),
            exactly_once(conn, Holder("k", 1, 1, "r"), schema=schema),
        ):
            pass
        conn.rollback()
    with (
        psycopg.connect(url, autocommit=True) as conn,
        conn.transaction(),
        pytest.raises(PipelineError, match="already inside"),
        exactly_once(conn, Holder("k", 1, 1, "r"), schema=schema),
    ):
        pass
    assert marker(url, schema, "k") is None


# --- two holders at once --------------------------------------------------------------------


def _waiting_for_a_lock(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        (kind,) = conn.execute(  # type: ignore[misc]
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return kind == "Lock"


def _second_holder_waits(
    url: str, schema: str, first: Holder, second: Holder, *, ledger: Any = None
) -> tuple[Any, Any]:
    """`first` writes inside exactly_once and holds its transaction open until `second` is
    seen waiting for the key's marker lock; then `first` commits. Both outcomes."""
    inside = threading.Event()
    go_on = threading.Event()
    outcome: dict[str, Any] = {}

    def run(name: str, holder: Holder, pause: bool) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            outcome[f"{name}_pid"] = conn.info.backend_pid
            try:
                with exactly_once(
                    conn, holder, name="send_invoices", schema=schema, ledger=ledger
                ) as effect:
                    if effect.already_applied:
                        outcome[name] = ("already_applied", effect.recorded)
                        return
                    conn.execute(
                        f'INSERT INTO "{schema}".invoices VALUES (1, %s)',  # type: ignore[arg-type]
                        (holder.run_id,),
                    )
                    effect.result = {"by": holder.run_id}
                    if pause:
                        inside.set()
                        assert go_on.wait(30)
                outcome[name] = ("applied", effect.result)
            except Exception as exc:
                outcome[name] = (type(exc).__name__, str(exc))

    a = threading.Thread(target=run, args=("first", first, True))
    a.start()
    assert inside.wait(30)
    b = threading.Thread(target=run, args=("second", second, False))
    b.start()
    deadline = time.monotonic() + 30
    while "second_pid" not in outcome or not _waiting_for_a_lock(url, outcome["second_pid"]):
        assert time.monotonic() < deadline, "the second holder never waited for the lock"
        assert "second" not in outcome, f"the second holder did not wait: {outcome['second']}"
        time.sleep(0.01)
    go_on.set()
    a.join(30)
    b.join(30)
    return outcome["first"], outcome["second"]


def test_zombie_commits_first_then_the_adopter_applies_nothing(db: tuple[str, str]) -> None:
    url, schema = db
    zombie, adopter = _second_holder_waits(
        url, schema, Holder("k", 5, 5, "zombie"), Holder("k", 5, 6, "adopter")
    )
    assert zombie == ("applied", {"by": "zombie"})
    assert adopter == ("already_applied", {"by": "zombie"})
    assert rows(url, schema) == [(1, "zombie")]
    assert marker(url, schema, "k") == (5, 5, "zombie")


def test_adopter_commits_first_then_the_zombie_is_fenced(db: tuple[str, str]) -> None:
    url, schema = db
    adopter, zombie = _second_holder_waits(
        url, schema, Holder("k", 5, 6, "adopter"), Holder("k", 5, 5, "zombie")
    )
    assert adopter == ("applied", {"by": "adopter"})
    assert zombie[0] == "FenceLostError"
    assert rows(url, schema) == [(1, "adopter")]
    assert marker(url, schema, "k") == (5, 6, "adopter")


def test_two_first_holders_of_a_new_key_serialize(db: tuple[str, str]) -> None:
    """No marker row exists yet: the placeholder insert is what makes the second one wait."""
    url, schema = db
    first, second = _second_holder_waits(
        url, schema, Holder("new", 9, 9, "one"), Holder("new", 9, 10, "two")
    )
    assert first == ("applied", {"by": "one"})
    assert second == ("already_applied", {"by": "one"})
    assert rows(url, schema) == [(1, "one")]


# --- ledger=: writes, marker and stamp in one transaction -------------------------------------


def test_one_transaction_stamps_the_ledger_with_the_writes(
    db: tuple[str, str], ledger: PostgresLedger
) -> None:
    url, schema = db
    claim = ledger.claim("k", "run-1")
    with psycopg.connect(url, autocommit=True) as conn:
        with exactly_once(conn, claim, schema=schema, ledger=ledger) as effect:
            conn.execute(f'INSERT INTO "{schema}".invoices VALUES (1, %s)', ("run-1",))  # type: ignore[arg-type]
            effect.result = {"n": 1}
        assert effect.stamp.applied
    entry = ledger.get("k")
    assert entry is not None
    assert (entry.state, entry.fence, entry.result) == (State.SUCCEEDED, claim.fence, {"n": 1})
    assert [e.kind.value for e in ledger.history("k")] == ["claimed", "succeeded"]
    assert ledger.claim("k", "run-2").decision == Decision.SKIPPED_COMPLETED


def test_a_failing_body_leaves_the_claim_in_flight(
    db: tuple[str, str], ledger: PostgresLedger
) -> None:
    url, schema = db
    claim = ledger.claim("k", "run-1")
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(RuntimeError),
        exactly_once(conn, claim, schema=schema, ledger=ledger),
    ):
        conn.execute(f'INSERT INTO "{schema}".invoices VALUES (1, %s)', ("run-1",))  # type: ignore[arg-type]
        raise RuntimeError("the body failed")
    entry = ledger.get("k")
    assert entry is not None and entry.state == State.IN_FLIGHT
    assert rows(url, schema) == []
    assert marker(url, schema, "k") is None


def test_a_refused_stamp_rolls_the_writes_back(
    db: tuple[str, str], ledger: PostgresLedger, clock: Clock
) -> None:
    """The zombie's lease expired and an adopter took the key (same generation, higher fence)
    before the zombie wrote anything: no marker stops it, but the ledger refuses its stamp,
    and with it go its writes and its marker."""
    url, schema = db
    zombie = ledger.claim("k", "zombie")
    clock.now += ledger.config.lease + timedelta(seconds=1)
    adopter = ledger.claim("k", "adopter")
    assert adopter.decision == Decision.ADOPTED_STALE
    assert adopter.generation == zombie.generation and adopter.fence > zombie.fence
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(FenceLostError, match="stale_fence"):
            send(conn, zombie, schema, ledger=ledger)
        assert rows(url, schema) == []
        assert marker(url, schema, "k") is None
        assert send(conn, adopter, schema, ledger=ledger) == (
            False,
            {"invoices": 2, "by": "adopter"},
        )
    entry = ledger.get("k")
    assert entry is not None
    assert (entry.state, entry.run_id, entry.fence) == (State.SUCCEEDED, "adopter", adopter.fence)
    assert rows(url, schema) == [(1, "adopter"), (2, "adopter")]


def test_an_adopter_after_a_separately_stamped_zombie_stamps_the_recorded_result(
    db: tuple[str, str], ledger: PostgresLedger, clock: Clock
) -> None:
    """The zombie committed writes and marker without the ledger (then crashed before its own
    finalize); the adopter applies nothing and stamps what the marker recorded, atomically."""
    url, schema = db
    zombie = ledger.claim("k", "zombie")
    with psycopg.connect(url, autocommit=True) as conn:
        send(conn, zombie, schema)  # no ledger=: the stamp would have been a separate call
        clock.now += ledger.config.lease + timedelta(seconds=1)
        adopter = ledger.claim("k", "adopter")
        assert send(conn, adopter, schema, ledger=ledger) == (
            True,
            {"invoices": 2, "by": "zombie"},
        )
    entry = ledger.get("k")
    assert entry is not None
    assert (entry.state, entry.fence, entry.result) == (
        State.SUCCEEDED,
        adopter.fence,
        {"invoices": 2, "by": "zombie"},
    )
    assert rows(url, schema) == [(1, "zombie"), (2, "zombie")]


def test_a_ledger_in_another_database_is_refused_before_the_body_runs(
    postgres_server: PostgresServer, db: tuple[str, str]
) -> None:
    url, schema = db
    name = f"other{os.getpid()}_{next(_count)}"
    other = postgres_server.create_database(name)
    try:
        with open_ledger(other) as elsewhere:
            claim = elsewhere.claim("k", "run-1")
            ran = []
            with (
                psycopg.connect(url, autocommit=True) as conn,
                pytest.raises(LedgerConfigError, match="is not the ledger's database"),
                exactly_once(conn, claim, schema=schema, ledger=elsewhere),
            ):
                ran.append(True)
            assert ran == []
            entry = elsewhere.get("k")
            assert entry is not None and entry.state == State.IN_FLIGHT
    finally:
        postgres_server.drop_database(name)
    assert marker(url, schema, "k") is None


def test_a_database_without_the_ledgers_tables_is_refused(
    db: tuple[str, str], ledger: PostgresLedger
) -> None:
    url, schema = db
    claim = ledger.claim("k", "run-1")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{ledger.schema}" CASCADE')  # type: ignore[arg-type]
        with (
            pytest.raises(LedgerConfigError, match="has no ledger tables"),
            exactly_once(conn, claim, schema=schema, ledger=ledger),
        ):
            pass


_KILLED_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import psycopg
    from rocky_dagster import exactly_once
    from rocky_dagster.ledger import open_ledger

    spec = json.loads(sys.argv[1])
    ledger = open_ledger(spec["ledger"])

    class Holder:
        key, generation, fence, run_id = spec["key"], spec["generation"], spec["fence"], "w"
        should_run = True

    with psycopg.connect(spec["url"], autocommit=True) as conn:
        with exactly_once(conn, Holder(), schema=spec["schema"], ledger=ledger) as effect:
            conn.execute(f'INSERT INTO "{spec["schema"]}".invoices VALUES (1, %s)', ("w",))
            effect.result = {"n": 1}
            print("written", flush=True)
            time.sleep(600)
    """
)


def test_a_holder_killed_between_its_writes_and_commit_leaves_neither_rows_nor_stamp(
    db: tuple[str, str], postgres_server: PostgresServer
) -> None:
    url, schema = db
    ledger_url = f"{url}?schema={schema}_ledger"
    with open_ledger(ledger_url) as ledger:
        claim = ledger.claim("k", "run-1")
        spec = {
            "url": url,
            "ledger": ledger_url,
            "schema": schema,
            "key": "k",
            "generation": claim.generation,
            "fence": claim.fence,
        }
        worker = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WORKER, json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "written"
        finally:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(30)
        entry = ledger.get("k")
        assert entry is not None and entry.state == State.IN_FLIGHT
        assert rows(url, schema) == []
        assert marker(url, schema, "k") is None
        # the same holder (say, a retry) can still do the work, once
        with psycopg.connect(url, autocommit=True) as conn:
            assert send(conn, claim, schema, ledger=ledger)[0] is False
        entry = ledger.get("k")
        assert entry is not None and entry.state == State.SUCCEEDED
        assert rows(url, schema) == [(1, "run-1"), (2, "run-1")]


# --- the runnable example --------------------------------------------------------------------


def test_the_docs_example_runs(postgres_server: PostgresServer) -> None:
    name = f"example{os.getpid()}_{next(_count)}"
    url = postgres_server.create_database(name)
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "docs" / "exactly_once_postgres.py"), url],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "run-1: ran {'invoices': 2}",
            "run-2: skipped_completed {'invoices': 2}",
            "entry: succeeded",
            "invoices: 2",
        ]
    finally:
        postgres_server.drop_database(name)


# --- finalize_in on its own, and the marker table's creation ----------------------------------


def test_finalize_in_stamps_only_when_the_callers_transaction_commits(
    db: tuple[str, str], ledger: PostgresLedger
) -> None:
    url, _ = db
    claim = ledger.claim("k", "run-1")
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(InvalidArgumentError, match="no open transaction"):
            ledger.finalize_in(conn, "k", claim.fence, "succeeded")
        with conn.transaction() as tx:
            done = ledger.finalize_in(conn, "k", claim.fence, "succeeded", result={"n": 1})
            assert done.applied
            raise psycopg.Rollback(tx)  # the caller changes its mind: nothing is stamped
        entry = ledger.get("k")
        assert entry is not None and entry.state == State.IN_FLIGHT
        with conn.transaction():
            assert ledger.finalize_in(conn, "k", claim.fence, "succeeded").applied
    entry = ledger.get("k")
    assert entry is not None and entry.state == State.SUCCEEDED
    assert [e.kind.value for e in ledger.history("k")] == ["claimed", "succeeded"]


def test_two_sessions_creating_the_marker_table_at_once_both_go_on(db: tuple[str, str]) -> None:
    url, schema = db
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def first_use(n: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                barrier.wait(30)
                with exactly_once(conn, Holder(f"k{n}", 1, 1, "r"), schema=schema) as effect:
                    effect.result = {"n": n}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert [marker(url, schema, f"k{n}") for n in range(4)] == [(1, 1, "r")] * 4
