"""`idempotent_multi_asset`: one ledger key per selected asset, a body that produces only what
proceeds, on a real instance."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetSpec,
    DagsterInstance,
    DailyPartitionsDefinition,
    MaterializeResult,
    materialize,
)
from dagster_layer_jobs import assert_replayed, did_work, work_log

from rocky_dagster import (
    IdempotencyLedger,
    idempotent_multi_asset,
)
from rocky_dagster.decorators.multi_asset import proceeding_asset_keys
from rocky_dagster.ledger import EventKind, Ledger, State
from rocky_dagster.step.keys import KEY_TAG

SPECS = [AssetSpec("orders"), AssetSpec("customers"), AssetSpec("payments")]


def third_party_runner(context):
    """A dbt/sling/dlt-style runner: works on what the context says is selected, yields a
    MaterializeResult per asset, knows nothing about the ledger."""
    for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
        did_work(key.to_user_string(), context.run.run_id)
        yield MaterializeResult(asset_key=key, metadata={"rows": 3})


@idempotent_multi_asset(specs=SPECS, can_subset=True, name="shop")
def shop(context):
    yield from third_party_runner(context)


def _run(instance: DagsterInstance, assets, key: str, selection=None, **kwargs):
    result = materialize(
        assets,
        instance=instance,
        tags={KEY_TAG: key},
        selection=selection,
        resources={"ledger": IdempotencyLedger()},
        raise_on_error=False,
        **kwargs,
    )
    return result


def _materialized(instance: DagsterInstance, name: str) -> int:
    return len(instance.fetch_materializations(AssetKey(name), limit=100).records)


def _worked(work_dir: Path) -> list[tuple[str, str]]:
    return work_log(work_dir)


def test_second_run_with_one_key_materializes_nothing_and_observes_each_skip(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    first = _run(instance, [shop], "k1")
    assert first.success
    assert sorted(name for name, _ in _worked(work_dir)) == ["customers", "orders", "payments"]
    for name in ("orders", "customers", "payments"):
        entry = ledger.get(f"k1/{name}")
        assert entry is not None and entry.state == State.SUCCEEDED
        assert entry.result == {"asset_key": name, "rows": 3}

    second = _run(instance, [shop], "k1")
    assert second.success
    assert len(_worked(work_dir)) == 3  # the body did not run again
    assert {n: _materialized(instance, n) for n in ("orders", "customers", "payments")} == {
        "orders": 1,
        "customers": 1,
        "payments": 1,
    }
    observations = instance.fetch_observations(AssetKey("orders"), limit=10).records
    meta = observations[0].asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/prior_run_id"].value == first.run_id
    assert meta["rocky/replayed/rows"].value == 3


def test_a_subset_claims_only_its_assets_and_the_rest_run_later(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    assert _run(instance, [shop], "k2", selection=[AssetKey("orders")]).success
    assert [name for name, _ in _worked(work_dir)] == ["orders"]
    assert ledger.get("k2/customers") is None
    # the whole set with the same key: only what the subset did not do runs
    assert _run(instance, [shop], "k2").success
    assert sorted(name for name, _ in _worked(work_dir)) == [
        "customers",
        "orders",
        "payments",
    ]


@idempotent_multi_asset(specs=SPECS, can_subset=True, name="greedy")
def greedy(context):
    """Produces every spec, whatever it was told to produce."""
    for spec in SPECS:
        yield MaterializeResult(asset_key=spec.key)


def test_producing_an_asset_whose_key_was_done_fails_naming_it(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    assert _run(instance, [greedy], "k3", selection=[AssetKey("orders")]).success is False
    entry = ledger.get("k3/orders")
    assert entry is not None and entry.state == State.FAILED  # its claim settled, not stuck


@idempotent_multi_asset(specs=SPECS, can_subset=True, name="lazy")
def lazy(context):
    """Produces only orders, whatever proceeds."""
    if AssetKey("orders") in proceeding_asset_keys(context):
        did_work("orders", context.run.run_id)
        yield MaterializeResult(asset_key="orders")


def test_a_proceeding_asset_the_body_did_not_produce_is_released(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    assert _run(instance, [lazy], "k4").success
    assert ledger.get("k4/orders").state == State.SUCCEEDED
    assert ledger.get("k4/customers").released  # the next run does it
    kinds = [event.kind for event in ledger.history("k4/customers")]
    assert kinds == [EventKind.CLAIMED, EventKind.RELEASED]


daily = DailyPartitionsDefinition(start_date="2026-11-01")


@idempotent_multi_asset(specs=SPECS[:2], can_subset=True, name="daily_shop", partitions_def=daily)
def daily_shop(context):
    yield from third_party_runner(context)


@pytest.mark.parametrize("partition", ["2026-11-01", "2026-11-02"])
def test_each_asset_partition_materializes_once_without_any_key(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path, partition: str
) -> None:
    for _ in range(2):
        result = materialize(
            [daily_shop],
            instance=instance,
            partition_key=partition,
            resources={"ledger": IdempotencyLedger()},
        )
        assert result.success
    assert sorted(name for name, _ in _worked(work_dir)) == ["customers", "orders"]
    assert ledger.get(f"orders/{partition}").state == State.SUCCEEDED


@idempotent_multi_asset(specs=SPECS, can_subset=True, name="by_proceeding")
def by_proceeding(context):
    """Produces exactly what `proceeding_asset_keys` names (not what the context selects)."""
    for key in sorted(proceeding_asset_keys(context), key=lambda k: k.to_user_string()):
        did_work(key.to_user_string(), context.run.run_id)
        yield MaterializeResult(asset_key=key)


def test_proceeding_asset_keys_leaves_out_the_assets_whose_key_is_done(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    assert _run(instance, [by_proceeding], "k6", selection=[AssetKey("orders")]).success
    assert [name for name, _ in _worked(work_dir)] == ["orders"]

    again = _run(instance, [by_proceeding], "k6")  # orders is done under k6; the others are not

    assert again.success
    assert [name for name, _ in _worked(work_dir)] == ["orders", "customers", "payments"]
    assert {n: _materialized(instance, n) for n in ("orders", "customers", "payments")} == {
        "orders": 1,
        "customers": 1,
        "payments": 1,
    }
    third = _run(instance, [by_proceeding], "k6")  # everything done: nothing produced, success
    assert third.success
    assert len(_worked(work_dir)) == 3
    assert all(ledger.get(f"k6/{n}").state == State.SUCCEEDED for n in ("orders", "payments"))


def test_a_skip_in_a_backfill_run_replays_the_materialization_so_the_backfill_counts_it(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """Dagster's backfill counts a partition done only when a run of the backfill materializes
    it: a skip there reports the recorded materialization again (same data version, no work);
    a skip in any other run materializes nothing."""

    def run(tags: dict[str, str]):
        result = materialize(
            [daily_shop],
            instance=instance,
            partition_key="2026-11-03",
            tags=tags,
            resources={"ledger": IdempotencyLedger()},
        )
        assert result.success
        return result

    first = run({})
    run({})  # a plain skip: nothing
    assert _materialized(instance, "orders") == 1
    replay = run({"dagster/backfill": "bf1"})

    assert len(_worked(work_dir)) == 2  # orders and customers, once, by the first run
    assert_replayed(instance, "orders", replay.run_id, first.run_id)


def test_an_unproduced_asset_whose_release_fails_fails_the_step_not_counts_as_done(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
):
    """The body produces `orders` only; releasing `customers` hits a read-only ledger. A run
    that still succeeded would have its in-flight claim stamped succeeded by the SUCCESS
    sensor or the next run's reap, so work never done would count as done: the step fails."""
    path = Path(ledger.url.removeprefix("sqlite:///"))

    @idempotent_multi_asset(specs=SPECS[:2], can_subset=True, name="half")
    def half(context):
        yield MaterializeResult(asset_key=AssetKey("orders"), metadata={"rows": 1})
        path.chmod(0o444)  # after `orders` is emitted, before `customers` is given back

    try:
        result = _run(instance, [half], "half-1")
    finally:
        path.chmod(0o644)

    assert not result.success
    assert ledger.get("half-1/customers").state != State.SUCCEEDED
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "could not release ledger key 'half-1/customers'" in str(failure.step_failure_data)
