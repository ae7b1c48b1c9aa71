"""What guarding costs a Dagster run: the same job of N trivial ops, plain vs guarded.

Both jobs run with ``execute_in_process`` on one instance, alternating plain / guarded so
background noise lands on both sides, each guarded run under a fresh key (so every op claims,
heartbeats, and stamps its success: the full path, never a cheap skip). The guarded job is a
`ledger_job` (ledger hooks attached) on a real SQLite ledger file.

    python benchmarks/dagster_overhead.py [--ops 20] [--pairs 15] [--persistent] [--dir DIR]

Prints per-run medians and ``ratio guarded/plain = X.XX`` (the target is <= 1.10 at 20 ops).
A third job, "plain + UI writes", does what the layer asks of Dagster per op without touching
the ledger (one decision log line, one run-tag write, the ledger hook attached), splitting the
overhead into Dagster's storage writes and the ledger's own claim / heartbeat / stamp.
``--persistent`` uses a SQLite-backed instance in a temp DAGSTER_HOME instead of the
in-memory one (a slower Dagster, so a smaller ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, JobDefinition, in_process_executor, job, op

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_hooks, ledger_job
from rocky_dagster.keys import KEY_TAG, decision_tag

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def build_jobs(n: int, ledger_url: str) -> tuple[JobDefinition, JobDefinition, JobDefinition]:
    """The same graph three times: N independent ops returning a small summary."""

    def body(context) -> dict[str, int]:
        return {"rows": 1}

    def ui_body(context) -> dict[str, int]:
        step = context.get_step_execution_context().step.key
        context.instance.add_run_tags(context.run_id, {decision_tag(step): "proceed"})
        context.log.info(f"decision for {step}: proceed")
        return {"rows": 1}

    plain_ops = [op(name=f"step_{i}")(body) for i in range(n)]
    ui_ops = [op(name=f"step_{i}")(ui_body) for i in range(n)]
    guarded_ops = [idempotent_op(name=f"step_{i}")(body) for i in range(n)]

    def compose(ops: list[Any]) -> Callable[[], None]:
        def graph() -> None:
            for each in ops:
                each()

        return graph

    plain = job(name="plain", executor_def=in_process_executor)(compose(plain_ops))
    plain_ui = job(name="plain_ui", executor_def=in_process_executor, hooks=set(ledger_hooks))(
        compose(ui_ops)
    )
    guarded = ledger_job(
        compose(guarded_ops),
        name="guarded",
        ledger=IdempotencyLedger(url=ledger_url),
        executor_def=in_process_executor,
    )
    return plain, plain_ui, guarded


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    if not result.success:
        raise SystemExit("a benchmark run failed")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=15, help="rounds of alternating runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--dir", help="directory for the ledger (default: a temp dir)")
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
        plain, plain_ui, guarded = build_jobs(args.ops, ledger_url)
        counter = iter(range(10**9))

        def run(job_def: JobDefinition) -> Any:
            # both get a fresh key tag: only the guarded job reads it (and then always proceeds)
            return job_def.execute_in_process(
                instance=instance, tags={KEY_TAG: f"bench-{next(counter)}"}, run_config=QUIET
            )

        jobs = [plain, guarded, plain_ui]
        for _ in range(args.warmup):
            for job_def in jobs:
                timed(lambda job_def=job_def: run(job_def))
        times: dict[str, list[float]] = {j.name: [] for j in jobs}
        for i in range(args.pairs):
            order = jobs if i % 2 == 0 else jobs[::-1]
            for job_def in order:
                times[job_def.name].append(timed(lambda job_def=job_def: run(job_def)))

    p, u, g = (statistics.median(times[name]) for name in ("plain", "plain_ui", "guarded"))
    kind = "persistent (SQLite) instance" if args.persistent else "in-memory instance"
    print(f"{args.ops} ops, {args.pairs} alternating pairs, {kind}, ledger on {scratch}")
    per_op = 1000 / args.ops
    print(f"plain             median {p * 1000:8.1f} ms/run")
    print(
        f"plain + UI writes median {u * 1000:8.1f} ms/run  (+{(u - p) * per_op:.2f} ms/op: "
        "log line, run tag, hook event)"
    )
    print(
        f"guarded           median {g * 1000:8.1f} ms/run  (+{(g - p) * per_op:.2f} ms/op; "
        f"ledger's own share +{(g - u) * per_op:.2f} ms/op)"
    )
    print(f"ratio guarded/(plain + UI writes) = {g / u:.2f}")
    print(f"ratio guarded/plain = {g / p:.2f}")


if __name__ == "__main__":
    main()
