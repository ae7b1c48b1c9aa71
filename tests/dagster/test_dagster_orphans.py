"""A guarded step whose run is gone stops its body (it never works on as an orphan).

Each run starts in a subprocess (`dagster_layer_run.py`, the run worker) on the test's instance
and ledger, with a 2 s lease, so the step heartbeats (and looks at its run) every 0.5 s. Its
body (`busy`) appends a line every 0.1 s for ten minutes. The waits below are generous bounds
(deadlock guards), never timing assertions; every process a test started is killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster_layer_jobs import busy_job, start_run, wait_for

from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.heartbeat import StepWatch, Stop, stop_step
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions

STOP_BOUND = 60.0
"""How long a test waits for a stopped step to be gone (the step notices within 0.5 s)."""


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that never reaps it counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # not Linux: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _body_pid(work_dir: Path) -> tuple[str, int]:
    """(run id, pid) of the running `busy` body."""
    [marker] = wait_for(lambda: list(work_dir.glob("busy_pid.*")), "the body to start")
    pid = wait_for(lambda: marker.read_text().strip(), "the body's pid")
    return marker.name.split(".", 1)[1], int(pid)


def _messages(instance: DagsterInstance, run_id: str) -> str:
    return "\n".join(
        e.user_message or (e.dagster_event.message or "" if e.dagster_event else "")
        for e in instance.all_logs(run_id)
    )


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        _kill(pid)


def _start(job_name: str, key: str, started: list[int]) -> subprocess.Popen[str]:
    proc = start_run(job_name, {KEY_TAG: key})
    started.append(proc.pid)
    return proc


def _next_run_proceeds(instance: DagsterInstance, ledger: Ledger, work_dir: Path, key: str) -> None:
    """A later run with the same key claims it and does the work (the body returns at once)."""
    (work_dir / "go").touch()
    retry = busy_job.execute_in_process(instance=instance, tags={KEY_TAG: key})
    assert retry.success
    assert step_decisions(instance, retry.run_id)["busy"] == "proceed"
    entry = ledger.get(f"{key}/busy")
    assert entry.state == State.SUCCEEDED and entry.run_id == retry.run_id


@pytest.mark.parametrize(
    "job_name", ["busy_multiprocess_job", "busy_forkserver_job"], ids=["spawn", "forkserver"]
)
def test_killed_run_worker_stops_its_multiprocess_step(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list[int], job_name: str
) -> None:
    """Spawn (Dagster's default start method) and forkserver (the step's parent is the fork
    server, not the run worker: the run worker's pipe tells)."""
    worker = _start(job_name, "orphan-1", started)
    run_id, step_pid = _body_pid(work_dir)
    started.append(step_pid)
    assert step_pid != worker.pid  # the step runs in a process of its own

    worker.kill()  # SIGKILL the run worker only: its step process is left behind
    worker.wait()
    wait_for(lambda: _gone(step_pid), "the orphaned step process to exit", timeout=STOP_BOUND)

    # the body was stopped (it did not run its ten minutes), and wrote nothing after it stopped
    stopped = work_dir / f"busy_stopped.{run_id}"
    assert stopped.read_text() in ("DagsterExecutionInterruptedError", "KeyboardInterrupt")
    lines = (work_dir / "busy.log").read_text().splitlines()
    assert set(lines) == {run_id}
    # the claim was given back by the step itself (the run is still STARTED: nobody marked it)
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
    assert ledger.get("orphan-1/busy").released
    last = ledger.history("orphan-1/busy")[-1]
    assert last.kind == EventKind.RELEASED and last.run_id == run_id
    assert f"its run worker (pid {worker.pid}) is gone" in _messages(instance, run_id)

    _next_run_proceeds(instance, ledger, work_dir, "orphan-1")


def test_run_marked_finished_stops_its_in_process_step(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list[int]
) -> None:
    worker = _start("busy_job", "orphan-2", started)
    run_id, step_pid = _body_pid(work_dir)
    assert step_pid == worker.pid  # in-process executor: the step runs in the run worker

    # the instance gives up on the run while its worker is alive (e.g. a forced termination)
    instance.report_run_failed(instance.get_run_by_id(run_id))
    worker.wait(timeout=STOP_BOUND)

    assert (work_dir / f"busy_stopped.{run_id}").read_text() in (
        "DagsterExecutionInterruptedError",
        "KeyboardInterrupt",
    )
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    assert ledger.get("orphan-2/busy").released
    last = ledger.history("orphan-2/busy")[-1]
    assert last.kind == EventKind.RELEASED and last.run_id == run_id
    assert f"the instance marked run {run_id} FAILURE" in _messages(instance, run_id)

    _next_run_proceeds(instance, ledger, work_dir, "orphan-2")


def test_lost_claim_stops_the_body_and_fails_the_step(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list[int]
) -> None:
    worker = _start("busy_job", "orphan-3", started)
    run_id, _ = _body_pid(work_dir)

    # an operator releases the in-flight claim: the next heartbeat finds it lost
    assert ledger.release("orphan-3/busy", reason="released by the test")
    assert worker.wait(timeout=STOP_BOUND) == 1

    assert (work_dir / f"busy_stopped.{run_id}").exists()
    [failure] = [
        e.dagster_event
        for e in instance.all_logs(run_id)
        if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_FAILURE"
    ]
    description = failure.event_specific_data.user_failure_data.description
    assert "lost its claim on ledger key 'orphan-3/busy'" in description
    assert "the body was stopped" in description
    assert "It was released (an operator" in description
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    assert ledger.get("orphan-3/busy").released  # the step wrote nothing over the release

    _next_run_proceeds(instance, ledger, work_dir, "orphan-3")


# --- the switch itself: one interrupt, and never after the step disarmed it ---------------------


@pytest.fixture
def sigints() -> Iterator[list[int]]:
    """SIGINTs this process receives during the test (recorded instead of raised)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signo, _frame: received.append(signo))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch(reason: str | None = None) -> StepWatch:
    return StepWatch(lambda: reason, 0.05, interruptible=True)


def test_a_disarmed_step_is_never_interrupted(sigints: list[int]) -> None:
    watch = _watch()
    assert watch.disarm() is None  # the step leaves its body: nothing stopped it
    stop_step(watch, Stop("its run worker (pid 1) is gone"))
    assert sigints == [] and watch.stop is None


def test_a_step_is_interrupted_once_and_learns_why(sigints: list[int]) -> None:
    watch = _watch()
    stop_step(watch, Stop("the instance marked run r FAILURE"))
    stop_step(watch, Stop("a heartbeat found its claim on 'k' lost", lost=True))
    wait_for(lambda: sigints, "the interrupt")
    stop = watch.disarm()
    assert stop == Stop("the instance marked run r FAILURE", interrupted=True)
    assert sigints == [signal.SIGINT]


def test_a_step_off_the_main_thread_is_stopped_without_an_interrupt(sigints: list[int]) -> None:
    watch = StepWatch(lambda: None, 0.05, interruptible=False)
    stop_step(watch, Stop("its run worker (pid 1) is gone"))
    assert watch.disarm() == Stop("its run worker (pid 1) is gone", interrupted=False)
    assert sigints == []
