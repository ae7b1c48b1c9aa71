"""Sensors and schedules ask the ledger before requesting a run (built on a real instance)."""

from __future__ import annotations

from datetime import UTC, datetime

from dagster import (
    DagsterInstance,
    RunRequest,
    RunsFilter,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    schedule,
    sensor,
)
from dagster_layer_jobs import fail_config, work_job

from rocky_dagster import IdempotencyLedger, guard_run_requests
from rocky_dagster.keys import KEY_TAG, RUN_KEY_TAG
from rocky_dagster.ledger import Ledger

SENSOR_NAME = "orders_sensor"


@sensor(job=work_job, name=SENSOR_NAME)
def orders_sensor(context, ledger: IdempotencyLedger):
    """Wants the 2024-06-01 orders processed, every tick."""
    return guard_run_requests(
        context, [RunRequest(run_key="orders-2024-06-01")], ledger=ledger, job=work_job
    )


@schedule(job=work_job, cron_schedule="0 2 * * *", name="nightly")
def nightly(context, ledger: IdempotencyLedger):
    return guard_run_requests(
        context, RunRequest(), ledger=ledger, job=work_job, schedule_name="nightly"
    )


def _tick(instance: DagsterInstance):
    context = build_sensor_context(
        instance=instance, sensor_name=SENSOR_NAME, resources={"ledger": IdempotencyLedger()}
    )
    return orders_sensor(context)


def _launch(instance: DagsterInstance, request: RunRequest, *, fail: bool, sensor: bool = True):
    """Run the request the way the daemon would: its tags plus run_key / sensor name tags."""
    tags = dict(request.tags)
    if sensor:
        tags |= {RUN_KEY_TAG: request.run_key, "dagster/sensor_name": SENSOR_NAME}
    return work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", fail), raise_on_error=False
    )


def test_sensor_guard_rekeys_a_failed_key_and_skips_a_succeeded_one(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    [request] = _tick(instance)
    assert request.run_key == "orders-2024-06-01"
    assert request.tags[KEY_TAG] == "orders-2024-06-01"
    failed = _launch(instance, request, fail=True)
    assert not failed.success

    # Dagster would never launch run_key "orders-2024-06-01" again for this sensor, even though
    # the run failed: the guard re-requests the key under a new run_key, same ledger key
    [retry] = _tick(instance)
    assert retry.run_key == "orders-2024-06-01#1"
    assert retry.tags[KEY_TAG] == "orders-2024-06-01"
    assert not instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: retry.run_key}))
    succeeded = _launch(instance, retry, fail=False)
    assert succeeded.success
    assert ledger.get("orders-2024-06-01/work").run_id == succeeded.run_id

    skip = _tick(instance)
    assert isinstance(skip, SkipReason)
    assert "orders-2024-06-01" in skip.skip_message
    assert succeeded.run_id in skip.skip_message


def test_sensor_guard_skips_a_key_in_flight_in_a_live_run(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    live = instance.create_run_for_job(job_def=work_job, tags={KEY_TAG: "orders-2024-06-01"})
    ledger.claim("orders-2024-06-01/work", live.run_id)  # as its `work` step would

    skip = _tick(instance)
    assert isinstance(skip, SkipReason)
    assert f"in flight in run {live.run_id}" in skip.skip_message


def test_schedule_guard_keys_by_schedule_and_time(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    at = datetime(2024, 6, 1, 2, 0, tzinfo=UTC)

    def evaluate():
        context = build_schedule_context(
            instance=instance,
            scheduled_execution_time=at,
            resources={"ledger": IdempotencyLedger()},
        )
        return nightly.evaluate_tick(context)

    [request] = evaluate().run_requests
    key = request.tags[KEY_TAG]
    assert key == "nightly@2024-06-01T02:00:00+00:00"
    assert not _launch(instance, request, fail=True, sensor=False).success

    # a failed key is requested again (schedules dedup by tick, not by run_key)
    [again] = evaluate().run_requests
    assert again.tags[KEY_TAG] == key
    succeeded = _launch(instance, again, fail=False, sensor=False)
    assert succeeded.success

    data = evaluate()
    assert not data.run_requests
    assert succeeded.run_id in data.skip_message and key in data.skip_message
