"""Ledger benchmark: what exactly-once costs over the store's own minimum, and how it scales.

Figures, in one run on one file system with the ledger's own pragmas:

(a) baseline: two plain write transactions per key on a hand-rolled claim table with the
    entry's columns (insert-if-absent, then update) — the least any durable
    claim-then-finalize scheme can do, without validation, fences or an event log. Two
    layouts of that table run side by side, a rowid table with a text primary key and a
    WITHOUT ROWID table (the ledger's), and the cheaper one of this run is the baseline;
(b) the ledger's claim + finalize cycle per key, in time and (SQLite) in pages: the frames
    its WAL grows by over 60 cycles of new keys on a 2 000-key ledger, against the same count
    for each raw baseline (every page a commit dirties is a frame written and fsynced), once
    with new keys sorting after the old ones (dated keys) and once with random keys (hashes);
(c) claim latency (p50/p99) with 1 000 vs 1 000 000 rows already in the ledger;
(d) sweep of 100 expired entries (spread over the keys) among those 1 000 vs 1 000 000 rows,
    after a checkpoint, median of 5 rounds (it must cost what it deletes, not the ledger's size).

(a) and (b) run interleaved in chunks, and (c) alternates its two ledgers claim by claim,
so background noise (other processes, fsync jitter) lands on both sides of each ratio. The
file system of the scratch directory is printed: on a tmpfs fsync is free and every ratio
looks better than on a disk.

    python benchmarks/ledger_bench.py [--backend sqlite] [--dir DIR] [--keys 20000] [--smoke]

`--smoke` runs a handful of iterations (for CI: proves the benchmark still runs, measures
nothing).

A backend is a `BenchBackend` (fresh ledger URL, raw baseline writer, bulk fill) registered
in `BACKENDS`; adding PostgreSQL means one class that reads `--url`.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rocky_dagster.ledger import Ledger, Outcome, open_ledger
from rocky_dagster.ledger.sqlite import ENTRIES, EVENTS, META, SQLiteLedger

# The pragmas copied from the ledger's connection onto the baseline's, so both pay the same.
_PRAGMAS = (
    "journal_mode",
    "synchronous",
    "busy_timeout",
    "page_size",
    "cache_size",
    "mmap_size",
    "wal_autocheckpoint",
)


class Baseline(ABC):
    """A raw writer doing the minimum per key: insert-if-absent, then update, each committed."""

    @abstractmethod
    def cycle(self, key: str, n: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class BenchBackend(ABC):
    """What the benchmark needs from a store."""

    name: str

    @abstractmethod
    def fresh_url(self, label: str) -> str:
        """The URL of a new, empty ledger."""

    @abstractmethod
    def baselines(self, ledger: Ledger, label: str) -> dict[str, Baseline]:
        """Raw baseline writers (by layout name) with the same settings as `ledger`'s
        connection; the cheapest of them in a run is that run's baseline."""

    @abstractmethod
    def bulk_fill(self, url: str, rows: int) -> None:
        """Put `rows` finalized entries (and their two events each) into the ledger, by SQL."""

    def describe(self, ledger: Ledger) -> str:
        return ""

    def filesystem(self) -> str | None:
        """The file system the store writes to (a local store only), for the reader to judge."""
        return None

    def pages_per_cycle(
        self, rows: int, cycles: int, *, shuffled: bool = False
    ) -> dict[str, float] | None:
        """Pages written per claim+finalize cycle by the ledger and by each raw baseline (by
        name), after `rows` keys; None where the store has no such count."""
        return None

    def add_expired(self, url: str, rows: int, among: int, label: str) -> None:
        """Insert `rows` entries past retention between the `among` filled keys, then settle the store (a checkpoint), so that
        the sweep timed next pays for what it deletes and not for earlier writes."""
        raise NotImplementedError(f"no sweep figure for {self.name}")

    def scan_seconds(self, url: str) -> float:
        raise NotImplementedError(f"no sweep figure for {self.name}")

    def cleanup(self) -> None:
        return None


def describe_filesystem(directory: Path) -> str:
    """The type and device of the mount holding `directory`, from /proc/mounts (`stat -f`
    where there is none), with a warning for memory-backed ones."""
    target = directory.resolve()
    fstype, where = "unknown", ""
    best = -1
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                device, point, kind = line.split()[:3]
                point = point.replace("\\040", " ")
                holds = target == Path(point) or Path(point) in target.parents
                if holds and len(point) >= best:  # the innermost (last, if stacked) mount
                    best, fstype, where = len(point), kind, f" ({device} mounted at {point})"
    except OSError:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            fstype = subprocess.run(
                ["stat", "-f", "-c", "%T", str(target)], capture_output=True, text=True, check=True
            ).stdout.strip()
    text = f"{target} is on {fstype}{where}"
    if fstype in ("tmpfs", "ramfs"):
        text += " -- WARNING: memory-backed, fsync is free, every ratio is flattered"
    return text


class SQLiteBaseline(Baseline):
    """A hand-rolled claim table: the ledger entry's columns, no events, no fence counter.

    `layout` is "" (a rowid table plus its text primary key's index) or "WITHOUT ROWID" (one
    key-ordered B-tree, as the ledger's entries); which is cheaper depends on the key order
    and the file system, so the benchmark measures both.
    """

    def __init__(self, path: Path, pragmas: dict[str, object], layout: str = "") -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        pragmas = dict(pragmas)
        page_size = pragmas.pop("page_size", None)
        if page_size is not None:
            self.conn.execute(f"PRAGMA page_size = {page_size}")  # before the file has pages
        for name, value in pragmas.items():
            self.conn.execute(f"PRAGMA {name} = {value}").fetchall()
        self.conn.execute(
            "CREATE TABLE claims (key TEXT PRIMARY KEY, state TEXT NOT NULL, run_id TEXT NOT NULL, "
            "fence INTEGER NOT NULL, pipeline TEXT, claimed_at TEXT NOT NULL, "
            "heartbeat_at TEXT NOT NULL, lease_expires_at TEXT NOT NULL, finalized_at TEXT, "
            f"expires_at TEXT, dedup_on TEXT NOT NULL) {layout}"
        )

    def cycle(self, key: str, n: int) -> None:
        execute = self.conn.execute
        now = datetime.now(UTC)
        stamp = now.isoformat()
        execute("BEGIN IMMEDIATE")
        execute(
            "INSERT INTO claims (key, state, run_id, fence, pipeline, claimed_at, heartbeat_at, "
            "lease_expires_at, dedup_on) VALUES (?, 'in_flight', ?, ?, ?, ?, ?, ?, 'success') "
            "ON CONFLICT (key) DO NOTHING",
            (key, "bench-run", n, "bench", stamp, stamp, (now + _LEASE).isoformat()),
        )
        execute("COMMIT")
        now = datetime.now(UTC)
        execute("BEGIN IMMEDIATE")
        execute(
            "UPDATE claims SET state = 'succeeded', finalized_at = ?, expires_at = ? WHERE key = ?",
            (now.isoformat(), (now + _RETENTION).isoformat(), key),
        )
        execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


_LEASE = timedelta(minutes=2)
_RETENTION = timedelta(days=30)


class SQLiteBench(BenchBackend):
    name = "sqlite"

    def __init__(self, directory: str | None) -> None:
        self._own = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="ledger-bench-"))
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, label: str) -> Path:
        path = self.dir / f"{label}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return path

    def fresh_url(self, label: str) -> str:
        return f"sqlite:///{self._path(label)}"

    def _pragmas(self, ledger: Ledger) -> dict[str, object]:
        assert isinstance(ledger, SQLiteLedger)
        conn = ledger._connection()
        return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in _PRAGMAS}

    def describe(self, ledger: Ledger) -> str:
        pragmas = " ".join(f"{k}={v}" for k, v in self._pragmas(ledger).items())
        return f"sqlite {sqlite3.sqlite_version} in {self.dir} ({pragmas})"

    def baselines(self, ledger: Ledger, label: str) -> dict[str, Baseline]:
        pragmas = self._pragmas(ledger)
        return {
            "rowid table": SQLiteBaseline(self._path(f"{label}-rowid"), pragmas),
            "WITHOUT ROWID": SQLiteBaseline(
                self._path(f"{label}-without-rowid"), pragmas, "WITHOUT ROWID"
            ),
        }

    def filesystem(self) -> str:
        return describe_filesystem(self.dir)

    def pages_per_cycle(
        self, rows: int, cycles: int, *, shuffled: bool = False
    ) -> dict[str, float]:
        """WAL frames appended per cycle, after a checkpoint, each store filled by its own
        writes with `rows` keys first; new keys sort after the old ones (as dated keys do), or
        with `shuffled` land anywhere among them (as hashes do: inserts split inner pages)."""
        label = "pages-shuffled" if shuffled else "pages"
        url = self.fresh_url(label)
        ledger = open_ledger(url)
        fill = [f"job/{i:08d}" for i in range(rows)]
        new = [f"new/{i:08d}" for i in range(cycles)]
        if shuffled:
            draw = random.Random(7)  # the same keys every run: the count is deterministic
            fill = [f"{draw.getrandbits(64):016x}" for _ in range(rows)]
            new = [f"{draw.getrandbits(64):016x}" for _ in range(cycles)]

        def ledger_cycle(key: str, n: int) -> None:
            claim = ledger.claim(key, "bench-run", pipeline="bench")
            ledger.finalize(key, claim.fence or 0, Outcome.SUCCEEDED)

        writers: dict[str, tuple[Callable[[str, int], None], sqlite3.Connection, Path]] = {
            "ledger": (ledger_cycle, ledger._connection(), Path(url.removeprefix("sqlite:///")))  # type: ignore[attr-defined]
        }
        raws = self.baselines(ledger, f"{label}-baseline")
        for name, raw in raws.items():
            assert isinstance(raw, SQLiteBaseline)
            writers[f"baseline, {name}"] = (raw.cycle, raw.conn, raw.path)
        pages: dict[str, float] = {}
        try:
            for name, (cycle, conn, path) in writers.items():
                for n, key in enumerate(fill):
                    cycle(key, n)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                frame = conn.execute("PRAGMA page_size").fetchone()[0] + 24
                wal = Path(f"{path}-wal")
                before = max(wal.stat().st_size - 32, 0) if wal.exists() else 0
                for n, key in enumerate(new, rows):
                    cycle(key, n)
                pages[name] = (wal.stat().st_size - 32 - before) / frame / cycles
        finally:
            for raw in raws.values():
                raw.close()
            ledger.close()
        return pages

    def add_expired(self, url: str, rows: int, among: int, label: str) -> None:
        """`rows` succeeded entries whose retention ended a day ago, spread over the key space."""
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        past = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        conn.executemany(
            f"INSERT INTO {ENTRIES} (key, state, run_id, fence, claimed_at, heartbeat_at, "
            "lease_expires_at, finalized_at, expires_at, dedup_on) "
            "VALUES (?, 'succeeded', 'old-run', 1, ?, ?, ?, ?, ?, 'success')",
            [
                (f"job/{i * among // rows:08d}/expired-{label}", past, past, past, past, past)
                for i in range(rows)
            ],
        )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def scan_seconds(self, url: str) -> float:
        """For scale: one read of every entry, what a sweep without an index would pay."""
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        start = time.perf_counter()
        conn.execute(f"SELECT count(*) FROM {ENTRIES} WHERE expires_at <= ''").fetchall()
        seconds = time.perf_counter() - start
        conn.close()
        return seconds

    def bulk_fill(self, url: str, rows: int) -> None:
        open_ledger(url).close()  # the schema, exactly as the ledger creates it
        path = url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA synchronous = OFF")
        now = datetime.now(UTC)
        ts = lambda d: d.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"  # noqa: E731
        claimed, expires = ts(now - timedelta(hours=1)), ts(now + timedelta(days=30))
        conn.execute("BEGIN")
        conn.execute(
            f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
                INSERT INTO {ENTRIES} (key, state, run_id, fence, pipeline, fingerprint,
                    claimed_at, heartbeat_at, lease_expires_at, finalized_at, expires_at,
                    dedup_on, result, prior_run_id, last_event)
                SELECT printf('job/%08d', i), 'succeeded', printf('run-%06d', i / 10), i,
                    'bench', NULL, :claimed, :claimed, :claimed, :claimed, :expires, 'success',
                    '{{"rows":1}}', NULL, 2 * i FROM n""",
            {"rows": rows, "claimed": claimed, "expires": expires},
        )
        conn.execute(
            f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
                INSERT INTO {EVENTS} (id, key, kind, run_id, fence, at, detail, prev_id)
                SELECT i, printf('job/%08d', (i + 1) / 2), CASE i % 2 WHEN 1 THEN 'claimed'
                    ELSE 'succeeded' END, printf('run-%06d', (i + 1) / 20), (i + 1) / 2,
                    :claimed, NULL, CASE i % 2 WHEN 0 THEN i - 1 END
                FROM n""",
            {"rows": 2 * rows, "claimed": claimed},
        )
        conn.execute(f"UPDATE {META} SET value = ? WHERE name = 'last_fence'", (rows,))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def cleanup(self) -> None:
        if self._own:
            shutil.rmtree(self.dir, ignore_errors=True)


BACKENDS: dict[str, Callable[[argparse.Namespace], BenchBackend]] = {
    "sqlite": lambda args: SQLiteBench(args.dir),
}


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def bench_cycle(backend: BenchBackend, keys: int, chunk: int) -> tuple[dict[str, float], float]:
    """Seconds per key of each raw baseline and of claim+finalize, measured in alternating
    chunks (the baselines' order alternates too)."""
    ledger = open_ledger(backend.fresh_url("cycle"))
    raws = backend.baselines(ledger, "baseline")
    print(f"store: {backend.describe(ledger)}")
    spent = dict.fromkeys(raws, 0.0)
    spent_ledger = 0.0
    done = 0
    try:
        while done < keys:
            batch = [f"cycle/{done + i:08d}" for i in range(min(chunk, keys - done))]
            names = list(raws) if (done // chunk) % 2 == 0 else list(reversed(raws))
            for name in names:
                start = time.perf_counter()
                for n, key in enumerate(batch, done):
                    raws[name].cycle(key, n)
                spent[name] += time.perf_counter() - start
            start = time.perf_counter()
            for key in batch:
                claim = ledger.claim(key, "bench-run", pipeline="bench")
                ledger.finalize(key, claim.fence or 0, Outcome.SUCCEEDED)
            spent_ledger += time.perf_counter() - start
            done += len(batch)
    finally:
        for raw in raws.values():
            raw.close()
        ledger.close()
    return {name: t / keys for name, t in spent.items()}, spent_ledger / keys


def bench_latency(
    backend: BenchBackend,
    small: int,
    large: int,
    samples: int,
    expired: int = 100,
    sweep_rounds: int = 5,
) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Per-claim latencies of new keys landing at random places among `small` / `large` rows,
    then the median seconds a sweep of `expired` entries (spread over the keys) takes among
    each, over `sweep_rounds` rounds."""
    ledgers: dict[int, Ledger] = {}
    urls: dict[int, str] = {}
    for rows in (small, large):
        url = urls[rows] = backend.fresh_url(f"rows-{rows}")
        start = time.perf_counter()
        backend.bulk_fill(url, rows)
        print(f"filled {rows} rows (+{2 * rows} events) in {time.perf_counter() - start:.1f} s")
        ledgers[rows] = open_ledger(url)
    latencies: dict[int, list[float]] = {rows: [] for rows in ledgers}
    rng = random.Random(7)
    try:
        for i in range(samples):
            order = [small, large] if i % 2 == 0 else [large, small]
            for rows in order:
                key = f"job/{rng.randrange(rows):08d}/probe-{i}"
                start = time.perf_counter()
                ledgers[rows].claim(key, f"probe-run-{i}", pipeline="bench")
                latencies[rows].append(time.perf_counter() - start)
        spent: dict[int, list[float]] = {rows: [] for rows in ledgers}
        for i in range(sweep_rounds):
            for rows, ledger in ledgers.items():
                backend.add_expired(urls[rows], expired, rows, f"{i}")
                start = time.perf_counter()
                swept = ledger.sweep()
                spent[rows].append(time.perf_counter() - start)
                assert swept == expired, f"sweep removed {swept} entries, expected {expired}"
        for rows in ledgers:
            scan = backend.scan_seconds(urls[rows])
            print(f"for scale: one scan of all {rows} entries (no index) takes {_us(scan)}")
    finally:
        for ledger in ledgers.values():
            ledger.close()
    return latencies, {rows: statistics.median(values) for rows, values in spent.items()}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


PAGES_ROWS = 2_000
PAGES_CYCLES = 60

SMOKE = {"keys": 40, "chunk": 10, "small": 100, "large": 2_000, "samples": 40}
"""--smoke: a handful of iterations, enough to prove every figure still runs."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="sqlite")
    parser.add_argument("--dir", help="sqlite: directory for the files (default: a temp dir)")
    parser.add_argument("--url", help="server backends (postgres, to come): the database URL")
    parser.add_argument("--keys", type=int, default=20_000, help="keys per cycle figure")
    parser.add_argument("--chunk", type=int, default=20, help="keys per interleaved chunk")
    parser.add_argument("--small", type=int, default=1_000, help="rows in the small ledger")
    parser.add_argument("--large", type=int, default=1_000_000, help="rows in the large ledger")
    parser.add_argument("--samples", type=int, default=5_000, help="timed claims per ledger")
    parser.add_argument("--smoke", action="store_true", help="a handful of iterations (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    backend = BACKENDS[args.backend](args)
    try:
        filesystem = backend.filesystem()
        if filesystem:
            print(f"scratch file system: {filesystem}")
        baselines, cycle = bench_cycle(backend, args.keys, args.chunk)
        for name, seconds in baselines.items():
            print(f"baseline 2 raw write transactions/key, {name}: {_us(seconds)}/key")
        cheapest = min(baselines, key=lambda name: baselines[name])
        baseline = baselines[cheapest]
        print(f"baseline (the cheaper, {cheapest}):           {_us(baseline)}/key")
        print(
            f"ledger claim+finalize cycle:                  {_us(cycle)}/key over {args.keys} keys"
        )
        pages = backend.pages_per_cycle(PAGES_ROWS, PAGES_CYCLES)
        shuffled = backend.pages_per_cycle(PAGES_ROWS, PAGES_CYCLES, shuffled=True)
        if pages is not None and shuffled is not None:
            for name, count in pages.items():
                print(f"pages per cycle, {name}: {count:.2f} (new keys after {PAGES_ROWS} keys)")
            for name, count in shuffled.items():
                print(
                    f"pages per cycle, {name}: {count:.2f} "
                    f"(random keys among {PAGES_ROWS} random keys)"
                )
        latencies, sweeps = bench_latency(backend, args.small, args.large, args.samples)
        p99 = {}
        for rows, values in latencies.items():
            p99[rows] = _pct(values, 99)
            print(
                f"claim latency with {rows} rows: p50 {_us(_pct(values, 50))}, "
                f"p99 {_us(p99[rows])} over {len(values)} claims"
            )
        for rows, seconds in sweeps.items():
            print(f"sweep of 100 expired entries among {rows} rows: {_us(seconds)} (median of 5)")
        label = "1M/1k" if (args.small, args.large) == (1_000, 1_000_000) else "large/small"
        print(f"ratio cycle/baseline = {cycle / baseline:.2f}")
        if pages is not None and shuffled is not None:
            print(f"pages per cycle = {pages['ledger']:.2f}")
            print(f"pages per cycle, random keys = {shuffled['ledger']:.2f}")
        print(f"ratio p99 {label} = {p99[args.large] / p99[args.small]:.2f}")
        print(f"ratio sweep {label} = {sweeps[args.large] / sweeps[args.small]:.2f}")
        if args.smoke:
            print("(smoke run: a handful of iterations; the ratios above mean nothing)")
    finally:
        backend.cleanup()


if __name__ == "__main__":
    main()
