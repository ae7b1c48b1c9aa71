"""Every way a claim ends without a success keeps its generation open (docs/contract.md "When a
generation ends"), so a holder's committed `exactly_once` write is never applied twice.

Each story: a run of `write_once` commits one warehouse row with its effect marker, then is
stopped before its success stamp — killed and reaped on the spot by the next run, killed and
settled by the run-failure sensor, canceled (SIGINT), stopped by its orphan watch, released by
an operator through the CLI, or its body raises. The next run with the key continues the
generation, finds the marker, inserts nothing (the INSERT has no natural key: a second
application would add a second row) and is stamped `succeeded` with the recorded result.

Runs that must be stopped start in subprocesses (`dagster_layer_run.py`) on the test's instance
and ledger; waits are polls with generous bounds (`wait_for`), never sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster_layer_jobs import (
    AFTER_TAG,
    committed,
    start_run,
    wait_for,
    warehouse_rows,
    work_log,
    write_once_job,
    write_once_watched_job,
)
from test_dagster_processes import SensorTicks, _sensor

from rocky_dagster.ledger import Entry, EventKind, Ledger, State
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions

STOP_BOUND = 120.0
"""How long a test waits for a stopped run worker to exit (a deadlock guard)."""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Run workers to kill at the end of the test, whatever happened."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _commit_and_wait(
    job_name: str, key: str, work_dir: Path, ledger: Ledger, started: list
) -> tuple[subprocess.Popen[str], str, Entry]:
    """Start a run whose `write_once` commits its row, then holds its claim: (process, run id,
    its in-flight entry)."""
    proc = start_run(job_name, {KEY_TAG: key, AFTER_TAG: "wait"})
    started.append(proc)
    run_id = wait_for(lambda: committed(work_dir), "the first run's write to commit")
    assert warehouse_rows(work_dir) == [(run_id,)]
    held = ledger.get(f"{key}/write_once")
    assert held is not None and held.state == State.IN_FLIGHT and held.run_id == run_id
    return proc, run_id, held


def _kill(proc: subprocess.Popen[str], instance: DagsterInstance, run_id: str) -> None:
    """SIGKILL the run worker after its commit, before its stamp; the instance then marks the
    run failed (what the code server or run monitoring does)."""
    proc.kill()
    proc.wait()
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
    instance.report_run_failed(instance.get_run_by_id(run_id))


def _next_run_continues(
    instance: DagsterInstance,
    ledger: Ledger,
    work_dir: Path,
    key: str,
    first: str,
    held: Entry,
    job=write_once_job,
) -> str:
    """The next run with the key continues the generation: its body runs, finds the marker,
    applies nothing, and the key ends `succeeded` with the first run's recorded result."""
    retry = job.execute_in_process(instance=instance, tags={KEY_TAG: key})
    assert retry.success
    assert warehouse_rows(work_dir) == [(first,)]  # one row: nothing applied a second time
    assert step_decisions(instance, retry.run_id)["write_once"] == "proceed"
    entry = ledger.get(f"{key}/write_once")
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == retry.run_id
    assert entry.fence > held.fence and entry.generation == held.generation
    assert entry.result == {"rows": 1, "by": first}  # the first run's recorded work
    assert [run for op, run in work_log(work_dir) if op == "write_once"] == [first, retry.run_id]
    [output] = [e for e in retry.all_events if e.is_successful_output]
    assert output.event_specific_data.metadata["rocky/prior_run_id"].value == first
    return retry.run_id


def test_a_dead_holder_reaped_on_the_spot(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list
) -> None:
    """The lease (120 s) is alive: the next run settles the dead claim `failed` on the spot and
    claims again — the same generation, so the committed row is not written twice."""
    proc, dead, held = _commit_and_wait("write_once_job", "gen-reap", work_dir, ledger, started)
    _kill(proc, instance, dead)

    retry = _next_run_continues(instance, ledger, work_dir, "gen-reap", dead, held)
    kinds = [(e.kind, e.run_id) for e in ledger.history("gen-reap/write_once")]
    assert kinds == [
        (EventKind.CLAIMED, dead),
        (EventKind.SKIPPED_IN_FLIGHT, retry),  # met the dead holder...
        (EventKind.FAILED, dead),  # ...reaped it...
        (EventKind.CLAIMED, retry),  # ...and continued its generation
        (EventKind.SUCCEEDED, retry),
    ]
    assert "reaped by run" in ledger.history("gen-reap/write_once")[2].detail


def test_a_dead_holder_settled_by_the_run_failure_sensor(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list
) -> None:
    ticks = SensorTicks(_sensor("failure"), instance)
    proc, dead, held = _commit_and_wait("write_once_job", "gen-sensor", work_dir, ledger, started)
    _kill(proc, instance, dead)
    ticks.tick()
    settled = ledger.get("gen-sensor/write_once")
    assert settled.state == State.FAILED and settled.run_id == dead and not settled.released
    assert "sensor" in ledger.history("gen-sensor/write_once")[-1].detail

    _next_run_continues(instance, ledger, work_dir, "gen-sensor", dead, held)


def test_a_canceled_run_releases_its_claim(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list
) -> None:
    """SIGINT to the run worker (what a cancel does to an in-process run): the step releases
    its claim; the release keeps the generation open."""
    proc, canceled, held = _commit_and_wait(
        "write_once_job", "gen-cancel", work_dir, ledger, started
    )
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=STOP_BOUND)
    released = ledger.get("gen-cancel/write_once")
    assert released.released and released.run_id == canceled
    last = ledger.history("gen-cancel/write_once")[-1]
    assert last.kind == EventKind.RELEASED
    assert last.detail == f"run {canceled} was interrupted (canceled) during the work"

    _next_run_continues(instance, ledger, work_dir, "gen-cancel", canceled, held)


def test_a_step_stopped_by_its_orphan_watch(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, started: list
) -> None:
    """The instance marks the run finished while its worker lives: the step's watch stops the
    body and releases the claim."""
    proc, orphan, held = _commit_and_wait(
        "write_once_watched_job", "gen-orphan", work_dir, ledger, started
    )
    instance.report_run_failed(instance.get_run_by_id(orphan))
    proc.wait(timeout=STOP_BOUND)
    released = ledger.get("gen-orphan/write_once")
    assert released.released and released.run_id == orphan
    last = ledger.history("gen-orphan/write_once")[-1]
    assert last.kind == EventKind.RELEASED and last.run_id == orphan

    _next_run_continues(
        instance, ledger, work_dir, "gen-orphan", orphan, held, job=write_once_watched_job
    )


def test_an_operator_release_through_the_cli(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str, work_dir: Path, started: list
) -> None:
    """`rocky-dagster ledger release`: the holder's next heartbeat finds its claim lost, its
    step fails without stamping, and the next run continues the generation."""
    proc, holder, held = _commit_and_wait(
        "write_once_watched_job", "gen-operator", work_dir, ledger, started
    )
    release = ["ledger", "release", "gen-operator/write_once", "--url", ledger_url, "--yes"]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "rocky_dagster.cli",
            *release,
            "--reason",
            "stuck, says an operator",
        ],
        capture_output=True,
        text=True,
        timeout=STOP_BOUND,
    )
    assert cli.returncode == 0, cli.stderr
    assert proc.wait(timeout=STOP_BOUND) == 1  # the step lost its claim
    released = ledger.get("gen-operator/write_once")
    assert released.released and released.fence == held.fence  # the step wrote nothing over it

    _next_run_continues(
        instance, ledger, work_dir, "gen-operator", holder, held, job=write_once_watched_job
    )


def test_a_body_that_raises_after_its_exactly_once_block_committed(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    failed = write_once_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "gen-raise", AFTER_TAG: "raise"}, raise_on_error=False
    )
    assert not failed.success
    assert warehouse_rows(work_dir) == [(failed.run_id,)]
    held = ledger.get("gen-raise/write_once")
    assert held.state == State.FAILED and held.run_id == failed.run_id  # by the step itself

    _next_run_continues(instance, ledger, work_dir, "gen-raise", failed.run_id, held)


def test_a_forced_run_begins_a_new_generation_and_applies_again(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """The other side of the rule: a force redoes the work deliberately."""
    first = write_once_job.execute_in_process(instance=instance, tags={KEY_TAG: "gen-force"})
    done = ledger.get("gen-force/write_once")
    forced = write_once_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "gen-force", "rocky/idempotency": "force"}
    )
    assert first.success and forced.success
    entry = ledger.get("gen-force/write_once")
    assert entry.generation == entry.fence > done.generation
    assert warehouse_rows(work_dir) == [(first.run_id,), (forced.run_id,)]
