"""What guarding costs a Dagster run: the same job of N trivial ops, plain vs guarded.

All jobs run with ``execute_in_process`` on one instance, in alternating order so background
noise lands on every side, each run under a fresh key (so every guarded op claims, heartbeats
and stamps its success: the full path, never a cheap skip). The guarded job is a `ledger_job`
(ledger hooks attached) on a real SQLite ledger file (WAL, ``synchronous=FULL``).

    python benchmarks/dagster_overhead.py [--ops 20] [--pairs 15] [--persistent] [--dir DIR]

Prints per-run medians of wall-clock and CPU time and ``ratio guarded/plain = X.XX`` (the target
is <= 1.10 at 20 ops). Two reference jobs split the overhead into what the requirements make
unavoidable and what the layer adds on top:

- "plain + UI writes" does what the layer asks of Dagster per op without a ledger: one decision
  log line, one run-tag write (``instance.add_run_tags``), the ledger hook attached (one hook
  event per step).
- "floor" adds to that the two durable commits a durable ledger needs per op (the claim before
  the work, the stamp after it) as bare SQLite ``BEGIN IMMEDIATE`` / ``INSERT`` / ``COMMIT``
  transactions with ``synchronous=FULL`` in the ledger's directory: the cheapest any
  implementation meeting the requirements could be, on this machine and disk.

CPU time (``time.process_time``: this process, all threads) does not count the time waiting for
fsync, and neither does it count the time other processes take the CPU away: on a shared
machine it is the steadier measure of the Python work, and wall time minus CPU time shows what
the disk costs. ``--persistent`` uses a SQLite-backed instance in a temp DAGSTER_HOME instead of
the in-memory one (a slower Dagster, so a smaller ratio); ``--dir`` puts the ledger elsewhere
(``/dev/shm`` shows the ledger without fsync costs).
"""

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster import (
    DagsterInstance,
    JobDefinition,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_hooks, ledger_job
from rocky_dagster.keys import KEY_TAG, decision_tag

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
NAMES = {
    "plain": "plain",
    "plain_ui": "plain + UI writes",
    "floor": "floor (+2 fsynced commits)",
    "guarded": "guarded",
}
SPLIT_NAMES = {
    "tag_only": "plain + run tag",
    "log_only": "plain + log line",
    "hook_only": "plain + hook",
}
NOTES = {
    "plain_ui": "log line, run tag, hook event",
    "floor": "+ 2 durable commits per op",
    "tag_only": "one instance.add_run_tags per op",
    "log_only": "one context.log.info per op",
    "hook_only": "ledger hook attached (one hook event per op)",
}


class DurableCommits:
    """Two bare durable SQLite commits per op: what any durable ledger pays at least."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS stamps (key TEXT PRIMARY KEY, state TEXT)")
        self.lock = threading.Lock()

    def commit(self, key: str, state: str) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO stamps VALUES (?, ?)", (key, state))
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def build_jobs(
    n: int, ledger_url: str, commits: DurableCommits, split: bool = False
) -> dict[str, JobDefinition]:
    """The same graph several times: N independent ops returning a small summary."""

    def body(context: OpExecutionContext) -> dict[str, int]:
        return {"rows": 1}

    def ui_writes(context: OpExecutionContext) -> str:
        step = context.get_step_execution_context().step.key
        context.instance.add_run_tags(context.run_id, {decision_tag(step): "proceed"})
        context.log.info(f"decision for {step}: proceed")
        return step

    def ui_body(context: OpExecutionContext) -> dict[str, int]:
        ui_writes(context)
        return {"rows": 1}

    def tag_body(context: OpExecutionContext) -> dict[str, int]:
        step = context.get_step_execution_context().step.key
        context.instance.add_run_tags(context.run_id, {decision_tag(step): "proceed"})
        return {"rows": 1}

    def log_body(context: OpExecutionContext) -> dict[str, int]:
        context.log.info(f"decision for {context.get_step_execution_context().step.key}: proceed")
        return {"rows": 1}

    def floor_body(context: OpExecutionContext) -> dict[str, int]:
        key = f"{context.run_id}/{context.get_step_execution_context().step.key}"
        commits.commit(key, "in_flight")
        ui_writes(context)
        commits.commit(key, "succeeded")
        return {"rows": 1}

    def compose(ops: list[Any]) -> Callable[[], None]:
        def graph() -> None:
            for each in ops:
                each()

        return graph

    def plain_job(name: str, fn: Callable[..., Any], hooks: bool) -> JobDefinition:
        ops = [op(name=f"step_{i}")(fn) for i in range(n)]
        return job(
            name=name,
            executor_def=in_process_executor,
            hooks=set(ledger_hooks) if hooks else None,
        )(compose(ops))

    guarded = ledger_job(
        compose([idempotent_op(name=f"step_{i}")(body) for i in range(n)]),
        name="guarded",
        ledger=IdempotencyLedger(url=ledger_url),
        executor_def=in_process_executor,
    )
    jobs = {
        "plain": plain_job("plain", body, hooks=False),
        "plain_ui": plain_job("plain_ui", ui_body, hooks=True),
        "floor": plain_job("floor", floor_body, hooks=True),
        "guarded": guarded,
    }
    if split:
        jobs["tag_only"] = plain_job("tag_only", tag_body, hooks=False)
        jobs["log_only"] = plain_job("log_only", log_body, hooks=False)
        jobs["hook_only"] = plain_job("hook_only", body, hooks=True)
    return jobs


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not result.success:
        raise SystemExit("a benchmark run failed")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=15, help="rounds of alternating runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--dir", help="directory for the ledger (default: a temp dir)")
    parser.add_argument(
        "--split",
        action="store_true",
        help="also time each required Dagster write on its own (run tag, log line, hook)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rocky-dagster-bench-", dir=args.dir) as scratch:
        ledger_url = f"sqlite:///{Path(scratch) / 'ledger.db'}"
        if args.persistent:
            home = Path(scratch) / "dagster_home"
            home.mkdir()
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            os.environ["DAGSTER_HOME"] = str(home)
            instance = DagsterInstance.get()
        else:
            instance = DagsterInstance.ephemeral()
        commits = DurableCommits(Path(scratch) / "floor.db")
        jobs = build_jobs(args.ops, ledger_url, commits, split=args.split)
        counter = iter(range(10**9))

        def run(job_def: JobDefinition) -> Any:
            # every job gets a fresh key tag: only the guarded job reads it (and then proceeds)
            return job_def.execute_in_process(
                instance=instance, tags={KEY_TAG: f"bench-{next(counter)}"}, run_config=QUIET
            )

        order = list(jobs.values())
        for _ in range(args.warmup):
            for job_def in order:
                timed(lambda job_def=job_def: run(job_def))
        walls: dict[str, list[float]] = {name: [] for name in jobs}
        cpus: dict[str, list[float]] = {name: [] for name in jobs}
        for i in range(args.pairs):
            for job_def in order if i % 2 == 0 else order[::-1]:
                wall, cpu = timed(lambda job_def=job_def: run(job_def))
                walls[job_def.name].append(wall)
                cpus[job_def.name].append(cpu)
        commits.close()

    w = {name: statistics.median(v) for name, v in walls.items()}
    c = {name: statistics.median(v) for name, v in cpus.items()}
    m = {name: min(v) for name, v in walls.items()}
    kind = "persistent (SQLite) instance" if args.persistent else "in-memory instance"
    print(f"{args.ops} ops, {args.pairs} alternating rounds, {kind}, ledger on {scratch}")
    per_op = 1000 / args.ops
    print(
        f"{'ms/run':27s} {'median wall':>11s} {'median cpu':>10s} {'min wall':>9s}"
        "   median per op vs plain (wall / cpu)"
    )
    for name, label in {**NAMES, **(SPLIT_NAMES if args.split else {})}.items():
        line = f"{label:27s} {w[name] * 1000:11.1f} {c[name] * 1000:10.1f} {m[name] * 1000:9.1f}"
        if name != "plain":
            line += (
                f"   {(w[name] - w['plain']) * per_op:+.2f} / {(c[name] - c['plain']) * per_op:+.2f}"
                f" ms/op  {NOTES.get(name, '')}"
            )
        print(line)
    print(
        f"the layer's own share (guarded - floor): {(w['guarded'] - w['floor']) * per_op:+.2f} "
        f"ms/op wall, {(c['guarded'] - c['floor']) * per_op:+.2f} ms/op cpu, "
        f"{(m['guarded'] - m['floor']) * per_op:+.2f} ms/op min wall"
    )

    def ratio(label: str, a: str, b: str) -> None:
        print(
            f"ratio {label} = {w[a] / w[b]:.2f} (median cpu {c[a] / c[b]:.2f}, "
            f"min wall {m[a] / m[b]:.2f})"
        )

    ratio("floor/plain", "floor", "plain")
    ratio("guarded/floor", "guarded", "floor")
    ratio("guarded/(plain + UI writes)", "guarded", "plain_ui")
    ratio("guarded/plain", "guarded", "plain")


if __name__ == "__main__":
    main()
