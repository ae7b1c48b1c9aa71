"""The backstops behind a step's own settling, each proven where it matters.

A guarded step stamps its own claim; when that write fails (the ledger briefly unwritable just
after the outputs were stored), the ledger hook (if attached), the SUCCESS run-status sensor or
the next run's on-the-spot reap must record the step as `succeeded` — the work is done. And a
cancel releases the claim from the step itself, not later from the CANCELED sensor.
"""

from __future__ import annotations

import signal
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus
from dagster_layer_jobs import (
    holder_started,
    make_ledger_writable,
    slow_stamp_job,
    stamp_fails_with_hook_job,
    stamp_fails_without_hooks_job,
    start_run,
    wait_for,
    work_log,
)
from test_dagster_processes import SensorTicks, _sensor

from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions


def _messages(instance: DagsterInstance, run_id: str) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run_id))


def test_the_hook_stamps_a_claim_whose_own_stamp_failed(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    result = stamp_fails_with_hook_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "stamp-1"}, run_config={"loggers": {"watch": {}}}
    )
    assert result.success
    messages = _messages(instance, result.run_id)
    assert "could not stamp ledger key 'stamp-1/slow_stamp' succeeded" in messages
    entry = ledger.get("stamp-1/slow_stamp")
    assert entry.state == State.SUCCEEDED and entry.run_id == result.run_id
    assert entry.result == {"rows": 3}  # the hook kept the step's summary
    assert "hook finalized ledger key 'stamp-1/slow_stamp' succeeded" in messages


def test_without_hooks_the_success_sensor_stamps_it_succeeded(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    ticks = SensorTicks(_sensor("success"), instance)
    try:
        result = stamp_fails_without_hooks_job.execute_in_process(
            instance=instance, tags={KEY_TAG: "stamp-2"}
        )
    finally:
        make_ledger_writable()  # the outage ends
    assert result.success
    assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.SUCCESS
    assert ledger.get("stamp-2/slow_stamp").state == State.IN_FLIGHT  # nobody stamped it yet

    ticks.tick()
    entry = ledger.get("stamp-2/slow_stamp")
    assert entry.state == State.SUCCEEDED and entry.run_id == result.run_id
    last = ledger.history("stamp-2/slow_stamp")[-1]
    assert last.kind == EventKind.SUCCEEDED and last.run_id == result.run_id

    again = slow_stamp_job.execute_in_process(instance=instance, tags={KEY_TAG: "stamp-2"})
    assert step_decisions(instance, again.run_id) == {"slow_stamp": "skipped_completed"}
    assert [run for _, run in work_log(work_dir)] == [result.run_id]


def test_without_hooks_or_sensors_the_next_run_reaps_it_as_succeeded(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    try:
        first = stamp_fails_without_hooks_job.execute_in_process(
            instance=instance, tags={KEY_TAG: "stamp-3"}
        )
    finally:
        make_ledger_writable()
    assert first.success
    assert ledger.get("stamp-3/slow_stamp").state == State.IN_FLIGHT

    # the holder run is SUCCESS in Dagster: its claim is settled `succeeded` on the spot, so
    # the work is not done twice
    second = slow_stamp_job.execute_in_process(instance=instance, tags={KEY_TAG: "stamp-3"})
    assert step_decisions(instance, second.run_id) == {"slow_stamp": "skipped_completed"}
    kinds = [(e.kind, e.run_id) for e in ledger.history("stamp-3/slow_stamp")]
    assert kinds == [
        (EventKind.CLAIMED, first.run_id),
        (EventKind.SKIPPED_IN_FLIGHT, second.run_id),
        (EventKind.SUCCEEDED, first.run_id),
        (EventKind.SKIPPED_COMPLETED, second.run_id),
    ]
    assert [run for _, run in work_log(work_dir)] == [first.run_id]


def test_an_interrupted_step_releases_its_claim_itself(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """SIGINT to the run's process (what a cancel does to an in-process run): the step's own
    handler releases the claim, naming the run, before any CANCELED sensor could."""
    proc = start_run("hold_job", {KEY_TAG: "cancel-1"})
    try:
        holder = wait_for(lambda: holder_started(work_dir), "the run to be in its body")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert ledger.get("cancel-1/hold").released
    last = ledger.history("cancel-1/hold")[-1]
    assert last.kind == EventKind.RELEASED and last.run_id == holder
    assert last.detail == f"run {holder} was interrupted (canceled) during the work"
    assert "sensor" not in last.detail
