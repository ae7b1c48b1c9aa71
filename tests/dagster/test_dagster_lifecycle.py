"""The one step lifecycle holds one claim per selected asset of a multi-asset step (the shape
the multi-asset guard builds on): each asset is claimed, skipped or stamped on its own."""

from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetObservation,
    AssetSpec,
    DagsterInstance,
    MaterializeResult,
    materialize,
    multi_asset,
)

from rocky_dagster import IdempotencyLedger
from rocky_dagster.ledger import Ledger, Outcome, State
from rocky_dagster.step.guard import ClaimState, StepGuard
from rocky_dagster.step.keys import KEY_TAG

TABLES = ("orders", "customers")


@multi_asset(specs=[AssetSpec(t) for t in TABLES], can_subset=True)
def tables(context: AssetExecutionContext, ledger: IdempotencyLedger) -> Iterator[Any]:
    selected = sorted(k.to_user_string() for k in context.selected_asset_keys)
    guard = StepGuard(context, ledger, asset_keys=selected)
    with guard.lifecycle() as step:
        for held in step.claims:
            if held.state == ClaimState.SKIPPED:
                context.log_event(
                    AssetObservation(asset_key=held.asset_key, metadata=step.metadata(held))
                )
        for held in step.proceeding:
            step.record_summary({"table": held.asset_key, "rows": 10}, held)
            yield MaterializeResult(asset_key=held.asset_key, metadata=step.metadata(held))


def test_a_multi_asset_step_claims_each_selected_asset_and_skips_the_done_ones(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    # `customers` was already done by another run: only `orders` does work
    claim = ledger.claim("k-1/customers", "another-run")
    ledger.finalize(claim.key, claim.fence, Outcome.SUCCEEDED, result={"rows": 3})

    result = materialize(
        [tables],
        instance=instance,
        resources={"ledger": IdempotencyLedger()},
        tags={KEY_TAG: "k-1"},
    )
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"orders"}
    observed = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    [skip] = observed
    assert skip.asset_key.to_user_string() == "customers"
    meta = skip.event_specific_data.asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/replayed/rows"].value == 3
    orders = ledger.get("k-1/orders")
    assert (orders.state, orders.run_id, orders.result) == (
        State.SUCCEEDED,
        result.run_id,
        {"table": "orders", "rows": 10},
    )

    again = materialize(
        [tables],
        instance=instance,
        resources={"ledger": IdempotencyLedger()},
        tags={KEY_TAG: "k-1"},
    )
    assert again.success and not again.get_asset_materialization_events()
    assert ledger.get("k-1/orders").run_id == result.run_id
