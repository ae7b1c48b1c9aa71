"""PostgreSQL ledger benchmark: the cost of a claim+finalize cycle over the two raw statements it
replaces, and claims/s of 8 racing processes on SQLite vs PostgreSQL.

(a) baseline: the same two statements through psycopg, without the ledger: an
    `INSERT … ON CONFLICT DO NOTHING` of a claim row and the `UPDATE` that finalizes it, each
    its own autocommitted transaction, on a table with the entry's columns and primary key;
(b) the ledger's claim + finalize per key (validation, fence sequence, event log included);
    (a) and (b) alternate in chunks on one server (ledger_bench.bench_cycle);
(c) 8 processes claim random keys out of 100 shared ones (winners finalize `failed`, so the
    keys stay contended) — on a SQLite file and on the PostgreSQL server.

By default a throwaway PostgreSQL is started from the local binaries (tests/pg_server.py) with
the server's durable defaults (fsync on); `--url` uses an existing server instead.

    python benchmarks/ledger_bench_pg.py [--url postgresql://…] [--keys 5000] [--fsync off] [--smoke]

The throwaway server's data directory and the SQLite race file are in the temp directory,
whose file system is printed (a tmpfs makes fsync free). `--smoke` runs a handful of
iterations (for CI: proves the benchmark still runs, measures nothing).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from ledger_bench import Baseline, BenchBackend, _us, bench_cycle, describe_filesystem

from rocky_dagster.ledger import Ledger, Outcome, open_ledger
from rocky_dagster.ledger.postgres import PostgresLedger

REPO = Path(__file__).resolve().parents[1]


class PostgresBaseline(Baseline):
    """The ledger's two statements, hand-written: no validation, no fence sequence, no events."""

    def __init__(self, conninfo: str, schema: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.table = f'"{schema}".bench_claims'
        self.conn.execute(
            f"""CREATE TABLE {self.table} (key text PRIMARY KEY, state text NOT NULL,
                run_id text NOT NULL, fence bigint NOT NULL, pipeline text,
                claimed_at timestamptz NOT NULL, heartbeat_at timestamptz NOT NULL,
                lease_expires_at timestamptz NOT NULL, finalized_at timestamptz,
                expires_at timestamptz, dedup_on text NOT NULL)"""  # type: ignore[arg-type]
        )
        self.claim_sql = (
            f"INSERT INTO {self.table} (key, state, run_id, fence, pipeline, claimed_at, "
            "heartbeat_at, lease_expires_at, dedup_on) VALUES (%s, 'in_flight', %s, %s, 'bench', "
            "now(), now(), now() + interval '2 minutes', 'success') ON CONFLICT (key) DO NOTHING "
            "RETURNING fence"
        )
        self.finalize_sql = (
            f"UPDATE {self.table} SET state = 'succeeded', finalized_at = now(), "
            "expires_at = now() + interval '30 days' "
            "WHERE key = %s AND fence = %s AND state = 'in_flight'"
        )

    def cycle(self, key: str, n: int) -> None:
        (fence,) = self.conn.execute(self.claim_sql, (key, "bench-run", n)).fetchone()  # type: ignore[misc]
        self.conn.execute(self.finalize_sql, (key, fence))

    def close(self) -> None:
        self.conn.close()


class PostgresBench(BenchBackend):
    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url
        self.schemas: list[str] = []

    def fresh_url(self, label: str) -> str:
        schema = f"bench_{label.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        self.schemas.append(schema)
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}schema={schema}"

    def baselines(self, ledger: Ledger, label: str) -> dict[str, Baseline]:
        assert isinstance(ledger, PostgresLedger)
        return {"heap table": PostgresBaseline(ledger._conninfo, ledger.schema)}

    def bulk_fill(self, url: str, rows: int) -> None:
        raise NotImplementedError("the rows-in-ledger latency figure is SQLite's (ledger_bench.py)")

    def describe(self, ledger: Ledger) -> str:
        assert isinstance(ledger, PostgresLedger)
        with psycopg.connect(ledger._conninfo) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index,arg-type]
                for name in ("fsync", "synchronous_commit", "full_page_writes")
            }
        described = " ".join(f"{k}={v}" for k, v in settings.items())
        return f"postgresql {version} at {ledger.url} ({described})"

    def cleanup(self) -> None:
        with psycopg.connect(self.url.split("?")[0], autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]


# --- 8 processes racing --------------------------------------------------------------------------


def _racer(url: str, worker: int, claims: int, keys: int, barrier: Any, done: Any) -> None:
    rng = random.Random(worker)
    with open_ledger(url) as ledger:
        ledger.get("warm-up")
        barrier.wait()
        for i in range(claims):
            key = f"key-{rng.randrange(keys)}"
            claim = ledger.claim(key, f"w{worker}-{i}")
            if claim.should_run:
                assert claim.fence is not None
                ledger.finalize(key, claim.fence, Outcome.FAILED)
        done.put(time.perf_counter())


def race(url: str, processes: int, claims: int, keys: int) -> float:
    """Claims per second of `processes` spawned workers, from the common start to the last end."""
    open_ledger(url).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    done = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(url, i, claims, keys, barrier, done))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    ends = [done.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"racer exited with {p.exitcode}")
    return processes * claims / (max(ends) - start)


# --- main ------------------------------------------------------------------------------------------

SMOKE = {"keys": 40, "chunk": 10, "processes": 2, "claims": 20, "race_keys": 10}
"""--smoke: a handful of iterations, enough to prove every figure still runs."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing server (default: start a throwaway one)")
    parser.add_argument("--fsync", choices=("on", "off"), default="on", help="throwaway server")
    parser.add_argument("--keys", type=int, default=5_000, help="keys per cycle figure")
    parser.add_argument("--chunk", type=int, default=250, help="keys per interleaved chunk")
    parser.add_argument("--processes", type=int, default=8, help="racing processes")
    parser.add_argument("--claims", type=int, default=500, help="claims per racing process")
    parser.add_argument("--race-keys", type=int, default=100, help="keys the racers share")
    parser.add_argument("--smoke", action="store_true", help="a handful of iterations (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    server = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(REPO / "tests"))
        import pg_server

        bindir = pg_server.find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL binaries found; pass --url postgresql://…")
        settings = dict(pg_server.DEFAULT_SETTINGS)
        if args.fsync == "off":
            settings = dict(pg_server.FAST_SETTINGS)
        server = pg_server.PostgresServer(bindir, settings=settings).start()
        url = server.url("postgres")
        print(f"server data file system: {describe_filesystem(server.datadir)}")
    backend = PostgresBench(url)
    sqlite_dir = Path(tempfile.mkdtemp(prefix="ledger-bench-pg-"))
    print(f"sqlite race file system: {describe_filesystem(sqlite_dir)}")
    try:
        baselines, cycle = bench_cycle(backend, args.keys, args.chunk)
        baseline = min(baselines.values())
        print(f"pg baseline 2 raw statements/key:     {_us(baseline)}/key over {args.keys} keys")
        print(f"pg ledger claim+finalize cycle:       {_us(cycle)}/key over {args.keys} keys")
        print(f"ratio pg cycle/baseline = {cycle / baseline:.2f}")

        shape = f"{args.processes} processes x {args.claims} claims over {args.race_keys} keys"
        sqlite_rate = race(
            f"sqlite:///{sqlite_dir / 'race.db'}", args.processes, args.claims, args.race_keys
        )
        print(f"race sqlite:     {sqlite_rate:8.0f} claims/s ({shape})")
        pg_rate = race(backend.fresh_url("race"), args.processes, args.claims, args.race_keys)
        print(f"race postgresql: {pg_rate:8.0f} claims/s ({shape})")
        print(f"ratio race pg/sqlite = {pg_rate / sqlite_rate:.2f}")
        if args.smoke:
            print("(smoke run: a handful of iterations; the ratios above mean nothing)")
    finally:
        shutil.rmtree(sqlite_dir, ignore_errors=True)
        backend.cleanup()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
