"""A launch with no key (a Materialize click, `dg launch`): guarded assets are keyed by what
they read, so unchanged inputs skip, naming the run that did the work, and changed inputs run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetSpec,
    DagsterEventType,
    DagsterInstance,
    Failure,
    MaterializeResult,
    asset,
    materialize,
)
from dagster_layer_jobs import did_work, work_log

from rocky_dagster.decorators.assets import idempotent_asset
from rocky_dagster.decorators.multi_asset import idempotent_multi_asset, proceeding_asset_keys
from rocky_dagster.decorators.pipeline_assets import pipeline_assets
from rocky_dagster.ledger import Ledger
from rocky_dagster.pipelines import LoadPipeline
from rocky_dagster.resource import IdempotencyLedger
from rocky_dagster.step.keys import KEY_TAG, OUTCOME_TAG
from rocky_dagster.step.presentation import settle_outcome_tag

RESOURCES = {"ledger": IdempotencyLedger()}


@asset
def orders() -> None:
    """A plain upstream asset: each materialization is a new input for its downstream."""


@idempotent_asset(deps=[orders])
def summary(context) -> None:
    did_work("summary", context.run.run_id)


@idempotent_asset
def standalone(context) -> None:
    did_work("standalone", context.run.run_id)


@idempotent_multi_asset(specs=[AssetSpec("left", deps=[orders]), AssetSpec("right")])
def pair(context):
    for key in sorted(proceeding_asset_keys(context), key=lambda k: k.to_user_string()):
        did_work(key.to_user_string(), context.run.run_id)
        yield MaterializeResult(asset_key=key)


def _run(instance: DagsterInstance, assets: list, **kwargs) -> str:
    result = materialize(assets, instance=instance, resources=RESOURCES, **kwargs)
    assert result.success
    return result.run_id


def _worked(work_dir: Path, name: str) -> list[str]:
    return [run for done, run in work_log(work_dir) if done == name]


def _info_lines(instance: DagsterInstance, run_id: str) -> list[str]:
    records = instance.get_records_for_run(run_id).records
    return [
        r.event_log_entry.user_message
        for r in records
        if r.event_log_entry.dagster_event is None and r.event_log_entry.level == 20  # INFO
    ]


def test_an_asset_with_an_upstream_skips_unchanged_inputs_and_says_who_did_the_work(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    _run(instance, [orders])
    first = _run(instance, [summary, orders], selection=[summary])
    second = _run(instance, [summary, orders], selection=[summary])
    assert _worked(work_dir, "summary") == [first]

    lines = [line for line in _info_lines(instance, second) if "SKIPPED" in line]
    assert len(lines) == 1, _info_lines(instance, second)
    assert first in lines[0] and "inputs:" in lines[0]  # the key and the run that did it
    observation = instance.fetch_observations(AssetKey("summary"), limit=1).records[0]
    meta = observation.asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/key_source"].value == "inputs"
    assert instance.get_run_by_id(second).tags.get(OUTCOME_TAG) == "skipped"
    assert KEY_TAG not in instance.get_run_by_id(second).tags  # the key names one asset only

    _run(instance, [orders])  # a new input
    third = _run(instance, [summary, orders], selection=[summary])
    assert _worked(work_dir, "summary") == [first, third]


def test_a_key_on_the_launch_still_wins(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    _run(instance, [orders])
    first = _run(instance, [summary, orders], selection=[summary])
    keyed = _run(instance, [summary, orders], selection=[summary], tags={KEY_TAG: "day-1"})
    again = _run(instance, [summary, orders], selection=[summary], tags={KEY_TAG: "day-1"})
    assert _worked(work_dir, "summary") == [first, keyed]
    assert again not in _worked(work_dir, "summary")
    entry = ledger.get("day-1/summary")
    assert entry is not None and entry.run_id == keyed


def test_the_force_tag_redoes_unchanged_inputs(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    _run(instance, [orders])
    first = _run(instance, [summary, orders], selection=[summary])
    forced = _run(
        instance, [summary, orders], selection=[summary], tags={"rocky/idempotency": "force"}
    )
    assert _worked(work_dir, "summary") == [first, forced]


def test_an_asset_reading_nothing_known_stays_unguarded_with_a_warning(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    first = _run(instance, [standalone])
    second = _run(instance, [standalone])
    assert _worked(work_dir, "standalone") == [first, second]
    warnings = [
        r.event_log_entry.user_message
        for r in instance.get_records_for_run(second).records
        if r.event_log_entry.level == 30
    ]
    assert any("UNGUARDED" in w and "key_fn" in w for w in warnings), warnings
    assert instance.get_run_by_id(second).tags.get(OUTCOME_TAG) == "unguarded"


def test_a_multi_asset_keys_each_asset_by_its_own_inputs(
    instance: DagsterInstance, ledger: Ledger, work_dir: Path
) -> None:
    _run(instance, [orders])
    first = _run(instance, [pair, orders], selection=[AssetKey("left"), AssetKey("right")])
    second = _run(instance, [pair, orders], selection=[AssetKey("left"), AssetKey("right")])
    assert _worked(work_dir, "left") == [first]  # skipped the second time
    assert _worked(work_dir, "right") == [first, second]  # no upstream: unguarded


def _drops(tmp_path: Path) -> Path:
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "a.csv").write_text("id,name\n1,ada\n")
    return drops


def test_a_pipeline_root_is_keyed_by_its_drop_files(
    instance: DagsterInstance, ledger: Ledger, tmp_path: Path
) -> None:
    drops = _drops(tmp_path)
    load = LoadPipeline(warehouse=str(tmp_path / "wh.db"), directory=str(drops), table="people")
    assets = pipeline_assets(load, name="load_people")
    first = _run(instance, assets)
    second = _run(instance, assets)
    materialized = instance.fetch_materializations(AssetKey("people"), limit=10).records
    assert [r.run_id for r in materialized] == [first]
    observation = instance.fetch_observations(AssetKey("people"), limit=1).records[0]
    assert observation.run_id == second
    assert observation.asset_observation.metadata["rocky/prior_run_id"].value == first

    (drops / "b.csv").write_text("id,name\n2,grace\n")  # a new drop file: new inputs
    third = _run(instance, assets)
    materialized = instance.fetch_materializations(AssetKey("people"), limit=10).records
    assert [r.run_id for r in materialized] == [third, first]

    stat = (drops / "a.csv").stat()
    (drops / "a.csv").write_text("id,name\n1,ada\n3,alan\n")  # a changed drop file
    os.utime(drops / "a.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    fourth = _run(instance, assets)
    materialized = instance.fetch_materializations(AssetKey("people"), limit=10).records
    assert materialized[0].run_id == fourth


def test_one_key_per_run_leaves_an_untagged_launch_unguarded(
    instance: DagsterInstance, ledger: Ledger, tmp_path: Path
) -> None:
    drops = _drops(tmp_path)
    load = LoadPipeline(warehouse=str(tmp_path / "wh.db"), directory=str(drops), table="people")
    assets = pipeline_assets(load, name="load_people", key_by_inputs=False)
    first, second = _run(instance, assets), _run(instance, assets)
    materialized = instance.fetch_materializations(AssetKey("people"), limit=10).records
    assert [r.run_id for r in materialized] == [second, first]


@idempotent_asset(deps=[orders])
def breaks(context) -> None:
    raise Failure("the warehouse is down", allow_retries=False)


@pytest.mark.parametrize("settled_by_sensor", [False, True])
def test_a_failed_run_says_failed(
    instance: DagsterInstance, ledger: Ledger, settled_by_sensor: bool
) -> None:
    _run(instance, [orders])
    result = materialize(
        [breaks, orders], selection=[breaks], instance=instance, resources=RESOURCES,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    if settled_by_sensor:  # what the FAILURE sensor does when the run has finished
        instance.add_run_tags(result.run_id, {OUTCOME_TAG: "worked"})
        assert settle_outcome_tag(instance, result.run_id) == "failed"
    assert instance.get_run_by_id(result.run_id).tags[OUTCOME_TAG] == "failed"
    failures = instance.get_records_for_run(
        result.run_id, of_type=DagsterEventType.STEP_FAILURE
    ).records
    assert failures
