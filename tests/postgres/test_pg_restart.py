"""The server restarts (`pg_ctl restart -m fast`) while processes are claiming: no claim is lost
or duplicated, callers see `LedgerUnavailableError` or a correct decision, and every process's
pool recovers. The test has a server of its own, so restarting it disturbs no other test."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator

import pg_server
import pytest
import restart_worker

from rocky_dagster.ledger import LedgerUnavailableError, open_ledger
from rocky_dagster.ledger.postgres import PostgresLedger

PROCESSES = 6
KEYS = 30
AFTER = 40


@pytest.fixture(scope="module")
def own_server(postgres_server: pg_server.PostgresServer) -> Iterator[pg_server.PostgresServer]:
    server = pg_server.PostgresServer(postgres_server.bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_restart_while_claims_are_in_flight(own_server, tmp_path):
    url = own_server.url("postgres", schema="restart")
    with open_ledger(url):
        pass
    ctx = multiprocessing.get_context("spawn")
    warmed = ctx.Value("i", 0)
    restarted = ctx.Event()
    outs = [tmp_path / f"worker-{i}.json" for i in range(PROCESSES)]
    procs = [
        ctx.Process(
            target=restart_worker.through_restart,
            args=(url, i, KEYS, warmed, restarted, AFTER, str(outs[i])),
        )
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    while warmed.value < PROCESSES:  # every worker is claiming (and has pooled connections)
        assert time.monotonic() < deadline, "workers never got going"
        assert all(p.is_alive() for p in procs)
        time.sleep(0.05)
    pid_before = own_server.postmaster_pid()
    restart_started = time.time()
    own_server.restart("fast")
    restart_ended = time.time()
    restarted.set()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert own_server.postmaster_pid() != pid_before

    records = restart_worker.load(outs)
    errors = Counter(
        r[k]
        for r in records
        for k in ("claim_error", "heartbeat_error", "finalize_error")
        if k in r
    )
    # callers saw either a decision or the ledger's own "unavailable" error, nothing else
    assert set(errors) <= {LedgerUnavailableError.__name__}, errors
    assert all("no work was done" in r["claim_error_text"] for r in records if "claim_error" in r)
    # claims were really in flight when the server went down
    assert any(r["start"] < restart_ended and r["end"] > restart_started for r in records)
    # every process recovered: all its claims after the restart got answers
    after = [r for r in records if r["after_restart"]]
    assert len(after) == PROCESSES * AFTER
    assert [r for r in after if "claim_error" in r or "finalize_error" in r] == []

    with open_ledger(url) as ledger:
        replay = restart_worker.replay_events(ledger, [f"key-{k}" for k in range(KEYS)])
        assert replay.problems == []
        assert restart_worker.compare_with_log(ledger, records) == []
        assert ledger.stats().in_flight == 0


def test_a_ledger_survives_a_restart_between_calls(own_server):
    url = own_server.url("postgres", schema="between")
    with PostgresLedger(url) as ledger:
        first = ledger.claim("k", "run-A")
        own_server.restart("fast")
        # every pooled connection is dead now; the call is retried once on a fresh one
        done = ledger.finalize("k", first.fence, "succeeded")
        assert done.applied
        assert ledger.claim("k", "run-B").decision.value == "skipped_completed"
