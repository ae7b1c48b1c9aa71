"""Sensors and schedules ask the ledger before requesting a run (built on a real instance).

A failed key waits for its backoff: the tests never sleep for it, they ask the guard with a
ledger whose clock is set past (or just short of) the end of the failed run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
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

from rocky_dagster import IdempotencyLedger, RequestBackoff, guard_run_requests
from rocky_dagster.ledger import EventKind, Ledger, open_ledger
from rocky_dagster.sensors.run_requests import DEFAULT_BACKOFF
from rocky_dagster.step.keys import KEY_TAG, RUN_KEY_TAG

SENSOR_NAME = "orders_sensor"
KEY = "orders-2024-06-01"


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


def _guard_at(
    ledger_url: str,
    at: datetime,
    context: Any,
    request: RunRequest | None = None,
    **kwargs: Any,
):
    """The guard as the sensor calls it, deciding with a ledger whose clock reads `at`."""
    with open_ledger(ledger_url, clock=lambda: at) as clocked:
        return guard_run_requests(
            context, request or RunRequest(run_key=KEY), ledger=clocked, job=work_job, **kwargs
        )


def _ended(instance: DagsterInstance, result) -> datetime:
    end_time = instance.get_run_record_by_id(result.run_id).end_time
    assert end_time is not None
    return datetime.fromtimestamp(end_time, UTC)


def _launch(instance: DagsterInstance, request: RunRequest, *, fail: bool, sensor: bool = True):
    """Run the request the way the daemon would: its tags plus run_key / sensor name tags."""
    tags = dict(request.tags)
    if sensor:
        tags |= {RUN_KEY_TAG: request.run_key, "dagster/sensor_name": SENSOR_NAME}
    return work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", fail), raise_on_error=False
    )


def test_sensor_guard_rekeys_a_failed_key_and_skips_a_succeeded_one(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    [request] = _tick(instance)
    assert request.run_key == "orders-2024-06-01"
    assert request.tags[KEY_TAG] == "orders-2024-06-01"
    failed = _launch(instance, request, fail=True)
    assert not failed.success

    # Dagster would never launch run_key "orders-2024-06-01" again for this sensor, even though
    # the run failed: the guard re-requests the key under a new run_key, same ledger key (once
    # the first failure's backoff, a minute, has passed)
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    [retry] = _guard_at(ledger_url, _ended(instance, failed) + timedelta(seconds=60), context)
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
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
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
    failed = _launch(instance, request, fail=True, sensor=False)
    assert not failed.success

    # a failed key is requested again (schedules dedup by tick, not by run_key), once its
    # backoff has passed
    assert "failed once; next retry after" in evaluate().skip_message
    context = build_schedule_context(instance=instance, scheduled_execution_time=at)
    later = _ended(instance, failed) + timedelta(seconds=60)
    [again] = _guard_at(ledger_url, later, context, RunRequest(), schedule_name="nightly")
    assert again.tags[KEY_TAG] == key
    succeeded = _launch(instance, again, fail=False, sensor=False)
    assert succeeded.success

    data = evaluate()
    assert not data.run_requests
    assert succeeded.run_id in data.skip_message and key in data.skip_message


# --- backoff of a key whose runs keep failing ------------------------------------------------------


def _fail(instance: DagsterInstance, request: RunRequest) -> datetime:
    """Launch the request and let it fail; when its run ended."""
    result = _launch(instance, request, fail=True)
    assert not result.success
    return _ended(instance, result)


@pytest.mark.parametrize(
    ("backoff", "waits"),
    [
        (DEFAULT_BACKOFF, [60, 120, 240]),
        (RequestBackoff(base_seconds=10, factor=3, max_seconds=50), [10, 30, 50]),
    ],
    ids=["default", "custom"],
)
def test_a_failing_key_is_dropped_within_its_backoff_and_requested_after_it(
    instance: DagsterInstance,
    ledger: Ledger,
    ledger_url: str,
    backoff: RequestBackoff,
    waits: list[int],
) -> None:
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    [request] = _guard_at(ledger_url, datetime.now(UTC), context, backoff=backoff)
    for failures, wait in enumerate(waits, start=1):
        ended = _fail(instance, request)
        retry_at = ended + timedelta(seconds=wait)

        for early in (ended, retry_at - timedelta(microseconds=1)):
            skip = _guard_at(ledger_url, early, context, backoff=backoff)
            assert isinstance(skip, SkipReason), f"{failures} failures, asked at {early}"
            times = "once" if failures == 1 else f"{failures} times in a row"
            assert skip.skip_message == (
                f"key {KEY!r} failed {times}; next retry after {retry_at.isoformat()} "
                f"(backoff {wait} s)"
            )

        [request] = _guard_at(ledger_url, retry_at, context, backoff=backoff)
        assert request.run_key == f"{KEY}#{failures}"
        assert request.tags[KEY_TAG] == KEY


def test_the_backoff_caps_at_max_seconds(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    backoff = RequestBackoff(base_seconds=1, factor=10, max_seconds=5)
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    request = RunRequest(run_key=KEY)
    for _ in range(4):
        ended = _fail(instance, request)
        [request] = _guard_at(ledger_url, ended + timedelta(seconds=5), context, backoff=backoff)
    skip = _guard_at(ledger_url, ended, context, backoff=backoff)
    assert "failed at least 3 times in a row;" in skip.skip_message  # counted up to the cap
    assert "(backoff 5 s)" in skip.skip_message


def test_a_success_resets_the_count_of_failures(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    ended = _fail(instance, RunRequest(run_key=KEY))
    [retry] = _guard_at(ledger_url, ended + timedelta(seconds=60), context)
    ended = _fail(instance, retry)
    [retry] = _guard_at(ledger_url, ended + timedelta(seconds=120), context)
    assert _launch(instance, retry, fail=False).success
    # an operator has the key done again; it fails: one failure since the success, not three
    assert ledger.reset(f"{KEY}/work")
    ended = _fail(instance, RunRequest(run_key=KEY, tags={KEY_TAG: KEY}))

    skip = _guard_at(ledger_url, ended + timedelta(seconds=59), context)
    assert (
        f"key {KEY!r} failed once;" in skip.skip_message and "(backoff 60 s)" in skip.skip_message
    )
    [request] = _guard_at(ledger_url, ended + timedelta(seconds=60), context)
    assert request.tags[KEY_TAG] == KEY


def test_without_an_instance_the_failures_are_counted_from_the_ledger(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    plain = build_sensor_context()  # no instance: the guard reads the key's ledger history

    def failed_at() -> datetime:
        return [e for e in ledger.history(f"{KEY}/work") if e.kind == EventKind.FAILED][-1].at

    _fail(instance, RunRequest(run_key=KEY))
    skip = _guard_at(ledger_url, failed_at() + timedelta(seconds=59), plain)
    assert f"key {KEY!r} failed once;" in skip.skip_message
    [retry] = _guard_at(ledger_url, failed_at() + timedelta(seconds=60), plain)

    _fail(instance, retry)
    skip = _guard_at(ledger_url, failed_at() + timedelta(seconds=119), plain)
    assert f"key {KEY!r} failed 2 times in a row;" in skip.skip_message
    assert "(backoff 120 s)" in skip.skip_message
    [retry] = _guard_at(ledger_url, failed_at() + timedelta(seconds=120), plain)

    assert _launch(instance, retry, fail=False).success
    assert ledger.reset(f"{KEY}/work")
    _fail(instance, RunRequest(run_key=KEY, tags={KEY_TAG: KEY}))  # after the success: once
    skip = _guard_at(ledger_url, failed_at() + timedelta(seconds=59), plain)
    assert f"key {KEY!r} failed once;" in skip.skip_message


def test_backoff_none_re_requests_a_failed_key_on_every_tick(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    request = RunRequest(run_key=KEY)
    for failures in (1, 2, 3):
        ended = _fail(instance, request)
        [request] = _guard_at(ledger_url, ended, context, backoff=None)
        assert request.run_key == f"{KEY}#{failures}"


@pytest.mark.parametrize("backoff", ["60", 60, {"base_seconds": 60}], ids=repr)
def test_backoff_must_be_a_policy_or_none(
    instance: DagsterInstance, ledger_url: str, backoff: object
) -> None:
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    with pytest.raises(TypeError, match=r"backoff must be a (Request|Retry)Backoff or None"):
        _guard_at(ledger_url, datetime.now(UTC), context, backoff=backoff)


def test_without_an_instance_a_key_in_flight_is_skipped_not_an_error(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    live = instance.create_run_for_job(job_def=work_job, tags={KEY_TAG: KEY})
    ledger.claim(f"{KEY}/work", live.run_id)

    skip = _guard_at(ledger_url, datetime.now(UTC), build_sensor_context())
    assert f"in flight in run {live.run_id}" in skip.skip_message


def test_under_dedup_on_any_a_failed_key_is_done_but_a_released_one_is_requested(
    dagster_home: Any, ledger_url: str
) -> None:
    """A released claim never deduplicates (its work neither succeeded nor failed), so the
    guard requests its key even under dedup_on='any', where a failure counts as done."""
    with open_ledger(ledger_url, {"dedup_on": "any"}) as policy_any:
        failed = policy_any.claim("failed-key/work", "run-1")
        assert policy_any.finalize("failed-key/work", failed.fence, "failed").applied
        policy_any.claim("released-key/work", "run-2")
        assert policy_any.release("released-key/work", reason="canceled")
    now, context = datetime.now(UTC), build_sensor_context()

    skip = _guard_at(ledger_url, now, context, RunRequest(run_key="failed-key"), backoff=None)
    assert isinstance(skip, SkipReason)
    assert "'failed-key' already completed in run run-1" in skip.skip_message
    [request] = _guard_at(
        ledger_url, now, context, RunRequest(run_key="released-key"), backoff=None
    )
    assert request.tags[KEY_TAG] == "released-key"


def test_a_canceled_run_of_the_key_counts_as_a_failure_for_the_backoff(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    """Canceled before it claimed anything (the ledger knows nothing of it): the instance's
    run record alone makes the key wait, as a failed run would."""
    context = build_sensor_context(instance=instance, sensor_name=SENSOR_NAME)
    run = instance.create_run_for_job(
        job_def=work_job,
        tags={KEY_TAG: KEY, RUN_KEY_TAG: KEY},
        run_config=fail_config("work", False),
    )
    instance.report_run_canceling(run)
    instance.report_run_canceled(run)
    record = instance.get_run_record_by_id(run.run_id)
    assert record.dagster_run.status.value == "CANCELED"
    assert ledger.get(f"{KEY}/work") is None
    now = datetime.now(UTC)

    skip = _guard_at(ledger_url, now, context)

    assert isinstance(skip, SkipReason)
    assert skip.skip_message.startswith(f"key {KEY!r} failed once; next retry after ")
    assert skip.skip_message.endswith("(backoff 60 s)")
    [request] = _guard_at(ledger_url, now + timedelta(seconds=61), context)
    assert request.run_key == f"{KEY}#1"
