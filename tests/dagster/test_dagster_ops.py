"""Stories of a guarded op inside one Dagster instance: failure, one-shot, op retry, run retry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    ReexecutionOptions,
    build_reconstructable_job,
    execute_job,
    in_process_executor,
    reconstructable,
)
from dagster_layer_jobs import (
    fail_config,
    first,
    flaky_once,
    two_step_job,
    work_job,
    work_log,
)

from rocky_dagster import IdempotencyLedger, ledger_job
from rocky_dagster.decorators.hooks import ledger_hooks
from rocky_dagster.decorators.jobs import ledger_job as build_ledger_job
from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.keys import KEY_TAG, OUTCOME_TAG, RUN_KEY_TAG
from rocky_dagster.step.presentation import step_decisions

HERE = Path(__file__).parent


def _output_metadata(result, step: str) -> dict:
    [event] = [
        e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == step
    ]
    return event.event_specific_data.metadata


def test_f1_failed_run_releases_key_next_run_proceeds_third_skips(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    tags = {KEY_TAG: "orders-2024-06-01"}

    # 1. the op raises: its claim is finalized failed at once, so nothing stays in flight
    first = work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", True), raise_on_error=False
    )
    assert not first.success
    entry = ledger.get("orders-2024-06-01/work")
    assert entry is not None and entry.state == State.FAILED and entry.run_id == first.run_id

    # 2. the same key proceeds immediately (no lease to wait out) and succeeds
    second = work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", False)
    )
    assert second.success
    entry = ledger.get("orders-2024-06-01/work")
    assert entry.state == State.SUCCEEDED and entry.run_id == second.run_id
    assert entry.result == {"rows": 42}
    assert step_decisions(instance, second.run_id)["work"] == "proceed"

    # 3. a third run does no work and replays the recorded result, naming the run that did it
    third = work_job.execute_in_process(
        instance=instance, tags=tags, run_config=fail_config("work", False)
    )
    assert third.success
    assert third.output_for_node("work") == {
        "rows": 42,
        "replayed": True,
        "prior_run_id": second.run_id,
    }
    meta = _output_metadata(third, "work")
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/prior_run_id"].value == second.run_id
    assert meta["rocky/ledger_key"].value == "orders-2024-06-01/work"
    assert step_decisions(instance, third.run_id)["work"] == "skipped_completed"
    # the replayed values, one metadata entry each (a skip shows the numbers it replays)
    assert meta["rocky/replayed/rows"].value == 42
    # the run's summary: two rocky/ tags, whatever the op count
    assert {
        k: v for k, v in instance.get_run_by_id(third.run_id).tags.items() if k.startswith("rocky/")
    } == {
        KEY_TAG: "orders-2024-06-01",
        OUTCOME_TAG: "skipped",
    }
    assert instance.get_run_by_id(second.run_id).tags[OUTCOME_TAG] == "worked"
    assert [run for _, run in work_log(work_dir)] == [first.run_id, second.run_id]


def test_one_shot_succeeded_op_stays_succeeded_and_reexecution_runs_only_the_failed_op(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    tags = {KEY_TAG: "daily-7"}
    parent = execute_job(
        reconstructable(two_step_job),
        instance=instance,
        tags=tags,
        run_config=fail_config("second", True),
    )
    assert not parent.success
    first_entry = ledger.get("daily-7/first")
    assert first_entry.state == State.SUCCEEDED and first_entry.run_id == parent.run_id
    assert ledger.get("daily-7/second").state == State.FAILED

    child = execute_job(
        reconstructable(two_step_job),
        instance=instance,
        run_config=fail_config("second", False),
        reexecution_options=ReexecutionOptions.from_failure(parent.run_id, instance),
    )
    assert child.success
    # `first` was neither re-run nor touched; `second` proceeded under the parent's key
    assert ledger.get("daily-7/first") == first_entry
    second_entry = ledger.get("daily-7/second")
    assert second_entry.state == State.SUCCEEDED and second_entry.run_id == child.run_id
    assert work_log(work_dir) == [
        ("first", parent.run_id),
        ("second", parent.run_id),
        ("second", child.run_id),
    ]
    assert ledger.entries(State.IN_FLIGHT) == []


@pytest.mark.parametrize("dedup_on", ["success", "any"])
def test_op_retry_policy_reenters_its_own_claim(
    dedup_on: str, instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """Under 'any' a failed stamp between attempts would make attempt 2 skip: the claim is kept."""

    def retry_graph() -> None:
        flaky_once()

    job = ledger_job(
        retry_graph,
        name=f"retry_{dedup_on}",
        ledger=IdempotencyLedger(dedup_on=dedup_on),
        executor_def=in_process_executor,
    )
    result = job.execute_in_process(instance=instance, tags={KEY_TAG: "retry-1"})
    assert result.success
    assert result.output_for_node("flaky_once") == {"attempt": 2}
    assert [op for op, _ in work_log(work_dir)] == ["flaky_once", "flaky_once"]
    entry = ledger.get("retry-1/flaky_once")
    assert entry.state == State.SUCCEEDED and entry.run_id == result.run_id
    # the failed attempt parks its claim, so the retry (in this same process) re-enters it
    history = ledger.history("retry-1/flaky_once")
    assert [e.kind for e in history] == [
        EventKind.CLAIMED,
        EventKind.KEPT_FOR_RETRY,
        EventKind.CLAIMED,
        EventKind.SUCCEEDED,
    ]
    assert entry.generation == history[0].fence


@pytest.mark.parametrize("dedup_on", ["success", "any"])
def test_op_retry_policy_reenters_its_own_claim_from_a_new_step_process(
    dedup_on: str, instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """Under the multiprocess executor each attempt is a process of its own: the retry's
    process re-enters the claim the failed attempt's process kept for it (its step context
    says retries are "deferred" to the engine: they still happen)."""
    job = build_reconstructable_job(
        "dagster_layer_jobs",
        "flaky_multiprocess_job",
        reconstructable_args=(dedup_on,),
        reconstructor_working_directory=str(HERE),
    )  # step processes import the job by module name from this directory
    with execute_job(job, instance=instance, tags={KEY_TAG: f"retry-2-{dedup_on}"}) as result:
        assert result.success
        assert result.output_for_node("flaky_once") == {"attempt": 2}
    attempt_pids = {
        e.dagster_event.pid
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is not None
        and e.dagster_event.event_type_value in ("STEP_START", "STEP_RESTARTED")
    }
    assert len(attempt_pids) == 2 and os.getpid() not in attempt_pids  # a process per attempt
    assert [op for op, _ in work_log(work_dir)] == ["flaky_once", "flaky_once"]
    entry = ledger.get(f"retry-2-{dedup_on}/flaky_once")
    assert entry.state == State.SUCCEEDED and entry.run_id == result.run_id
    history = ledger.history(f"retry-2-{dedup_on}/flaky_once")
    assert [e.kind for e in history] == [
        EventKind.CLAIMED,
        EventKind.KEPT_FOR_RETRY,
        EventKind.CLAIMED,
        EventKind.SUCCEEDED,
    ]
    assert "kept for the retry" in history[2].detail
    assert entry.generation == history[0].fence


def test_reexecution_from_failure_inherits_the_key_then_skips_after_success(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """The Python-API re-execution copies no tags: the key comes from the parent run."""
    recon = reconstructable(work_job)
    parent = execute_job(
        recon,
        instance=instance,
        tags={RUN_KEY_TAG: "sensor-key-5"},
        run_config=fail_config("work", True),
    )
    assert not parent.success
    retry = execute_job(
        recon,
        instance=instance,
        run_config=fail_config("work", False),
        reexecution_options=ReexecutionOptions.from_failure(parent.run_id, instance),
    )
    assert retry.success
    assert RUN_KEY_TAG not in instance.get_run_by_id(retry.run_id).tags
    entry = ledger.get("sensor-key-5/work")
    assert entry.state == State.SUCCEEDED and entry.run_id == retry.run_id

    again = execute_job(
        recon,
        instance=instance,
        run_config=fail_config("work", False),
        reexecution_options=ReexecutionOptions(parent_run_id=retry.run_id, step_selection=["work"]),
    )
    assert again.success
    assert step_decisions(instance, again.run_id)["work"] == "skipped_completed"
    assert [run for _, run in work_log(work_dir)] == [parent.run_id, retry.run_id]


def test_run_retry_with_parent_tags_proceeds_after_failure_skips_after_success(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """What the retry daemon and the UI do: copy every parent tag, runtime-added ones included."""
    parent = work_job.execute_in_process(
        instance=instance,
        tags={RUN_KEY_TAG: "sensor-key-6"},
        run_config=fail_config("work", True),
        raise_on_error=False,
    )
    parent_tags = dict(instance.get_run_by_id(parent.run_id).tags)
    assert step_decisions(instance, parent.run_id)["work"] == "proceed"
    assert parent_tags[OUTCOME_TAG] == "failed"  # named for what it is, not "worked"
    assert parent_tags[KEY_TAG] == "sensor-key-6"

    retry = work_job.execute_in_process(
        instance=instance, tags=parent_tags, run_config=fail_config("work", False)
    )
    assert retry.success
    assert ledger.get("sensor-key-6/work").run_id == retry.run_id

    retry_tags = dict(instance.get_run_by_id(retry.run_id).tags)
    third = work_job.execute_in_process(
        instance=instance, tags=retry_tags, run_config=fail_config("work", False)
    )
    assert third.success
    assert step_decisions(instance, third.run_id)["work"] == "skipped_completed"
    assert [run for _, run in work_log(work_dir)] == [parent.run_id, retry.run_id]


def _hook_events(result) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.event_type_value.startswith("HOOK_")]


def test_ledger_job_attaches_no_hooks_unless_asked(instance: DagsterInstance, ledger: Ledger):
    """Off by default: the step and the run-status sensors settle every claim without a hook."""

    @build_ledger_job(executor_def=in_process_executor)
    def plain() -> None:
        first()

    @build_ledger_job(executor_def=in_process_executor, hooks=ledger_hooks)
    def hooked() -> None:
        first()

    ran = plain.execute_in_process(
        instance=instance, tags={KEY_TAG: "plain"}, resources={"ledger": IdempotencyLedger()}
    )
    asked = hooked.execute_in_process(
        instance=instance, tags={KEY_TAG: "hooked"}, resources={"ledger": IdempotencyLedger()}
    )

    assert ran.success and asked.success
    assert _hook_events(ran) == []
    assert plain.hook_defs == set()
    assert _hook_events(asked) != []  # the same step with the hook asked for does report it
    assert ledger.get("plain/first").state == State.SUCCEEDED  # settled by the step itself


def test_a_step_delivered_again_while_its_first_attempt_holds_the_key_fails_not_skips(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """A Celery task or Dask future delivered again after its worker was lost meets its own
    run's claim, held by a process the ledger cannot check (another container). Skipping would
    let the run succeed without the work, and the run's success would stamp the key done: the
    step fails instead, doing nothing, and the key is still claimable once the run is over."""
    run_id = "0f0e0d0c-0000-4000-8000-000000000001"
    ledger._process = lambda: "host:another-container/42"  # type: ignore[attr-defined]
    held = ledger.claim("redelivered/work", run_id, pipeline="op")
    assert held.should_run

    again = work_job.execute_in_process(
        instance=instance,
        run_id=run_id,
        tags={KEY_TAG: "redelivered"},
        run_config=fail_config("work", False),
        raise_on_error=False,
    )

    assert not again.success
    [failure] = [e for e in again.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "held by an earlier attempt of step 'work' in this same run" in str(
        failure.event_specific_data.error
    )
    assert work_log(work_dir) == []
    entry = ledger.get("redelivered/work")
    assert entry is not None and entry.state == State.IN_FLIGHT and entry.fence == held.fence


def test_a_launch_with_tags_copied_from_a_failed_run_says_what_it_did(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """The Launchpad copies a run's tags into a new launch (no parent run): its own outcome
    replaces the copied `rocky/outcome`, in the step, with no sensor."""
    copied = {KEY_TAG: "copied-1", OUTCOME_TAG: "failed"}
    result = work_job.execute_in_process(
        instance=instance, tags=copied, run_config=fail_config("work", False)
    )
    assert result.success
    assert instance.get_run_by_id(result.run_id).tags[OUTCOME_TAG] == "worked"
    again = work_job.execute_in_process(
        instance=instance,
        tags={KEY_TAG: "copied-1", OUTCOME_TAG: "worked"},
        run_config=fail_config("work", False),
    )
    assert instance.get_run_by_id(again.run_id).tags[OUTCOME_TAG] == "skipped"
