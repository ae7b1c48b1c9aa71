"""A job's key_fn travels with the job definition: two jobs of one name (two code locations, two
Definitions in one process) each key their steps with their own."""

from __future__ import annotations

from typing import Any

import dagster as dg

from rocky_dagster import (
    IdempotencyLedger,
    idempotent_asset,
    idempotent_op,
    ledger_job,
    with_ledger,
)
from rocky_dagster.ledger import Ledger, State


@idempotent_op
def extract(context) -> dict[str, Any]:
    return {"rows": 1}


@idempotent_op
def publish(context, upstream: dict[str, Any]) -> dict[str, Any]:
    return {"rows": upstream["rows"]}


@dg.graph
def pipeline() -> None:
    publish(extract())


@idempotent_asset
def report(context) -> None:
    return None


def _location(region: str) -> dg.Definitions:
    """What one code location defines: the same job names, its own key_fns."""
    nightly = ledger_job(pipeline, name="nightly", key_fn=lambda context: f"{region}-1")
    assets_job = with_ledger(
        dg.define_asset_job("reports", [report]), key_fn=lambda context: f"{region}-r"
    )
    hooked = with_ledger(ledger_job(pipeline, name="hooked"), key_fn=lambda c: f"{region}-h")
    return dg.Definitions(
        assets=[report],
        jobs=[nightly, assets_job, hooked],
        resources={"ledger": IdempotencyLedger()},
    )


def test_two_jobs_of_one_name_keep_their_own_key_fn(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    east, west = _location("east"), _location("west")
    for region, defs in (("west", west), ("east", east)):
        result = defs.resolve_job_def("nightly").execute_in_process(instance=instance)
        assert result.success
        for step in ("extract", "publish"):
            entry = ledger.get(f"{region}-1/{step}")
            assert (entry.state, entry.run_id) == (State.SUCCEEDED, result.run_id)

        assets = defs.resolve_job_def("reports").execute_in_process(instance=instance)
        assert assets.success
        assert ledger.get(f"{region}-r/report").run_id == assets.run_id

        hooked = defs.resolve_job_def("hooked").execute_in_process(instance=instance)
        assert hooked.success
        assert ledger.get(f"{region}-h/publish").run_id == hooked.run_id
    assert len(ledger.entries()) == 10


def test_an_op_subset_of_the_job_keeps_its_key_fn(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    job = _location("north").resolve_job_def("nightly")
    result = job.execute_in_process(instance=instance, op_selection=["extract"])
    assert result.success
    assert ledger.get("north-1/extract").run_id == result.run_id
    assert ledger.get("north-1/publish") is None
