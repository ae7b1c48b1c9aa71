"""What guarding costs a Dagster run: the same job, plain vs guarded, in three scenarios.

    python benchmarks/dagster_overhead.py                           # trivial + sleeping ops
    python benchmarks/dagster_overhead.py --executor multiprocess   # 5 ops, one process each
    python benchmarks/dagster_overhead.py --smoke                   # a few runs of all three (CI)

Scenarios (each prints ``ratio guarded/plain = X.XX`` and its target):

- **trivial**: 20 ops returning a small dict, in-process executor, in-memory instance: the
  layer's cost laid bare (target <= 1.25). Two reference jobs explain the figure: "floor" is
  the plain job plus the two durable commits any durable ledger needs per op (the claim before
  the work, the stamp after it: bare SQLite ``BEGIN IMMEDIATE`` / ``INSERT`` / ``COMMIT`` with
  ``synchronous=FULL`` beside the ledger), and "guarded + hooks" attaches the ledger's
  optional backstop hook (what ``ledger_job`` no longer does by default).
- **sleeping**: the same 20 ops each sleeping 50 ms, on a persistent (SQLite) instance: a job
  whose ops do some work (target <= 1.03).
- **multiprocess** (``--executor multiprocess``): 5 trivial ops, each in its own process (the
  default executor), persistent instance (target <= 1.02).

Jobs run alternately (noise lands on every side), each run under a fresh key, so every guarded
op claims, heartbeats and stamps: the full path, never a cheap skip. The ledger is a real SQLite
file (WAL, ``synchronous=FULL``) in a temp directory (``--dir`` elsewhere: ``/dev/shm`` shows
the ledger without fsync costs). Medians of wall-clock time are compared; CPU time (this
process's threads) is printed beside them, since it does not count fsync waits or time the
CPU is taken away by other processes on a shared machine.
"""

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    DagsterInstance,
    JobDefinition,
    OpExecutionContext,
    build_reconstructable_job,
    execute_job,
    in_process_executor,
    job,
    multiprocess_executor,
    op,
)

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_hooks, ledger_job
from rocky_dagster.step.keys import KEY_TAG

HERE = Path(__file__).resolve().parent
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
LABELS = {
    "plain": "plain",
    "floor": "floor (+2 fsynced commits/op)",
    "guarded": "guarded",
    "hooked": "guarded + hooks",
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


_COMMITS: dict[str, DurableCommits] = {}


def bench_job(kind: str, ops: int, sleep: float, ledger_url: str, multiprocess: bool) -> Any:
    """One benchmark job (module level, so step processes can rebuild it by name)."""

    def body(context: OpExecutionContext) -> dict[str, int]:
        if sleep:
            time.sleep(sleep)
        return {"rows": 1}

    def floor_body(context: OpExecutionContext) -> dict[str, int]:
        commits = _COMMITS.setdefault(ledger_url, DurableCommits(_floor_path(ledger_url)))
        key = f"{context.run_id}/{context.op.name}"
        commits.commit(key, "in_flight")
        result = body(context)
        commits.commit(key, "succeeded")
        return result

    def graph(steps: list[Any]) -> Callable[[], None]:
        def compose() -> None:
            for step in steps:
                step()

        return compose

    executor = multiprocess_executor if multiprocess else in_process_executor
    if kind in ("plain", "floor"):
        fn = floor_body if kind == "floor" else body
        steps = [op(name=f"step_{i}")(fn) for i in range(ops)]
        return job(name=kind, executor_def=executor)(graph(steps))
    steps = [idempotent_op(name=f"step_{i}")(body) for i in range(ops)]
    return ledger_job(
        graph(steps),
        name=kind,
        ledger=IdempotencyLedger(url=ledger_url),
        executor_def=executor,
        hooks=ledger_hooks if kind == "hooked" else None,
    )


def _floor_path(ledger_url: str) -> Path:
    return Path(ledger_url.removeprefix("sqlite:///")).with_name("floor.db")


@dataclass
class Scenario:
    name: str
    ops: int
    sleep: float
    persistent: bool
    multiprocess: bool
    kinds: tuple[str, ...]
    target: float


SCENARIOS = {
    "trivial": Scenario(
        "trivial", 20, 0.0, False, False, ("plain", "floor", "guarded", "hooked"), 1.25
    ),
    "sleeping": Scenario("sleeping", 20, 0.05, True, False, ("plain", "floor", "guarded"), 1.03),
    "multiprocess": Scenario("multiprocess", 5, 0.0, True, True, ("plain", "guarded"), 1.02),
}


def run_scenario(scenario: Scenario, pairs: int, warmup: int, scratch: Path) -> float:
    ledger_url = f"sqlite:///{scratch / 'ledger.db'}"
    if scenario.persistent:
        home = scratch / "dagster_home"
        home.mkdir(exist_ok=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = str(home)
        instance = DagsterInstance.get()
    else:
        instance = DagsterInstance.ephemeral()
    counter = iter(range(10**9))
    args = {
        "ops": scenario.ops,
        "sleep": scenario.sleep,
        "ledger_url": ledger_url,
        "multiprocess": scenario.multiprocess,
    }

    def launcher(kind: str) -> Callable[[], Any]:
        tags_for = lambda: {KEY_TAG: f"bench-{next(counter)}"}  # noqa: E731
        if scenario.multiprocess:
            recon = build_reconstructable_job(
                "dagster_overhead",
                "bench_job",
                reconstructable_kwargs={"kind": kind, **args},
                reconstructor_working_directory=str(HERE),
            )
            return lambda: execute_job(recon, instance=instance, tags=tags_for(), run_config=QUIET)
        built: JobDefinition = bench_job(kind, **args)
        return lambda: built.execute_in_process(
            instance=instance, tags=tags_for(), run_config=QUIET
        )

    launchers = {kind: launcher(kind) for kind in scenario.kinds}
    walls: dict[str, list[float]] = {k: [] for k in scenario.kinds}
    cpus: dict[str, list[float]] = {k: [] for k in scenario.kinds}
    order = list(scenario.kinds)
    for i in range(warmup + pairs):
        for kind in order if i % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            result = launchers[kind]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not result.success:
                raise SystemExit(f"a {kind} benchmark run failed")
            if i >= warmup:
                walls[kind].append(wall)
                cpus[kind].append(cpu)
    if scenario.persistent:
        instance.dispose()

    w = {k: statistics.median(v) for k, v in walls.items()}
    c = {k: statistics.median(v) for k, v in cpus.items()}
    where = "persistent (SQLite)" if scenario.persistent else "in-memory"
    executor = "multiprocess" if scenario.multiprocess else "in-process"
    sleep = f", ops sleep {scenario.sleep * 1000:g} ms" if scenario.sleep else ""
    print(
        f"[{scenario.name}] {scenario.ops} ops{sleep}, {executor} executor, {where} instance, "
        f"{pairs} alternating rounds"
    )
    print(f"  {'ms/run (median)':32s} {'wall':>9s} {'cpu':>9s}   per op vs plain (wall)")
    for kind in scenario.kinds:
        line = f"  {LABELS[kind]:32s} {w[kind] * 1000:9.1f} {c[kind] * 1000:9.1f}"
        if kind != "plain":
            line += f"   {(w[kind] - w['plain']) * 1000 / scenario.ops:+.2f} ms/op"
        print(line)
    if "floor" in w:
        print(f"  ratio floor/plain = {w['floor'] / w['plain']:.2f} (the disk's share: no layer)")
    if "hooked" in w:
        print(f"  ratio (guarded + hooks)/plain = {w['hooked'] / w['plain']:.2f}")
    ratio = w["guarded"] / w["plain"]
    print(
        f"  ratio guarded/plain = {ratio:.2f} (target <= {scenario.target:.2f}; "
        f"median cpu {c['guarded'] / c['plain']:.2f})"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--executor", choices=["in_process", "multiprocess"], default="in_process")
    parser.add_argument(
        "--pairs", type=int, help="rounds of alternating runs (default per scenario)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few runs of every scenario (CI)")
    parser.add_argument("--dir", help="directory for the ledger (default: a temp dir)")
    args = parser.parse_args()

    if args.smoke:
        plan = [(SCENARIOS[name], 1, 0) for name in ("trivial", "sleeping", "multiprocess")]
    elif args.executor == "multiprocess":
        plan = [(SCENARIOS["multiprocess"], args.pairs or 5, args.warmup)]
    else:
        plan = [
            (SCENARIOS["trivial"], args.pairs or 15, args.warmup),
            (SCENARIOS["sleeping"], args.pairs or 8, args.warmup),
        ]
    for scenario, pairs, warmup in plan:
        with tempfile.TemporaryDirectory(prefix="rocky-dagster-bench-", dir=args.dir) as scratch:
            run_scenario(scenario, pairs, warmup, Path(scratch))
    if args.smoke:
        print("smoke: every scenario ran (figures from so few runs are not meaningful)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # step processes import this file as `dagster_overhead`
    main()
