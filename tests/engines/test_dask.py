"""Exactly-once on `dask_executor`: a `distributed` scheduler and two single-thread workers on
127.0.0.1, the instance on dagster-postgres, the ledger and the warehouse on PostgreSQL.

Dask runs each step in a worker thread; when a worker dies the scheduler gives its task to
another worker, so the step runs again in the same run. The ledger sees the same run's claim
held by a process that is gone: the attempt re-enters it, continuing its generation, and
finds the committed marker or does the work, once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import engines_cluster
import engines_jobs
import pytest
from engines_deployment import Deployment, new_key

from rocky_dagster.ledger import EventKind, State

JOB = "guarded_dask_job"
LEDGER_KEY = "{key}/guarded_effect"


class Cluster:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.root = deployment.root / "dask"
        self.root.mkdir(exist_ok=True)
        self.cluster: engines_cluster.DaskCluster | None = None

    def ensure(self) -> None:
        """A scheduler and two live workers (a test that killed one gets a fresh cluster)."""
        if self.cluster is not None and all(w.alive for w in self.cluster.workers):
            return
        self.stop()
        self.cluster = engines_cluster.DaskCluster(self.root).start(self.deployment.env)
        self.deployment.run_config = {
            "execution": {"config": {"cluster": {"existing": {"address": self.cluster.address}}}}
        }

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="module")
def dask_cluster(deployment: Deployment) -> Iterator[Cluster]:
    cluster = Cluster(deployment)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(dask_cluster: Cluster) -> Cluster:
    dask_cluster.ensure()
    return dask_cluster


@pytest.mark.parametrize("pause", ["before", "after"], ids=["mid-step", "after-the-commit"])
def test_dask_worker_killed_writes_once(
    deployment: Deployment, cluster: Cluster, pause: str
) -> None:
    """The worker running the step dies (mid-step, before the write; or after the write
    committed): the scheduler reruns the step on the other worker, and the row is written once."""
    key = new_key(f"dask-{pause}")
    launched = deployment.launch(JOB, key, **{engines_jobs.PAUSE_TAG: pause})
    run_id = deployment.run_of(launched).run_id
    pid, _ = deployment.paused(run_id, pause)
    assert cluster.cluster is not None
    assert pid in [w.proc.pid for w in cluster.cluster.workers if w.proc is not None]
    os.kill(pid, signal.SIGKILL)
    deployment.go(run_id)

    assert deployment.succeeded(launched) == run_id
    effects = deployment.effects(key)
    assert [r for r, _ in effects] == [run_id], effects
    assert (effects[0][1] == pid) == (pause == "after")  # after: the killed worker's write
    deployment.reentered_and_stamped(LEDGER_KEY.format(key=key), run_id)


def test_dask_four_runs_of_one_key_at_once_do_the_work_once(
    deployment: Deployment, cluster: Cluster
) -> None:
    key = new_key("dask-four")
    # four jobs, not four runs of one job: see engines_jobs._dask_twin (a dagster-dask limit)
    launches = [
        deployment.launch(f"{JOB}_{twin}", key, **{engines_jobs.PAUSE_TAG: "before"})
        for twin in "abcd"
    ]
    run_ids = [deployment.run_of(launched).run_id for launched in launches]
    holder = engines_cluster.wait_for(
        lambda: next((r for r in run_ids if (deployment.signals / f"{r}.before").exists()), None),
        "one run to hold the key",
    )
    others = [launched for launched in launches if launched.run_id != holder]
    for launched in others:
        deployment.succeeded(launched)
    deployment.go(holder)
    for launched in launches:
        if launched.run_id == holder:
            deployment.succeeded(launched)

    assert [r for r, _ in deployment.effects(key)] == [holder]
    ledger_key = LEDGER_KEY.format(key=key)
    skips = [e for e in deployment.history(ledger_key) if e.kind == EventKind.SKIPPED_IN_FLIGHT]
    assert sorted(e.run_id for e in skips) == sorted(r for r in run_ids if r != holder)
    for event in skips:
        assert event.detail is not None and f"held by run {holder}" in event.detail
    for launched in others:
        assert launched.run_id is not None
        assert deployment.decisions(launched.run_id) == {"guarded_effect": "skipped_in_flight"}
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == holder
