"""What a person sees: two `rocky/` run tags whatever the op count, each step's decision and
replayed figures in its metadata, and a summary a re-execution does not copy from its parent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    IOManager,
    in_process_executor,
    io_manager,
    job,
    op,
)
from dagster_layer_jobs import make_pipeline_inputs, pipelines_job
from test_dagster_processes import SensorTicks, _sensor

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_job
from rocky_dagster.ledger import Ledger, Outcome, State
from rocky_dagster.step.keys import KEY_TAG, OUTCOME_TAG
from rocky_dagster.step.presentation import step_decisions


def _numbered(i: int):
    def body(context) -> dict[str, Any]:
        return {"rows": i, "table": f"t{i}"}

    return idempotent_op(name=f"step_{i:02d}")(body)


TWELVE = [_numbered(i) for i in range(12)]


def _twelve() -> None:
    for step in TWELVE:
        step()


twelve_job = ledger_job(
    _twelve, name="twelve", ledger=IdempotencyLedger(), executor_def=in_process_executor
)


def _rocky_tags(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return {k: v for k, v in run.tags.items() if k.startswith("rocky/")}


def _outputs(instance: DagsterInstance, run_id: str) -> dict[str, dict[str, Any]]:
    """step key -> its output metadata, as stored in the run's event log."""
    found = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_OUTPUT):
        event = record.dagster_event
        found[record.step_key] = dict(event.step_output_data.metadata)
    return found


def test_a_twelve_op_job_carries_two_rocky_tags_worked_skipped_mixed(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    worked = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-1"})
    assert _rocky_tags(instance, worked.run_id) == {KEY_TAG: "d-1", OUTCOME_TAG: "worked"}

    skipped = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-1"})
    assert _rocky_tags(instance, skipped.run_id) == {KEY_TAG: "d-1", OUTCOME_TAG: "skipped"}

    # one step of key d-2 already done elsewhere: the run both skipped and worked
    claim = ledger.claim("d-2/step_05", "another-run")
    ledger.finalize(claim.key, claim.fence, Outcome.SUCCEEDED, result={"rows": 5})
    mixed = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-2"})
    assert _rocky_tags(instance, mixed.run_id) == {KEY_TAG: "d-2", OUTCOME_TAG: "mixed"}
    decisions = step_decisions(instance, mixed.run_id)
    assert decisions.pop("step_05") == "skipped_completed"
    assert set(decisions.values()) == {"proceed"} and len(decisions) == 11


def test_every_skipped_step_shows_its_decision_and_the_values_it_replays(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    first = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-3"})
    second = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-3"})
    outputs = _outputs(instance, second.run_id)
    assert len(outputs) == 12
    for i, step in enumerate(s.name for s in TWELVE):
        meta = outputs[step]
        assert meta["rocky/decision"].value == "skipped_completed"
        assert meta["rocky/prior_run_id"].value == first.run_id
        assert meta["rocky/replayed/rows"].value == i
        assert meta["rocky/replayed/table"].value == f"t{i}"
        assert "rocky/expires_at" in meta  # the retention expiry of the record it replays
        assert not any("lease" in name for name in meta)  # a finished claim has no lease
    # a proceeding step shows its decision and fence, and no replayed values
    meta = _outputs(instance, first.run_id)["step_00"]
    assert meta["rocky/decision"].value == "proceed" and meta["rocky/fence"].value > 0
    assert not any(name.startswith("rocky/replayed/") for name in meta)


def test_a_plain_proceed_adds_no_log_line_a_skip_does(instance: DagsterInstance) -> None:
    first = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-4"})
    second = twelve_job.execute_in_process(instance=instance, tags={KEY_TAG: "d-4"})

    def rocky_lines(run_id: str) -> list[str]:
        return [
            e.user_message
            for e in instance.all_logs(run_id)
            if e.user_message.startswith("rocky_dagster:")
        ]

    assert rocky_lines(first.run_id) == []
    lines = rocky_lines(second.run_id)
    assert len(lines) == 12 and all("SKIPPED" in line for line in lines)


def test_every_skipped_pipeline_step_shows_its_replayed_figures(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    make_pipeline_inputs(work_dir)
    job_def = pipelines_job()
    first = job_def.execute_in_process(instance=instance, tags={KEY_TAG: "etl-9"})
    second = job_def.execute_in_process(instance=instance, tags={KEY_TAG: "etl-9"})
    first_out, second_out = _outputs(instance, first.run_id), _outputs(instance, second.run_id)
    for step in ("load", "replication", "transformation", "quality", "snapshot"):
        meta = second_out[step]
        assert meta["rocky/decision"].value == "skipped_completed", step
        # the figures the work reported are the ones the skip replays
        assert meta["rocky/replayed/rows_read"].value == first_out[step]["rows_read"].value, step
        assert meta["rocky/replayed/rows_changed"].value == first_out[step]["rows_changed"].value, (
            step
        )
    assert second_out["notify"]["rocky/replayed/sent"].value == 1
    assert _rocky_tags(instance, second.run_id)[OUTCOME_TAG] == "skipped"


class _FailingStore(IOManager):
    """Stores nothing: raises after the body returned, as a full disk or a lost bucket would."""

    def handle_output(self, context, obj) -> None:
        raise OSError("the store is unreachable")

    def load_input(self, context):  # pragma: no cover - never reached
        raise NotImplementedError


@idempotent_op
def produce(context) -> dict[str, Any]:
    return {"rows": 7}


@job(
    resource_defs={
        "ledger": IdempotencyLedger(),
        "io_manager": io_manager(lambda _: _FailingStore()),
    },
    executor_def=in_process_executor,
)
def no_hooks_failing_store_job() -> None:
    """A plain @job: no ledger hooks attached, so only the wrapper can settle the claim."""
    produce()


@job(resource_defs={"ledger": IdempotencyLedger()}, executor_def=in_process_executor)
def no_hooks_job() -> None:
    produce()


def test_an_io_manager_failing_after_the_body_ends_the_claim_failed_without_hooks(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    assert not no_hooks_failing_store_job.hook_defs
    broken = no_hooks_failing_store_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "store-1"}, raise_on_error=False
    )
    assert not broken.success
    entry = ledger.get("store-1/produce")
    assert entry.state == State.FAILED and entry.run_id == broken.run_id
    assert step_decisions(instance, broken.run_id) == {"produce": "proceed"}

    # the next run (a working store) proceeds at once: nothing to reap, no lease to wait out
    fixed = no_hooks_job.execute_in_process(instance=instance, tags={KEY_TAG: "store-1"})
    assert fixed.success
    assert step_decisions(instance, fixed.run_id) == {"produce": "proceed"}
    entry = ledger.get("store-1/produce")
    assert entry.state == State.SUCCEEDED and entry.run_id == fixed.run_id
    assert entry.prior_run_id == broken.run_id


@op
def explode(context) -> None:
    raise ValueError("fails before any guarded step")


@job(executor_def=in_process_executor)
def explode_only_job() -> None:
    explode()


def test_a_reexecution_does_not_keep_its_parents_summary_once_it_finishes(
    instance: DagsterInstance,
) -> None:
    """A UI re-execution copies every parent tag, `rocky/outcome` included; the run-status
    sensor replaces it with what this run did (here: nothing guarded at all)."""
    ticks = SensorTicks(_sensor("failure"), instance)
    child = explode_only_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "d-5", OUTCOME_TAG: "worked"}, raise_on_error=False
    )
    assert _rocky_tags(instance, child.run_id)[OUTCOME_TAG] == "worked"  # copied, not its own
    ticks.tick()
    assert _rocky_tags(instance, child.run_id)[OUTCOME_TAG] == "none"


def test_a_reexecution_that_skips_shows_skipped_not_its_parents_worked(
    instance: DagsterInstance,
) -> None:
    from dagster import ReexecutionOptions, execute_job, reconstructable

    parent = execute_job(reconstructable(_twelve_job), instance=instance, tags={KEY_TAG: "d-6"})
    assert _rocky_tags(instance, parent.run_id)[OUTCOME_TAG] == "worked"
    parent_tags = {
        k: v
        for k, v in instance.get_run_by_id(parent.run_id).tags.items()
        if k.startswith("rocky/")
    }
    child = execute_job(
        reconstructable(_twelve_job),
        instance=instance,
        tags=parent_tags,  # as the UI's re-execution does
        reexecution_options=ReexecutionOptions(
            parent_run_id=parent.run_id, step_selection=[s.name for s in TWELVE]
        ),
    )
    assert child.success
    assert _rocky_tags(instance, child.run_id) == {KEY_TAG: "d-6", OUTCOME_TAG: "skipped"}


def _twelve_job():
    return twelve_job
