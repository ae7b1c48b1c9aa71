"""The five pipeline ops and custom ops end `succeeded`, never in flight (F2), on a real warehouse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    build_reconstructable_job,
    execute_job,
    in_process_executor,
)
from dagster_layer_jobs import HERE, make_pipeline_inputs, pipelines_job, work_log

from rocky_dagster import IdempotencyLedger, ledger_job
from rocky_dagster.decorators.pipeline_ops import quality_op
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.pipelines import QualityPipeline
from rocky_dagster.step.keys import KEY_TAG

STEPS = ["load", "replication", "transformation", "quality", "snapshot", "notify"]


def test_f2_every_pipeline_op_and_a_custom_op_end_succeeded(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    make_pipeline_inputs(work_dir)
    result = pipelines_job().execute_in_process(instance=instance, tags={KEY_TAG: "etl-2024-06-01"})
    assert result.success

    entries = {step: ledger.get(f"etl-2024-06-01/{step}") for step in STEPS}
    assert {s: (e.state, e.run_id) for s, e in entries.items()} == {
        s: (State.SUCCEEDED, result.run_id) for s in STEPS
    }
    assert ledger.entries(State.IN_FLIGHT) == []
    # what each step returned is what the ledger kept (and what a later run would replay)
    assert entries["load"].result["rows_changed"] == 2
    assert entries["replication"].result["tables"]["raw_orders"]["inserted"] == 3
    assert entries["transformation"].result["pipeline_type"] == "transformation"
    assert entries["quality"].result["checks"]["passed"] == 2
    assert entries["snapshot"].result["rows_changed"] == 3
    assert entries["notify"].result == {"sent": 1}
    # each pipeline op's claim carries its config's fingerprint
    assert all(entries[s].fingerprint for s in STEPS[:5]) and entries["notify"].fingerprint is None


def test_f2_custom_op_in_its_own_step_process_ends_succeeded(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """Under the multiprocess executor the step, its claim, its stamp and its hooks live in a
    child process: the ledger still ends `succeeded`, with the run's result."""
    job = build_reconstructable_job(
        "dagster_layer_jobs", "multiprocess_work_job", reconstructor_working_directory=str(HERE)
    )  # step processes import the job by module name from this directory
    result = execute_job(job, instance=instance, tags={KEY_TAG: "mp-1"})
    assert result.success
    assert work_log(work_dir) == [("work", result.run_id)]
    entry = ledger.get("mp-1/work")
    assert (entry.state, entry.run_id, entry.result) == (
        State.SUCCEEDED,
        result.run_id,
        {"rows": 42},
    )
    [step_pid] = [
        e.dagster_event.pid
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_START"
    ]
    assert step_pid != os.getpid()


def test_quality_op_reports_every_check_then_fails_and_releases_its_key(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    warehouse = work_dir / "warehouse.db"
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(warehouse)) as conn:
        conn.executescript(
            "CREATE TABLE orders (id INTEGER, status TEXT);"
            "INSERT INTO orders VALUES (1, 'paid'), (1, 'paid'), (2, NULL);"
        )
        conn.commit()
    checks = quality_op(
        QualityPipeline(
            warehouse=str(warehouse),
            checks=[
                {"kind": "unique", "table": "orders", "column": "id"},
                {"kind": "not_null", "table": "orders", "column": "status", "severity": "warn"},
                {"kind": "not_null", "table": "orders", "column": "id"},
            ],
        ),
        name="orders_checks",
    )

    @ledger_job(ledger=IdempotencyLedger(), executor_def=in_process_executor)
    def checks_job() -> None:
        checks()

    result = checks_job.execute_in_process(
        instance=instance, tags={KEY_TAG: "dq-1"}, raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    reported = failure.event_specific_data.user_failure_data.metadata["checks"].value
    assert [(c["name"], c["passed"]) for c in reported] == [
        ("unique_id", False),
        ("not_null_status", False),
        ("not_null_id", True),
    ]
    assert ledger.get("dq-1/orders_checks").state == State.FAILED
    assert work_log(work_dir) == []


def test_a_pipeline_op_refuses_another_pipelines_config(work_dir: Path) -> None:
    from rocky_dagster.decorators.pipeline_ops import replication_op
    from rocky_dagster.pipelines import LoadPipeline

    (work_dir / "drop").mkdir()
    config = LoadPipeline(
        warehouse=str(work_dir / "w.db"), directory=str(work_dir / "drop"), table="t"
    )
    with pytest.raises(TypeError, match="use load_op"):
        replication_op(config)


def test_quality_checks_surface_as_asset_check_results_and_dedup_per_key(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    import sqlite3
    from contextlib import closing

    from dagster import asset, materialize

    from rocky_dagster.pipelines import quality_checks

    warehouse = work_dir / "warehouse.db"

    @asset(name="orders")
    def orders() -> None:
        with closing(sqlite3.connect(warehouse)) as conn:
            conn.executescript(
                "DROP TABLE IF EXISTS orders; CREATE TABLE orders (id INTEGER, status TEXT);"
                "INSERT INTO orders VALUES (1, 'paid'), (2, NULL);"
            )
            conn.commit()

    checks = quality_checks(
        QualityPipeline(
            warehouse=str(warehouse),
            checks=[
                {"kind": "unique", "table": "orders", "column": "id"},
                {"kind": "not_null", "table": "orders", "column": "status", "severity": "warn"},
            ],
        )
    )

    def run():
        return materialize(
            [orders, checks],
            instance=instance,
            tags={KEY_TAG: "dq-2"},
            resources={"ledger": IdempotencyLedger()},
        )

    first = run()
    assert first.success  # the failed check is a warning
    evaluations = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert evaluations["unique_id"].passed and not evaluations["not_null_status"].passed
    assert evaluations["not_null_status"].metadata["rocky/decision"].value == "proceed"
    assert ledger.get("dq-2/quality_checks").state == State.SUCCEEDED

    second = run()
    assert second.success
    assert second.get_asset_check_evaluations() == []  # already checked under this key
