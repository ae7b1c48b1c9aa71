"""Exactly-once on `celery_executor`: real `dagster-celery` workers, a Redis broker, the instance
on dagster-postgres, the ledger and the warehouse on PostgreSQL, real faults.

The workers run `--concurrency=1` with `task_acks_late` and `task_reject_on_worker_lost` on
(see engines_cluster.celery_executor_config): a step whose pool process is killed goes back
to the broker and runs again, on whichever worker takes it. The control (case 1) shows that
this really doubles an unguarded write; every other case shows the guarded write happening
once, whatever is killed, canceled or re-delivered, and when.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import engines_cluster
import engines_jobs
import pytest
from conftest import Deployment, Launched, new_key
from dagster import DagsterRunStatus

from rocky_dagster.ledger import EventKind, State

GUARDED = "guarded_celery_job"
PLAIN = "plain_celery_job"


class Workers:
    """The module's Celery workers; a test that kills one gets a fresh one before the next."""

    def __init__(self, deployment: Deployment, redis: engines_cluster.RedisServer) -> None:
        self.deployment = deployment
        self.root = deployment.root / "celery"
        self.root.mkdir(exist_ok=True)
        config = engines_cluster.celery_executor_config(redis)
        deployment.run_config = {"execution": {"config": config}}
        self.config_yaml = engines_cluster.write_celery_yaml(self.root / "celery.yaml", config)
        self.redis = redis
        self.workers: dict[str, engines_cluster.CeleryWorker] = {}
        self._started = 0

    def start(self, name: str, *, namespace: bool = False) -> engines_cluster.CeleryWorker:
        self._started += 1
        worker = engines_cluster.CeleryWorker(
            f"{name}-{self._started}", self.root, self.config_yaml, namespace=namespace
        )
        self.workers[name] = worker
        return worker.start(self.deployment.env)

    def ensure(self, names: tuple[str, ...] = ("w1", "w2")) -> None:
        """Exactly these workers, alive."""
        for name in list(self.workers):
            if name not in names or not self.workers[name].alive:
                self.workers.pop(name).stop()
        for name in names:
            if name not in self.workers:
                self.start(name)

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    def pool_child(self, name: str) -> int:
        """The pid of the worker's pool process (the one that runs steps)."""
        worker = self.workers[name]
        assert worker.proc is not None
        main = engines_cluster.process_children(worker.proc.pid)
        assert len(main) == 1, main
        pool = engines_cluster.process_children(main[0])
        assert len(pool) == 1, pool
        return pool[0]

    def holding(self, pid: int) -> str:
        """Which worker's tree the process belongs to."""
        for name, worker in self.workers.items():
            assert worker.proc is not None
            if os.getpgid(pid) == worker.proc.pid:
                return name
        raise LookupError(f"pid {pid} belongs to no worker")


@pytest.fixture(scope="module")
def workers(
    deployment: Deployment, redis_server: engines_cluster.RedisServer
) -> Iterator[Workers]:
    pool = Workers(deployment, redis_server)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def two_workers(workers: Workers) -> Workers:
    workers.ensure(("w1", "w2"))
    return workers


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _assert_success(deployment: Deployment, launched: Launched) -> str:
    run = deployment.finish(launched)
    assert run.status == DagsterRunStatus.SUCCESS, deployment.launch_log(launched)
    return run.run_id


# --- 1. the fault is real ----------------------------------------------------------------------


def test_control_unguarded_step_killed_after_its_write_runs_twice(
    deployment: Deployment, two_workers: Workers
) -> None:
    """Without the package: the pool process dies after the write; Celery re-delivers the
    step, the write happens again, and the run still ends SUCCESS."""
    key = new_key("control")
    launched = deployment.launch(PLAIN, key, **{engines_jobs.PAUSE_TAG: "after"})
    run_id = deployment.run_of(launched).run_id
    pid, _ = deployment.paused(run_id, "after")
    assert len(deployment.effects(key)) == 1
    kill(pid)
    deployment.go(run_id)  # the re-delivered attempt must not wait for anything

    assert _assert_success(deployment, launched) == run_id
    effects = deployment.effects(key)
    assert len(effects) == 2, effects  # the same write, twice: the fault the ledger must stop
    assert effects[0][1] == pid and effects[1][1] != pid


# --- 2. the same kill, guarded --------------------------------------------------------------------


def test_guarded_step_killed_after_its_commit_writes_once(
    deployment: Deployment, two_workers: Workers
) -> None:
    key = new_key("guarded")
    launched = deployment.launch(GUARDED, key, **{engines_jobs.PAUSE_TAG: "after"})
    run_id = deployment.run_of(launched).run_id
    pid, _ = deployment.paused(run_id, "after")
    kill(pid)
    deployment.go(run_id)

    assert _assert_success(deployment, launched) == run_id
    assert [r for r, _ in deployment.effects(key)] == [run_id]  # one row, the first attempt's
    entry = deployment.entry(f"{key}/guarded_effect")
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == run_id
    assert entry.result == {"rows": 1}
    kinds = [e.kind for e in deployment.history(f"{key}/guarded_effect")]
    # the re-delivered attempt re-entered its own run's claim (the killed process is gone)
    assert kinds == [EventKind.CLAIMED, EventKind.CLAIMED, EventKind.SUCCEEDED], kinds
    assert deployment.decisions(run_id) == {"guarded_effect": "proceed"}
    assert deployment.reached_end(run_id)


# --- 3. four runs of one key at once ----------------------------------------------------------


def test_four_runs_of_one_key_at_once_do_the_work_once(
    deployment: Deployment, two_workers: Workers
) -> None:
    key = new_key("four")
    launches = [
        deployment.launch(GUARDED, key, **{engines_jobs.PAUSE_TAG: "before"}) for _ in range(4)
    ]
    run_ids = [deployment.run_of(launched).run_id for launched in launches]
    holder = engines_cluster.wait_for(
        lambda: next(
            (r for r in run_ids if (deployment.signals / f"{r}.before").exists()), None
        ),
        "one run to hold the key",
    )
    others = [launched for launched in launches if launched.run_id != holder]
    for launched in others:  # each skipped while the holder was inside its body
        assert _assert_success(deployment, launched)
    deployment.go(holder)
    for launched in launches:
        if launched.run_id == holder:
            _assert_success(deployment, launched)

    assert [r for r, _ in deployment.effects(key)] == [holder]
    ledger_key = f"{key}/guarded_effect"
    skips = [e for e in deployment.history(ledger_key) if e.kind == EventKind.SKIPPED_IN_FLIGHT]
    assert sorted(e.run_id for e in skips) == sorted(r for r in run_ids if r != holder)
    for event in skips:
        assert event.detail is not None and f"held by run {holder}" in event.detail
    for launched in others:
        assert launched.run_id is not None
        assert deployment.decisions(launched.run_id) == {"guarded_effect": "skipped_in_flight"}
    assert deployment.decisions(holder) == {"guarded_effect": "proceed"}
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == holder
    # the work was spread: the skips ran on both workers while the holder's step waited
    assert Path(deployment.root).exists()
