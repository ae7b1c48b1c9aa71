"""`input_versions_key`: an asset reruns only when its code or an upstream asset changed."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
    DailyPartitionsDefinition,
    DataVersion,
    MaterializeResult,
    asset,
    materialize,
)
from dagster_layer_jobs import did_work, work_log

from rocky_dagster import IdempotencyLedger, idempotent_asset, input_versions_key
from rocky_dagster.ledger import Ledger

VERSIONS: dict[str, str | None] = {"orders": None}


@asset
def orders() -> MaterializeResult:
    """Upstream; its data version is whatever the test puts in VERSIONS (None: Dagster's)."""
    version = VERSIONS["orders"]
    return MaterializeResult(data_version=DataVersion(version) if version else None)


def _summary(code_version: str):
    @idempotent_asset(
        name="summary", key_fn=input_versions_key, code_version=code_version, deps=[orders]
    )
    def summary(context) -> None:
        did_work("summary", context.run.run_id)

    return summary


SUMMARY = _summary("1")


def _run(instance: DagsterInstance, *assets) -> str:
    result = materialize(list(assets), instance=instance, resources={"ledger": IdempotencyLedger()})
    assert result.success
    return result.run_id


def _worked(work_dir: Path) -> list[str]:
    return [run for name, run in work_log(work_dir) if name == "summary"]


def test_unchanged_inputs_skip_and_a_new_upstream_materialization_reruns(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    VERSIONS["orders"] = None
    _run(instance, orders)
    first = _run(instance, SUMMARY)
    second = _run(instance, SUMMARY)  # same upstream, same code: skipped
    assert _worked(work_dir) == [first]
    observation = instance.fetch_observations(AssetKey("summary"), limit=1).records[0]
    assert observation.asset_observation.metadata["rocky/decision"].value == "skipped_completed"
    assert second != first

    _run(instance, orders)  # upstream materialized again
    third = _run(instance, SUMMARY)
    assert _worked(work_dir) == [first, third]


def test_an_upstream_rematerialized_with_the_same_data_version_still_skips(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    VERSIONS["orders"] = "content-hash-1"
    _run(instance, orders)
    first = _run(instance, SUMMARY)
    _run(instance, orders)  # same data version: nothing downstream needs doing
    _run(instance, SUMMARY)
    assert _worked(work_dir) == [first]
    VERSIONS["orders"] = "content-hash-2"
    _run(instance, orders)
    second = _run(instance, SUMMARY)
    assert _worked(work_dir) == [first, second]


def test_a_new_code_version_reruns(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    VERSIONS["orders"] = "fixed"
    _run(instance, orders)
    first = _run(instance, SUMMARY)
    _run(instance, SUMMARY)
    second = _run(instance, _summary("2"))
    assert _worked(work_dir) == [first, second]


daily = DailyPartitionsDefinition(start_date="2026-11-01")


@asset(partitions_def=daily)
def daily_orders() -> None:
    return None


@idempotent_asset(partitions_def=daily, key_fn=input_versions_key, deps=[daily_orders])
def daily_summary(context) -> None:
    did_work("daily_summary", context.run.run_id)


def test_partitions_are_keyed_by_their_own_upstream_partition(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    def run(partition: str, *assets) -> str:
        result = materialize(
            list(assets),
            instance=instance,
            partition_key=partition,
            resources={"ledger": IdempotencyLedger()},
        )
        assert result.success
        return result.run_id

    run("2026-11-01", daily_orders)
    a = run("2026-11-01", daily_summary)
    run("2026-11-02", daily_orders)  # another partition changed: 11-01 is unaffected
    run("2026-11-01", daily_summary)
    b = run("2026-11-02", daily_summary)
    worked = [run_id for name, run_id in work_log(work_dir) if name == "daily_summary"]
    assert worked == [a, b]


@asset
def payments() -> None:
    """A second upstream, sorted after `orders`."""
    return None


@idempotent_asset(key_fn=input_versions_key, deps=[orders, payments])
def ledger_view(context) -> None:
    did_work("ledger_view", context.run.run_id)


def test_a_change_in_any_upstream_reruns_not_only_the_first(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    VERSIONS["orders"] = None
    _run(instance, orders, payments)
    first = _run(instance, ledger_view)
    _run(instance, ledger_view)  # both inputs unchanged: skipped

    _run(instance, payments)  # only the later-sorted upstream changed
    second = _run(instance, ledger_view)
    _run(instance, orders)  # only the first one changed
    third = _run(instance, ledger_view)

    worked = [run_id for name, run_id in work_log(work_dir) if name == "ledger_view"]
    assert worked == [first, second, third]
