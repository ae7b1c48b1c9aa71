"""A guarded asset materializes each partition once per key; a skip leaves an observation."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
    DailyPartitionsDefinition,
    materialize,
)
from dagster_layer_jobs import assert_replayed, did_work, work_log

from rocky_dagster import IdempotencyLedger, idempotent_asset, with_ledger
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.step.keys import KEY_TAG

daily = DailyPartitionsDefinition(start_date="2024-06-01")


@idempotent_asset(partitions_def=daily)
def daily_orders(context) -> dict:
    did_work("daily_orders", context.run.run_id)
    return {"partition": context.partition_key}


hooked_daily_orders = with_ledger(daily_orders)


def _materialize(
    instance: DagsterInstance, partition: str, tags: dict | None = None, **resource: bool
):
    return materialize(
        [hooked_daily_orders],
        partition_key=partition,
        instance=instance,
        tags=tags,
        resources={"ledger": IdempotencyLedger(**resource)},
    )


def _count(instance: DagsterInstance, kind: str) -> int:
    fetch = instance.fetch_materializations if kind == "m" else instance.fetch_observations
    return len(fetch(AssetKey("daily_orders"), limit=100).records)


def test_second_materialization_of_a_partition_skips_with_an_observation(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    first = _materialize(instance, "2024-06-01")
    assert first.success
    entry = ledger.get("daily_orders/2024-06-01")
    assert entry.state == State.SUCCEEDED and entry.run_id == first.run_id
    assert _count(instance, "m") == 1

    second = _materialize(instance, "2024-06-01")
    assert second.success
    assert _count(instance, "m") == 1  # no new materialization
    [observation] = instance.fetch_observations(AssetKey("daily_orders"), limit=10).records
    meta = observation.asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/prior_run_id"].value == first.run_id
    assert observation.asset_observation.partition == "2024-06-01"

    # another partition is other work: it materializes
    other = _materialize(instance, "2024-06-02")
    assert other.success
    assert _count(instance, "m") == 2
    assert [run for _, run in work_log(work_dir)] == [first.run_id, other.run_id]


def test_a_run_key_names_the_work_before_the_partition_does(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """A keyed run (a sensor's, a backfill's) keys the asset by run key + partition."""
    keyed = _materialize(instance, "2024-06-03", tags={KEY_TAG: "backfill-7"})
    assert keyed.success
    assert ledger.get("backfill-7/2024-06-03/daily_orders").state == State.SUCCEEDED
    again = _materialize(instance, "2024-06-03", tags={KEY_TAG: "backfill-7"})
    assert again.success
    assert _count(instance, "m") == 1 and _count(instance, "o") == 1
    assert len(work_log(work_dir)) == 1


def test_with_ledger_hooks_an_asset_job_and_the_sensor_guard_resolves_it(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    from dagster import Definitions, RunRequest, SkipReason, build_sensor_context, define_asset_job

    from rocky_dagster import guard_run_requests, ledger_hooks

    asset_job = with_ledger(define_asset_job("orders_job", selection=[daily_orders]))
    defs = Definitions(
        assets=[daily_orders], jobs=[asset_job], resources={"ledger": IdempotencyLedger()}
    )
    resolved = defs.resolve_job_def("orders_job")
    assert ledger_hooks <= resolved.hook_defs

    result = resolved.execute_in_process(
        instance=instance, partition_key="2024-06-04", tags={KEY_TAG: "drop-4"}
    )
    assert result.success
    context = build_sensor_context(instance=instance, definitions=defs)
    request = RunRequest(run_key="drop-4", partition_key="2024-06-04")
    skip = guard_run_requests(context, [request], ledger=IdempotencyLedger(), job=asset_job)
    assert isinstance(skip, SkipReason) and result.run_id in skip.skip_message


def test_a_skip_in_a_backfill_run_replays_the_materialization(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """A backfill counts a partition done only when it materializes it: there a skip
    re-reports the recorded materialization (no work, same data version)."""
    first = _materialize(instance, "2024-06-05")
    replay = _materialize(instance, "2024-06-05", tags={"dagster/backfill": "bf2"})

    assert first.success and replay.success
    assert [run for _, run in work_log(work_dir)] == [first.run_id]
    assert_replayed(instance, "daily_orders", replay.run_id, first.run_id)
    [newest, _] = instance.fetch_materializations(AssetKey("daily_orders"), limit=10).records
    assert newest.asset_materialization.partition == "2024-06-05"


def test_replay_skips_makes_every_skip_a_replayed_materialization(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    """With `replay_skips`, a skip outside a backfill re-reports the recorded materialization
    too (what the catalog renders); a key in flight elsewhere is never replayed."""
    first = _materialize(instance, "2024-06-06", replay_skips=True)
    replay = _materialize(instance, "2024-06-06", replay_skips=True)
    plain = _materialize(instance, "2024-06-06")

    assert first.success and replay.success and plain.success
    assert [run for _, run in work_log(work_dir)] == [first.run_id]
    assert_replayed(instance, "daily_orders", replay.run_id, first.run_id)
    assert _count(instance, "o") == 2  # each skip is observed as well

    ledger.claim("daily_orders/2024-06-07", "someone-else", pipeline="asset")
    held = _materialize(instance, "2024-06-07", replay_skips=True)
    assert held.success
    assert [
        r.run_id
        for r in instance.fetch_materializations(AssetKey("daily_orders"), limit=10).records
    ] == [replay.run_id, first.run_id]
