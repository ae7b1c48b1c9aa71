"""What guarding costs a run on the distributed executors: plain vs guarded, same run, same workers.

    python benchmarks/engines_bench.py                       # celery, then multiprocess
    python benchmarks/engines_bench.py --executor celery     # one of them
    python benchmarks/engines_bench.py --smoke               # one round of each (CI)

A job of 20 independent ops, each sleeping 200 ms (a step that does some work), runs under

- **celery** (`celery_executor`): two `dagster-celery` workers (``--concurrency=1``) on a Redis
  broker started here (`redis-server` from PATH), acks-late as in tests/engines;
- **multiprocess** (the default executor): a process per step, two at a time.

Target for both: guarded/plain <= 1.05. Plain and guarded runs alternate (noise lands on both
sides), each guarded run under a fresh key so every op claims, heartbeats and stamps (the full
path, never a cheap skip). The instance is SQLite in a temp DAGSTER_HOME and the ledger a
SQLite file beside it (``--ledger-url`` for another, e.g. PostgreSQL); medians of wall time
are compared.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster import (
    DagsterInstance,
    OpExecutionContext,
    build_reconstructable_job,
    execute_job,
    job,
    multiprocess_executor,
    op,
)

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_job
from rocky_dagster.step.keys import KEY_TAG

HERE = Path(__file__).resolve().parent
ENGINES = HERE.parent / "tests" / "engines"
OPS = 20
SLEEP = 0.2
TARGET = 1.05
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def bench_job(kind: str, executor: str, ops: int, sleep: float, ledger_url: str) -> Any:
    """One benchmark job (module level, so workers and step processes rebuild it by name)."""

    def body(context: OpExecutionContext) -> dict[str, int]:
        time.sleep(sleep)
        return {"rows": 1}

    if executor == "celery":
        from dagster_celery import celery_executor

        executor_def = celery_executor
    else:
        executor_def = multiprocess_executor

    def graph(steps: list[Any]) -> Callable[[], None]:
        def compose() -> None:
            for step in steps:
                step()

        return compose

    if kind == "plain":
        steps = [op(name=f"step_{i}")(body) for i in range(ops)]
        return job(name="plain", executor_def=executor_def)(graph(steps))
    steps = [idempotent_op(name=f"step_{i}")(body) for i in range(ops)]
    return ledger_job(
        graph(steps),
        name="guarded",
        ledger=IdempotencyLedger(url=ledger_url),
        executor_def=executor_def,
    )


def run_executor(
    executor: str, pairs: int, warmup: int, scratch: Path, ledger_url: str | None
) -> float:
    home = scratch / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    url = ledger_url or f"sqlite:///{scratch / 'ledger.db'}"
    run_config: dict[str, Any] = dict(QUIET)
    services: list[Any] = []
    if executor == "celery":
        import engines_cluster

        redis = engines_cluster.RedisServer(scratch).start()
        services.append(redis)
        config = engines_cluster.celery_executor_config(redis)
        config_yaml = engines_cluster.write_celery_yaml(scratch / "celery.yaml", config)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
            ),
        }
        for i in (1, 2):
            worker = engines_cluster.CeleryWorker(f"bench{i}", scratch, config_yaml)
            services.append(worker.start(env, includes=["engines_bench"]))
        run_config["execution"] = {"config": config}
    else:
        run_config["execution"] = {"config": {"max_concurrent": 2}}
    instance = DagsterInstance.get()
    counter = iter(range(10**9))

    def launcher(kind: str) -> Callable[[], Any]:
        recon = build_reconstructable_job(
            "engines_bench",
            "bench_job",
            reconstructable_kwargs={
                "kind": kind,
                "executor": executor,
                "ops": OPS,
                "sleep": SLEEP,
                "ledger_url": url,
            },
            reconstructor_working_directory=str(HERE),
        )

        def launch() -> bool:
            tags = {KEY_TAG: f"bench-{next(counter)}"}
            with execute_job(recon, instance=instance, tags=tags, run_config=run_config) as done:
                return done.success

        return launch

    kinds = ("plain", "guarded")
    launchers = {kind: launcher(kind) for kind in kinds}
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for i in range(warmup + pairs):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                wall = time.perf_counter()
                ok = launchers[kind]()
                wall = time.perf_counter() - wall
                if not ok:
                    raise SystemExit(f"a {kind} {executor} benchmark run failed")
                if i >= warmup:
                    walls[kind].append(wall)
    finally:
        instance.dispose()
        for service in reversed(services):
            service.stop()

    w = {k: statistics.median(v) for k, v in walls.items()}
    workers = "two celery workers (concurrency 1)" if executor == "celery" else "2 at a time"
    print(
        f"[{executor}] {OPS} ops of {SLEEP * 1000:g} ms, {workers}, ledger "
        f"{url.split(':', 1)[0]}, {pairs} alternating rounds"
    )
    print(f"  {'s/run (median)':20s} {'wall':>8s}   all runs")
    for kind in kinds:
        runs = " ".join(f"{x:.2f}" for x in walls[kind])
        print(f"  {kind:20s} {w[kind]:8.2f}   {runs}")
    ratio = w["guarded"] / w["plain"]
    print(f"  ratio guarded/plain = {ratio:.3f} (target <= {TARGET:.2f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--executor", choices=["celery", "multiprocess", "both"], default="both")
    parser.add_argument("--pairs", type=int, default=5, help="rounds of alternating runs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="one round of each executor (CI)")
    parser.add_argument("--ledger-url", help="ledger URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--dir", help="directory for the scratch files (default: a temp dir)")
    args = parser.parse_args()
    executors = ["celery", "multiprocess"] if args.executor == "both" else [args.executor]
    pairs, warmup = (1, 0) if args.smoke else (args.pairs, args.warmup)
    for executor in executors:
        with tempfile.TemporaryDirectory(prefix="rocky-engines-bench-", dir=args.dir) as scratch:
            run_executor(executor, pairs, warmup, Path(scratch), args.ledger_url)
    if args.smoke:
        print("smoke: every executor ran (figures from so few runs are not meaningful)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # workers and step processes import this file as `engines_bench`
    sys.path.insert(0, str(ENGINES))  # the Redis and worker helpers shared with tests/engines
    main()
