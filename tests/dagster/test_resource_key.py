"""A project whose ledger resource is bound under another key than ``ledger``: every decorator,
the sensor helpers and the components take ``resource_key=`` and find it there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from rocky_dagster import (
    IdempotencyLedger,
    IdempotencyLedgerComponent,
    PipelinesComponent,
    guard_run_requests,
    idempotent_asset,
    idempotent_multi_asset,
    idempotent_op,
    ledger_job,
    ledger_run_status_sensors,
)
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.step.keys import KEY_TAG

KEY_NAME = "warehouse_ledger"


@idempotent_op(resource_key=KEY_NAME)
def load(context) -> dict[str, Any]:
    return {"rows": 1}


@idempotent_op(resource_key=KEY_NAME)
def check(context, warehouse_ledger: IdempotencyLedger) -> dict[str, Any]:
    """Takes the resource itself, under its own name."""
    return {"ledger": type(warehouse_ledger).__name__}


@ledger_job
def nightly() -> None:
    load()
    check()


@idempotent_asset(resource_key=KEY_NAME)
def orders(context) -> None:
    return None


@idempotent_multi_asset(
    specs=[dg.AssetSpec("a"), dg.AssetSpec("b")], can_subset=True, resource_key=KEY_NAME
)
def both(context) -> Iterator[dg.MaterializeResult]:
    for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
        yield dg.MaterializeResult(asset_key=key)


def _defs() -> dg.Definitions:
    return dg.Definitions(
        assets=[orders, both],
        jobs=[nightly],
        sensors=ledger_run_status_sensors(resource_key=KEY_NAME),
        resources={KEY_NAME: IdempotencyLedger()},  # and nothing under "ledger"
    )


def test_decorators_find_the_ledger_under_its_key(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    defs = _defs()
    job = defs.resolve_job_def("nightly")
    first = job.execute_in_process(instance=instance, tags={KEY_TAG: "n1"})
    again = job.execute_in_process(instance=instance, tags={KEY_TAG: "n1"})
    assert first.success and again.success
    for step in ("load", "check"):
        entry = ledger.get(f"n1/{step}")
        assert (entry.state, entry.run_id) == (State.SUCCEEDED, first.run_id)
    assert ledger.get("n1/check").result == {"ledger": "IdempotencyLedger"}

    assets = defs.resolve_implicit_global_asset_job_def()
    done = assets.execute_in_process(instance=instance, tags={KEY_TAG: "a1"})
    assert done.success
    assert {e.key for e in ledger.entries(prefix="a1/")} == {"a1/orders", "a1/a", "a1/b"}
    skipped = assets.execute_in_process(instance=instance, tags={KEY_TAG: "a1"})
    assert skipped.success and not skipped.get_asset_materialization_events()


def test_sensor_helpers_take_the_ledger_under_its_key(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    defs = _defs()
    [on_failure] = [s for s in defs.sensors or [] if s.name.endswith("_on_failure")]
    resources = {KEY_NAME: IdempotencyLedger()}
    cursor = on_failure.evaluate_tick(
        dg.build_sensor_context(instance=instance, resources=resources)
    ).cursor  # the first tick only places the cursor
    run = instance.create_run_for_job(job_def=nightly, tags={KEY_TAG: "f1"})
    ledger.claim("f1/load", run.run_id)
    instance.report_run_failed(run)
    on_failure.evaluate_tick(
        dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    )
    assert ledger.get("f1/load").state == State.FAILED

    job = defs.resolve_job_def("nightly")
    assert job.execute_in_process(instance=instance, tags={KEY_TAG: "g1"}).success
    context = dg.build_sensor_context(instance=instance, resources=resources)
    skip = guard_run_requests(context, dg.RunRequest(run_key="g1"), job=job, resource_key=KEY_NAME)
    assert isinstance(skip, dg.SkipReason) and "already completed" in skip.skip_message


@contextmanager
def _component_defs(sandbox: Any, component: type, attributes: dict[str, Any]) -> Iterator[Any]:
    path = sandbox.defs_folder_path / component.__name__
    path.mkdir(parents=True)
    (path / "drops").mkdir()
    (path / "drops" / "orders.csv").write_text("id,amount\n1,2.5\n2,4.0\n")
    type_name = f"rocky_dagster.{component.__name__}"
    (path / "defs.yaml").write_text(yaml.safe_dump({"type": type_name, "attributes": attributes}))
    with sandbox.load_component_and_build_defs(defs_path=path) as (_component, defs):
        yield defs


def test_the_ledger_component_and_the_pipelines_component_share_a_key(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    with (
        create_defs_folder_sandbox() as sandbox,
        _component_defs(
            sandbox, IdempotencyLedgerComponent, {"resource_key": KEY_NAME}
        ) as ledger_defs,
        _component_defs(
            sandbox,
            PipelinesComponent,
            {
                "resource_key": KEY_NAME,
                "ledger": None,  # the ledger component brings it
                "ledger_sensors": False,  # and its sensors
                "pipelines": [
                    {
                        "type": "load",
                        "name": "load_orders",
                        "warehouse": "wh.db",
                        "directory": "drops",
                        "table": "orders",
                    }
                ],
            },
        ) as pipelines_defs,
    ):
        defs = dg.Definitions.merge(ledger_defs, pipelines_defs)
        assert set(defs.resources or {}) == {KEY_NAME}
        job = defs.resolve_job_def("load_orders_job")
        first = job.execute_in_process(instance=instance, tags={KEY_TAG: "p1"})
        again = job.execute_in_process(instance=instance, tags={KEY_TAG: "p1"})
    assert first.success and again.success
    entry = ledger.get("p1/orders")
    assert (entry.state, entry.run_id) == (State.SUCCEEDED, first.run_id)
    assert not again.get_asset_materialization_events()
