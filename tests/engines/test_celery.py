"""Exactly-once on `celery_executor`: real `dagster-celery` workers, a Redis broker, the instance
on dagster-postgres, the ledger and the warehouse on PostgreSQL, real faults.

The workers run `--concurrency=1` with `task_acks_late` and `task_reject_on_worker_lost` on
(see engines_cluster.celery_executor_config): a step whose pool process is killed goes back
to the broker and runs again, on whichever worker takes it. The control (case 1) shows that
this really doubles an unguarded write; every other case shows the guarded write happening
once, whatever is killed, canceled or re-delivered, and when.
"""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator

import engines_cluster
import engines_jobs
import pytest
from engines_deployment import Deployment, Launched, new_key

from rocky_dagster.ledger import Decision, EventKind, State

GUARDED = "guarded_celery_job"
GUARDED_SHORT = "guarded_celery_short_lease_job"
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
        return worker.start(self.deployment.env, includes=["engines_jobs"])

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

    def redeliver_unacked(self, run_id: str) -> None:
        """Put the run's unacknowledged step messages back on their queue, as the Redis
        transport does for a dead worker's messages once `visibility_timeout` has passed
        (kombu's own `restore_by_tag`), now rather than in an hour."""
        from dagster_celery.executor import CeleryExecutor
        from dagster_celery.make_app import make_app

        config = self.deployment.run_config["execution"]["config"]
        app = make_app(CeleryExecutor.for_cli(**config).app_args())
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            unacked = channel.client.hgetall(channel.unacked_key)
            tags = [tag for tag, payload in unacked.items() if run_id in _message_body(payload)]
            assert tags, f"no unacknowledged message of run {run_id}"
            for tag in tags:
                channel.qos.restore_by_tag(tag)

    def holding(self, pid: int) -> str:
        """Which worker's tree the process belongs to."""
        for name, worker in self.workers.items():
            assert worker.proc is not None
            if os.getpgid(pid) == worker.proc.pid:
                return name
        raise LookupError(f"pid {pid} belongs to no worker")


def _message_body(payload: bytes) -> str:
    """The body of a message as kombu's Redis transport keeps it unacknowledged."""
    message = json.loads(payload)[0]
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    return str(body)


@pytest.fixture(scope="module")
def workers(deployment: Deployment, redis_server: engines_cluster.RedisServer) -> Iterator[Workers]:
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

    assert deployment.succeeded(launched) == run_id
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

    assert deployment.succeeded(launched) == run_id
    assert [r for r, _ in deployment.effects(key)] == [run_id]  # one row, the first attempt's
    # the re-delivered attempt re-entered its own run's claim and found the committed marker
    entry = deployment.reentered_and_stamped(f"{key}/guarded_effect", run_id)
    assert entry.result == {"rows": 1}
    assert deployment.decisions(run_id) == {"guarded_effect": "proceed"}


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
        lambda: next((r for r in run_ids if (deployment.signals / f"{r}.before").exists()), None),
        "one run to hold the key",
    )
    others = [launched for launched in launches if launched.run_id != holder]
    for launched in others:  # each skipped while the holder was inside its body
        assert deployment.succeeded(launched)
    deployment.go(holder)
    for launched in launches:
        if launched.run_id == holder:
            deployment.succeeded(launched)

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


# --- 4. a whole worker killed, then the key launched again ------------------------------------


def _kill_worker_of(workers: Workers, pid: int) -> None:
    """SIGKILL the worker (its CLI, celery's main process, its pool child) holding `pid`: the
    step's message stays unacknowledged in Redis (re-delivered only after the visibility
    timeout, an hour by default), so nothing runs the step again by itself."""
    workers.workers[workers.holding(pid)].kill_all()


def _end_run(deployment: Deployment, launched: Launched, how: str) -> None:
    """The run worker waits forever for the dead step; stop it and end the run in the instance
    the way a deployment does: run monitoring marks it FAILURE, an operator's terminate marks
    it CANCELED; "lost" leaves it STARTED (its host is gone and nobody knows)."""
    launched.proc.kill()
    launched.proc.communicate(timeout=60)
    assert launched.run_id is not None
    run = deployment.instance.get_run_by_id(launched.run_id)
    assert run is not None
    if how == "failed":
        deployment.instance.report_run_failed(run, "its celery worker died (the test)")
    elif how == "canceled":
        deployment.instance.report_run_canceled(run, "terminated by an operator (the test)")


@pytest.mark.parametrize(
    ("pause", "ended", "lease"),
    [
        pytest.param("before", "failed", "alive", id="before-the-write"),
        pytest.param("after", "failed", "alive", id="after-the-commit-lease-alive-run-failed"),
        pytest.param("after", "canceled", "alive", id="after-the-commit-lease-alive-run-canceled"),
        pytest.param("after", "lost", "ran-out", id="after-the-commit-lease-ran-out"),
    ],
)
def test_worker_killed_then_key_launched_again_writes_once(
    deployment: Deployment, two_workers: Workers, pause: str, ended: str, lease: str
) -> None:
    key = new_key(f"killed-{pause}")
    ledger_key = f"{key}/guarded_effect"
    job = GUARDED if lease == "alive" else GUARDED_SHORT
    first = deployment.launch(job, key, **{engines_jobs.PAUSE_TAG: pause})
    first_id = deployment.run_of(first).run_id
    pid, _ = deployment.paused(first_id, pause)
    assert len(deployment.effects(key)) == (1 if pause == "after" else 0)
    _kill_worker_of(two_workers, pid)
    _end_run(deployment, first, ended)
    if lease == "ran-out":
        with deployment.ledger() as ledger:
            engines_cluster.wait_for(
                lambda: ledger.peek(ledger_key).decision == Decision.ADOPTED_STALE,
                "the dead claim's lease to run out",
                120,
            )

    second = deployment.launch(job, key)  # on the worker left alive
    second_id = deployment.succeeded(second)
    effects = [r for r, _ in deployment.effects(key)]
    assert effects == [first_id if pause == "after" else second_id], effects
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == second_id
    history = deployment.history(ledger_key)
    if lease == "alive":  # the second run settled the dead claim on the spot (no adoption)
        settled = EventKind.FAILED if ended == "failed" else EventKind.RELEASED
        assert any(
            e.kind == settled and e.detail and f"reaped by run {second_id}" in e.detail
            for e in history
        ), history
        assert EventKind.ADOPTED not in [e.kind for e in history]
    else:
        assert [e.kind for e in history][-2:] == [EventKind.ADOPTED, EventKind.SUCCEEDED]
    assert deployment.decisions(second_id) == {
        "guarded_effect": "adopted_stale" if lease == "ran-out" else "proceed"
    }


# --- 5. a run canceled from the instance while its step runs on a worker -----------------------


def test_run_canceled_in_the_instance_stops_the_body_and_frees_the_key(
    deployment: Deployment, two_workers: Workers
) -> None:
    key = new_key("canceled")
    ledger_key = f"{key}/guarded_effect"
    first = deployment.launch(GUARDED, key, **{engines_jobs.PAUSE_TAG: "before"})
    run = deployment.run_of(first)
    deployment.paused(run.run_id, "before")
    deployment.instance.report_run_canceled(run, "canceled from the instance (the test)")

    # the step's run watch sees the run finished in the instance and interrupts the body
    # (never told to go on): it releases the key and writes nothing
    released = engines_cluster.wait_for(
        lambda: [e for e in deployment.history(ledger_key) if e.kind == EventKind.RELEASED],
        "the canceled run's step to release its key",
        120,
    )
    assert released[0].run_id == run.run_id
    assert released[0].detail is not None and "CANCELED" in released[0].detail
    with deployment.ledger() as ledger:  # released: claimable at once
        assert ledger.peek(ledger_key).decision == Decision.PROCEED
    first.proc.communicate(timeout=300)  # its run worker gets the step's events and ends
    assert not deployment.reached_end(run.run_id)
    assert deployment.effects(key) == []

    second = deployment.launch(GUARDED, key)
    second_id = deployment.succeeded(second)
    assert [r for r, _ in deployment.effects(key)] == [second_id]
    assert deployment.decisions(second_id) == {"guarded_effect": "proceed"}


# --- 6. a worker in a PID namespace of its own -------------------------------------------------


def test_claim_of_a_worker_in_another_pid_namespace_waits_for_its_lease(
    deployment: Deployment, workers: Workers
) -> None:
    """The ledger cannot see into another PID namespace (another container): a claim held
    there is treated as alive until its lease ends, whoever asks; then it is adopted."""
    workers.ensure(())
    workers.start("ns", namespace=True)
    key = new_key("namespace")
    ledger_key = f"{key}/guarded_effect"
    first = deployment.launch(GUARDED, key, **{engines_jobs.PAUSE_TAG: "before"})
    first_id = deployment.run_of(first).run_id
    ns_pid, ns_inode = deployment.paused(first_id, "before")
    assert ns_inode != os.stat("/proc/self/ns/pid").st_ino  # it really is another namespace
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.holder_process is not None
    assert f"/{ns_inode}/{ns_pid}/" in entry.holder_process
    held_fence = entry.fence
    workers.start("w1")  # a worker in this (the host's) namespace, for what comes next

    # the whole namespace dies (its worker and pool child): nothing was written
    workers.workers["ns"].kill_all()

    # another run, while the lease lives: its holder run is not finished, so no reap; its
    # lease is alive, so no adoption: it skips, naming the holder
    second = deployment.launch(GUARDED, key)
    second_id = deployment.succeeded(second)
    assert deployment.decisions(second_id) == {"guarded_effect": "skipped_in_flight"}

    # the broker hands the dead worker's message to the live worker (what Redis does once the
    # visibility timeout passes): the same run, from another namespace, does not re-enter, and
    # it does not skip either (the run would succeed without the work, stamping the key): the
    # delivered-again step fails
    workers.redeliver_unacked(first_id)
    first_again = engines_cluster.wait_for(
        lambda: [
            e
            for e in deployment.history(ledger_key)
            if e.kind == EventKind.SKIPPED_IN_FLIGHT and e.run_id == first_id
        ],
        "the re-delivered step to decide",
        120,
    )
    assert first_again[0].detail is not None
    assert "another live attempt of the same run" in first_again[0].detail
    failures = engines_cluster.wait_for(
        lambda: [
            e
            for e in deployment.instance.all_logs(first_id)
            if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_FAILURE"
        ],
        "the re-delivered step to fail",
        120,
    )
    assert "held by an earlier attempt of step 'guarded_effect' in this same run" in str(
        failures[0].dagster_event.event_specific_data.error
    )
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.state == State.IN_FLIGHT and entry.fence == held_fence
    assert deployment.effects(key) == []
    first.proc.kill()

    # once the lease ran out, the next run adopts the claim and does the work, once
    with deployment.ledger() as ledger:
        engines_cluster.wait_for(
            lambda: ledger.peek(ledger_key).decision == Decision.ADOPTED_STALE,
            "the dead holder's lease to run out",
            120,
        )
    third = deployment.launch(GUARDED, key)
    third_id = deployment.succeeded(third)
    assert deployment.decisions(third_id) == {"guarded_effect": "adopted_stale"}
    assert [r for r, _ in deployment.effects(key)] == [third_id]
    entry = deployment.entry(ledger_key)
    assert entry is not None and entry.state == State.SUCCEEDED and entry.generation == held_fence
