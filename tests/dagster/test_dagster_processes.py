"""Stories with real processes: two runs racing for a key, killed workers, a canceled run.

Runs start in subprocesses (`dagster_layer_run.py`) on the test's instance and ledger; a `hold`
body keeps its claim until the test creates the ``go`` file, so every ordering below is
enforced by the ledger, never by sleeping.
"""

from __future__ import annotations

from pathlib import Path

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    SensorDefinition,
    build_sensor_context,
)
from dagster_layer_jobs import (
    hold_and_explode_job,
    hold_job,
    holder_started,
    start_run,
    wait_for,
    work_log,
)

from rocky_dagster import IdempotencyLedger, ledger_run_status_sensors
from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.keys import KEY_TAG
from rocky_dagster.step.presentation import step_decisions


def _sensor(status: str) -> SensorDefinition:
    [found] = [s for s in ledger_run_status_sensors() if s.name.endswith(f"_on_{status}")]
    return found


class SensorTicks:
    """Evaluate a run-status sensor tick by tick, as the daemon does (cursor and all)."""

    def __init__(self, sensor: SensorDefinition, instance: DagsterInstance) -> None:
        self.sensor = sensor
        self.instance = instance
        self.cursor: str | None = None
        self.tick()  # the first tick only places the cursor, like the daemon's

    def tick(self) -> None:
        context = build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"ledger": IdempotencyLedger()}
        )
        data = self.sensor.evaluate_tick(context)
        self.cursor = data.cursor


def _messages(instance: DagsterInstance, run_id: str) -> str:
    """Everything the run's log shows: log lines and event messages."""
    return "\n".join(
        e.user_message or (e.dagster_event.message or "" if e.dagster_event else "")
        for e in instance.all_logs(run_id)
    )


def _kill_holder(instance: DagsterInstance, work_dir: Path, key: str) -> str:
    """Start a run that claims `key/hold`, SIGKILL it mid-op; return its run id."""
    proc = start_run("hold_job", {KEY_TAG: key})
    try:
        holder = wait_for(lambda: holder_started(work_dir), "the run to start its work")
    finally:
        proc.kill()
        proc.wait()
    assert instance.get_run_by_id(holder).status == DagsterRunStatus.STARTED
    return holder


def test_concurrent_duplicates_exactly_one_does_the_work(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    procs = [start_run("hold_job", {KEY_TAG: "race-1"}) for _ in range(2)]
    try:
        # the loser finishes (skipped) while the winner still holds the key and waits for "go"
        [loser] = wait_for(
            lambda: [p for p in procs if p.poll() is not None], "one of the two runs to finish"
        )
        winner = wait_for(lambda: holder_started(work_dir), "the winner to be in its body")
        assert loser.returncode == 0, loser.stderr.read()
        (work_dir / "go").touch()
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            proc.kill()
    loser_run = loser.stdout.read().split()[-1]

    assert work_log(work_dir) == [("hold", winner)]
    assert step_decisions(instance, loser_run)["hold"] == "skipped_in_flight"
    assert step_decisions(instance, winner)["hold"] == "proceed"
    assert f"worked on by run {winner}" in _messages(instance, loser_run)
    [skip] = [
        e.dagster_event.engine_event_data.metadata
        for e in instance.all_logs(loser_run)
        if e.dagster_event is not None
        and e.dagster_event.event_type_value == "ENGINE_EVENT"
        and e.step_key == "hold"
    ]
    assert skip["rocky/decision"].value == "skipped_in_flight"
    assert skip["rocky/held_by_run_id"].value == winner
    entry = ledger.get("race-1/hold")
    assert entry.state == State.SUCCEEDED and entry.run_id == winner


def test_killed_worker_next_run_reaps_the_dead_holder_at_once(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    dead = _kill_holder(instance, work_dir, "nightly-7")
    held = ledger.get("nightly-7/hold")
    assert held.state == State.IN_FLIGHT and held.run_id == dead
    instance.report_run_failed(instance.get_run_by_id(dead))  # what the code server does

    # the lease (120 s) has not expired and no sensor ran: the next run still proceeds now
    (work_dir / "go").touch()
    retry = hold_job.execute_in_process(instance=instance, tags={KEY_TAG: "nightly-7"})
    assert retry.success
    assert step_decisions(instance, retry.run_id)["hold"] == "proceed"
    [output] = [e for e in retry.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert output.event_specific_data.metadata["rocky/reaped_run_id"].value == dead
    entry = ledger.get("nightly-7/hold")
    history = [(e.kind, e.run_id, e.fence) for e in ledger.history("nightly-7/hold")]
    assert history == [
        (EventKind.CLAIMED, dead, held.fence),
        (EventKind.SKIPPED_IN_FLIGHT, retry.run_id, None),  # met the dead holder...
        (EventKind.FAILED, dead, held.fence),  # ...settled it on the spot...
        (EventKind.CLAIMED, retry.run_id, entry.fence),  # ...and claimed again
        (EventKind.SUCCEEDED, retry.run_id, entry.fence),
    ]
    assert entry.state == State.SUCCEEDED and entry.run_id == retry.run_id
    assert [run for _, run in work_log(work_dir)] == [dead, retry.run_id]
    # the history says who settled the dead claim
    settled = ledger.history("nightly-7/hold")[2]
    assert settled.detail == f"holder run {dead} is FAILURE; reaped by run {retry.run_id}"


def test_killed_worker_failure_sensor_settles_the_claim(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    ticks = SensorTicks(_sensor("failure"), instance)
    dead = _kill_holder(instance, work_dir, "nightly-8")
    instance.report_run_failed(instance.get_run_by_id(dead))
    assert ledger.get("nightly-8/hold").state == State.IN_FLIGHT

    ticks.tick()
    entry = ledger.get("nightly-8/hold")
    assert entry.state == State.FAILED and entry.run_id == dead
    settled = ledger.history("nightly-8/hold")[-1]
    assert settled.detail == f"run {dead} is FAILURE (sensor rocky_ledger_on_failure)"

    # the sensor already settled it: the next run proceeds without reaping anything
    (work_dir / "go").touch()
    retry = hold_job.execute_in_process(instance=instance, tags={KEY_TAG: "nightly-8"})
    [output] = [e for e in retry.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert "rocky/reaped_run_id" not in output.event_specific_data.metadata
    assert output.event_specific_data.metadata["rocky/prior_run_id"].value == dead


def test_canceled_run_canceled_sensor_releases_the_claim(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """A cancel whose worker died before cleaning up (hooks never fire on a cancel)."""
    ticks = SensorTicks(_sensor("canceled"), instance)
    dead = _kill_holder(instance, work_dir, "nightly-9")
    run = instance.get_run_by_id(dead)
    instance.report_run_canceling(run)
    instance.report_run_canceled(run)
    assert ledger.get("nightly-9/hold").state == State.IN_FLIGHT

    ticks.tick()
    assert ledger.get("nightly-9/hold").released
    last = ledger.history("nightly-9/hold")[-1]
    assert last.kind == EventKind.RELEASED and last.run_id == dead
    assert "CANCELED" in (last.detail or "")


def test_skipped_in_flight_run_never_releases_the_holders_claim(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    ticks = SensorTicks(_sensor("failure"), instance)
    proc = start_run("hold_job", {KEY_TAG: "shared-10"})
    try:
        holder = wait_for(lambda: holder_started(work_dir), "the holder to be in its body")
        before = ledger.get("shared-10/hold")

        # same key, another run: `hold` skips (holder alive), `explode` fails the run, so its
        # failure hook fires and then the failure sensor sees a FAILURE run
        other = hold_and_explode_job.execute_in_process(
            instance=instance, tags={KEY_TAG: "shared-10"}, raise_on_error=False
        )
        assert not other.success
        assert step_decisions(instance, other.run_id)["hold"] == "skipped_in_flight"
        assert any(
            e.event_type_value == "HOOK_COMPLETED" and e.step_key == "explode"
            for e in other.all_events
        )
        ticks.tick()
        assert ledger.get("shared-10/hold") == before  # same run, same fence, still in flight
        assert before.state == State.IN_FLIGHT and before.run_id == holder

        (work_dir / "go").touch()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    entry = ledger.get("shared-10/hold")
    assert entry.state == State.SUCCEEDED and entry.run_id == holder
    assert work_log(work_dir) == [("hold", holder)]
