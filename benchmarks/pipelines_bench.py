"""Throughput of the load and replication pipelines against plain sqlite3 executemany.

Baseline: the same rows inserted with `sqlite3.executemany` in one transaction into an
identically declared table, on a connection opened with the pipelines' own settings (WAL,
busy timeout), reading its input the plain way (csv.reader / a cursor over the source).
Both sides are timed as whole jobs: open, copy, commit, close.
Each step runs --repeat times, alternating baseline and pipeline; the best time counts,
because this machine is shared and noise only ever adds time. Target: ratio >= 0.7.

    .venv/bin/python benchmarks/pipelines_bench.py [--rows 1000000] [--changed 10000] [--repeat 5]
    .venv/bin/python benchmarks/pipelines_bench.py --smoke   # CI: seconds, proves it still runs

--smoke runs every step on a few thousand rows, twice, and does not judge the ratios (at that
size fixed costs dominate them); it fails only if a step fails or counts the wrong rows.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from rocky_dagster.pipelines import LoadPipeline, ReplicationPipeline, connect_warehouse

TARGET_RATIO = 0.7
SMOKE_ROWS, SMOKE_CHANGED, SMOKE_REPEAT = 5_000, 500, 2
COLUMNS = "id INTEGER PRIMARY KEY, customer TEXT, amount REAL, updated_at INTEGER, qty INTEGER"
LOAD_COLUMNS = "id INTEGER, customer TEXT, amount REAL, updated_at INTEGER, qty INTEGER"


def fresh(path: Path) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return str(path)


def best_of(
    repeat: int, baseline: Callable[[], None], pipeline: Callable[[], None]
) -> tuple[float, float]:
    base, pipe = float("inf"), float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        baseline()
        base = min(base, time.perf_counter() - start)
        start = time.perf_counter()
        pipeline()
        pipe = min(pipe, time.perf_counter() - start)
    return base, pipe


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "customer", "amount", "updated_at", "qty"])
        writer.writerows(
            (i, f"customer-{i % 5000}", f"{i * 0.37:.2f}", i, i % 97) for i in range(1, rows + 1)
        )


def write_source(path: Path, rows: int) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"CREATE TABLE orders ({COLUMNS})")
        conn.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
            ((i, f"customer-{i % 5000}", i * 0.37, i, i % 97) for i in range(1, rows + 1)),
        )
        conn.execute("CREATE INDEX orders_updated_at ON orders (updated_at)")
        conn.commit()


def change_source(path: Path, rows: int, changed: int) -> None:
    """Bump `changed` evenly spread rows: new amount and a cursor past the old watermark."""
    step = max(1, rows // changed)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "UPDATE orders SET amount = amount + 1, updated_at = ? + id WHERE id % ? = 0 AND id <= ?",
            (rows, step, step * changed),
        )
        conn.commit()


def bench_load(tmp: Path, rows: int, repeat: int) -> tuple[float, float]:
    inbox = tmp / "inbox"
    inbox.mkdir()
    write_csv(inbox / "orders.csv", rows)

    def baseline() -> None:
        with closing(connect_warehouse(fresh(tmp / "load_base.db"))) as conn:
            conn.execute(f"CREATE TABLE orders ({LOAD_COLUMNS})")
            with (inbox / "orders.csv").open(newline="") as handle:
                reader = csv.reader(handle)
                next(reader)
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", reader)
                conn.execute("COMMIT")

    def pipeline() -> None:
        cfg = LoadPipeline(
            warehouse=fresh(tmp / "load_pipe.db"), directory=str(inbox), table="orders"
        )
        assert cfg.run().rows_changed == rows

    return best_of(repeat, baseline, pipeline)


UPSERT = (
    "INSERT INTO orders VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "customer = excluded.customer, amount = excluded.amount, updated_at = excluded.updated_at, "
    "qty = excluded.qty"
)


def baseline_copy(
    warehouse: str, source: Path, sql: str, select: str, params: tuple[int, ...]
) -> None:
    """A plain replication job: open both databases, executemany in one transaction, close."""
    with closing(connect_warehouse(warehouse)) as conn, closing(sqlite3.connect(source)) as src:
        conn.execute(f"CREATE TABLE IF NOT EXISTS orders ({COLUMNS})")
        conn.execute("BEGIN")
        conn.executemany(sql, src.execute(select, params))
        conn.execute("COMMIT")


def bench_replication(
    tmp: Path, rows: int, changed: int, repeat: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Initial copy of `rows`, then `changed` updated rows; fresh source and warehouse per round."""
    pristine = tmp / "source_v1.db"
    write_source(pristine, rows)
    times: dict[str, list[float]] = {"base0": [], "pipe0": [], "base1": [], "pipe1": []}

    def timed(key: str, job: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        value = job(*args)
        times[key].append(time.perf_counter() - start)
        return value

    insert = "INSERT INTO orders VALUES (?, ?, ?, ?, ?)"
    delta_sql = "SELECT * FROM orders WHERE updated_at > ?"
    for _ in range(repeat):
        source = tmp / "source_base.db"
        shutil.copyfile(pristine, source)
        warehouse = fresh(tmp / "repl_base.db")
        timed("base0", baseline_copy, warehouse, source, insert, "SELECT * FROM orders", ())
        change_source(source, rows, changed)
        timed("base1", baseline_copy, warehouse, source, UPSERT, delta_sql, (rows,))

        source = tmp / "source_pipe.db"
        shutil.copyfile(pristine, source)
        cfg = ReplicationPipeline(
            warehouse=fresh(tmp / "repl_pipe.db"),
            source=str(source),
            strategy="incremental",
            cursor_column="updated_at",
            key_columns=["id"],
        )
        first = timed("pipe0", cfg.run).tables["orders"]
        change_source(source, rows, changed)
        second = timed("pipe1", cfg.run).tables["orders"]
        assert first.rows_inserted == rows, first
        assert (second.rows_inserted, second.rows_updated) == (0, changed), second
    return (
        (min(times["base0"]), min(times["pipe0"])),
        (min(times["base1"]), min(times["pipe1"])),
    )


ASSET_TARGET = 1.05


def bench_asset_path(tmp: Path, rows: int, repeat: int) -> tuple[float, float]:
    """The same load through `pipeline_assets` (materialize) and through `load_op` (a job),
    guarded by one SQLite ledger, in process; a fresh warehouse and key per run. Returns
    (op seconds, asset seconds), each the best of `repeat`."""
    import uuid

    from dagster import DagsterInstance, job, materialize

    from rocky_dagster import IdempotencyLedger
    from rocky_dagster.decorators.pipeline_ops import load_op
    from rocky_dagster.pipelines import pipeline_assets

    drops = tmp / "asset_drops"
    drops.mkdir()
    write_csv(drops / "rows.csv", rows)
    warehouse = tmp / "asset_wh.db"
    config = LoadPipeline(
        warehouse=str(warehouse), directory=str(drops), table="t", create_table=True
    )
    ledger = IdempotencyLedger(url=f"sqlite:///{tmp / 'asset_ledger.db'}")
    op_def = load_op(config, name="load_rows")

    @job(resource_defs={"ledger": ledger})
    def load_job() -> None:
        op_def()

    assets = pipeline_assets(config, name="load_rows_asset")
    instance = DagsterInstance.ephemeral()
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

    def via_op() -> None:
        fresh(warehouse)
        tags = {"rocky/idempotency_key": uuid.uuid4().hex}
        assert load_job.execute_in_process(instance=instance, tags=tags, run_config=quiet).success

    def via_asset() -> None:
        fresh(warehouse)
        tags = {"rocky/idempotency_key": uuid.uuid4().hex}
        result = materialize(
            assets, instance=instance, tags=tags, resources={"ledger": ledger}, run_config=quiet
        )
        assert result.success

    return best_of(repeat, via_op, via_asset)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--asset-rows", type=int, default=200_000, help="rows of the asset path")
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio is below target")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a handful of iterations on {SMOKE_ROWS:,} rows, ratios not judged (for CI)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.changed, args.repeat = SMOKE_ROWS, SMOKE_CHANGED, SMOKE_REPEAT
        args.asset_rows = SMOKE_ROWS
    with tempfile.TemporaryDirectory(prefix="rocky-bench-") as name:
        tmp = Path(name)
        load = bench_load(tmp, args.rows, args.repeat)
        (initial, delta) = bench_replication(tmp, args.rows, args.changed, args.repeat)
        op_s, asset_s = bench_asset_path(tmp, args.asset_rows, args.repeat)
    steps = [
        (f"load CSV, {args.rows:,} rows", args.rows, load),
        (f"replicate incremental, initial {args.rows:,} rows", args.rows, initial),
        (f"replicate incremental, {args.changed:,} changed rows", args.changed, delta),
    ]
    print(
        f"pipelines benchmark: best of {args.repeat}; baseline = plain sqlite3.executemany, one transaction"
    )
    print(
        f"{'step':<46}{'pipeline rows/s':>17}{'baseline rows/s':>17}{'ratio':>8}  target {TARGET_RATIO}x"
    )
    below = False
    for label, rows, (base_s, pipe_s) in steps:
        ratio = base_s / pipe_s
        below |= ratio < TARGET_RATIO
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        if args.smoke:
            verdict = "smoke: not judged"
        print(f"{label:<46}{rows / pipe_s:>17,.0f}{rows / base_s:>17,.0f}{ratio:>7.2f}x  {verdict}")
        print(f"{'':<46}{f'({pipe_s:.3f} s)':>17}{f'({base_s:.3f} s)':>17}")
    ratio = asset_s / op_s
    verdict = (
        "smoke: not judged" if args.smoke else "ok" if ratio <= ASSET_TARGET else "ABOVE TARGET"
    )
    print(
        f"\nthe same guarded load of {args.asset_rows:,} rows through pipeline_assets vs load_op "
        f"(in process, best of {args.repeat}): op {op_s:.3f} s, asset {asset_s:.3f} s"
    )
    print(f"ratio asset/op = {ratio:.3f}  (target <= {ASSET_TARGET})  {verdict}")
    below |= ratio > ASSET_TARGET
    return 1 if below and args.check and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
