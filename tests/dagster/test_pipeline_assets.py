"""`pipeline_assets`: the pipelines as guarded, subsettable multi-assets over a real warehouse."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    materialize,
)

from rocky_dagster import IdempotencyLedger
from rocky_dagster.decorators.pipeline_assets import external_assets
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.pipelines import (
    QualityPipeline,
    ReplicationPipeline,
    TransformationPipeline,
    pipeline_assets,
)
from rocky_dagster.step.keys import KEY_TAG


@pytest.fixture
def shop(tmp_path: Path) -> dict[str, object]:
    source, warehouse, models = tmp_path / "shop.db", tmp_path / "wh.db", tmp_path / "models"
    with closing(sqlite3.connect(source)) as conn:
        conn.executescript(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INT, amount REAL);"
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
            "INSERT INTO orders VALUES (1, 1, 10.0), (2, 1, 5.0), (3, 2, 7.5);"
            "INSERT INTO customers VALUES (1, 'ada'), (2, 'grace');"
        )
        conn.commit()
    models.mkdir()
    (models / "stg_orders.sql").write_text("SELECT id, customer_id, amount FROM raw_orders")
    (models / "customer_totals.sql").write_text(
        "SELECT c.id, c.name, sum(o.amount) AS amount FROM raw_customers c "
        "JOIN stg_orders o ON o.customer_id = c.id GROUP BY c.id, c.name"
    )
    replication = ReplicationPipeline(
        warehouse=str(warehouse), source=str(source), tables=["*"], target_prefix="raw_"
    )
    transformation = TransformationPipeline(warehouse=str(warehouse), models_dir=str(models))
    quality = QualityPipeline(
        warehouse=str(warehouse),
        checks=[
            {"kind": "not_null", "table": "raw_orders", "column": "customer_id"},
            {"kind": "row_count", "table": "customer_totals", "min": 1},
        ],
    )
    return {
        "warehouse": warehouse,
        "replicate": pipeline_assets(replication, name="replicate", group_name="warehouse")[0],
        "build": pipeline_assets(transformation, name="build", group_name="warehouse")[0],
        "checks": pipeline_assets(quality, name="check"),
    }


def _tables(warehouse: Path) -> set[str]:
    with closing(sqlite3.connect(warehouse)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table','view')")
        return {name for (name,) in rows if not name.startswith(("_rocky", "sqlite_"))}


def _run(instance, assets, key, selection=None):
    result = materialize(
        assets,
        instance=instance,
        tags={KEY_TAG: key},
        selection=selection,
        resources={"ledger": IdempotencyLedger()},
    )
    assert result.success
    return result


def test_assets_are_the_tables_written_with_lineage_to_what_they_read(shop) -> None:
    replicate, build = shop["replicate"], shop["build"]
    assert set(replicate.keys) == {AssetKey("raw_orders"), AssetKey("raw_customers")}
    assert replicate.asset_deps[AssetKey("raw_orders")] == {AssetKey(["shop", "orders"])}
    assert build.asset_deps[AssetKey("customer_totals")] == {
        AssetKey("raw_customers"),
        AssetKey("stg_orders"),
    }
    # one check op per checked table: blocking checks on tables of different pipelines
    assert [set(c.check_keys) for c in shop["checks"]] == [
        {AssetCheckKey(AssetKey("customer_totals"), "row_count")},
        {AssetCheckKey(AssetKey("raw_orders"), "not_null_customer_id")},
    ]
    sources = external_assets([replicate, build, *shop["checks"]])
    assert {spec.key for spec in sources} == {
        AssetKey(["shop", "orders"]),
        AssetKey(["shop", "customers"]),
    }
    Definitions(
        assets=[replicate, build, *sources],
        asset_checks=shop["checks"],
        resources={"ledger": IdempotencyLedger()},
    ).get_repository_def()


def test_a_second_launch_with_one_key_materializes_nothing(
    instance: DagsterInstance, ledger: Ledger, shop
) -> None:
    assets = [shop["replicate"], shop["build"], *shop["checks"]]
    first = _run(instance, assets, "day-1")
    assert _tables(shop["warehouse"]) == {
        "raw_orders",
        "raw_customers",
        "stg_orders",
        "customer_totals",
    }
    assert ledger.get("day-1/raw_orders").result["rows_inserted"] == 3
    assert ledger.get("day-1/customer_totals").state == State.SUCCEEDED
    assert ledger.get("day-1/raw_orders:not_null_customer_id").state == State.SUCCEEDED
    mats = len(instance.fetch_materializations(AssetKey("raw_orders"), limit=10).records)

    second = _run(instance, assets, "day-1")
    assert len(instance.fetch_materializations(AssetKey("raw_orders"), limit=10).records) == mats
    observation = instance.fetch_observations(AssetKey("raw_orders"), limit=1).records[0]
    meta = observation.asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/prior_run_id"].value == first.run_id
    assert meta["rocky/replayed/rows_inserted"].value == 3
    # Dagster skips the steps downstream of an asset that yielded nothing (checks included);
    # the step that skipped says why for them
    assert second.get_asset_check_evaluations() == []
    downstream = instance.fetch_observations(AssetKey("customer_totals"), limit=1).records
    meta = downstream[0].asset_observation.metadata
    assert meta["rocky/decision"].value == "skipped_completed"
    assert meta["rocky/prior_run_id"].value == first.run_id
    assert meta["rocky/ledger_key"].value == "day-1/customer_totals"
    assert ledger.get("day-1/customer_totals").run_id == first.run_id


def test_checks_launched_again_with_one_key_replay_their_recorded_outcome(
    instance: DagsterInstance, ledger: Ledger, shop
) -> None:
    assets = [shop["replicate"], shop["build"], *shop["checks"]]
    first = _run(instance, assets, "day-2")
    checks_only = [
        AssetCheckKey(AssetKey("raw_orders"), "not_null_customer_id"),
        AssetCheckKey(AssetKey("customer_totals"), "row_count"),
    ]
    again = materialize(
        assets,
        instance=instance,
        tags={KEY_TAG: "day-2"},
        selection=AssetSelection.checks(*checks_only),
        resources={"ledger": IdempotencyLedger()},
    )
    assert again.success
    evaluations = again.get_asset_check_evaluations()
    assert len(evaluations) == 2 and {e.passed for e in evaluations} == {True}
    for evaluation in evaluations:
        meta = evaluation.metadata
        assert meta["rocky/decision"].value == "skipped_completed"
        assert meta["rocky/prior_run_id"].value == first.run_id


def test_a_subset_launch_does_only_the_subset_work(
    instance: DagsterInstance, ledger: Ledger, shop
) -> None:
    _run(instance, [shop["replicate"]], "sub", selection=[AssetKey("raw_orders")])
    assert _tables(shop["warehouse"]) == {"raw_orders"}  # replication copied only that table
    assert ledger.get("sub/raw_customers") is None
    _run(instance, [shop["replicate"], shop["build"]], "sub", selection=[AssetKey("raw_customers")])
    _run(instance, [shop["replicate"], shop["build"]], "sub", selection=[AssetKey("stg_orders")])
    assert _tables(shop["warehouse"]) == {"raw_orders", "raw_customers", "stg_orders"}
    assert ledger.get("sub/customer_totals") is None  # the model not selected was not built


def test_metadata_names_the_key_once_with_the_pipeline_figures(
    instance: DagsterInstance, shop
) -> None:
    _run(instance, [shop["replicate"]], "meta")
    record = instance.fetch_materializations(AssetKey("raw_orders"), limit=1).records[0]
    meta = record.asset_materialization.metadata
    assert meta["rocky/ledger_key"].value == "meta/raw_orders"
    assert meta["rocky/decision"].value == "proceed"
    assert isinstance(meta["rocky/fence"].value, int)
    assert meta["rows_inserted"].value == 3 and meta["table"].value == "raw_orders"


def test_work_left_downstream_of_a_skip_is_named_with_the_way_to_finish_it(
    instance: DagsterInstance, ledger: Ledger, shop, tmp_path: Path
) -> None:
    """Dagster never starts a step whose upstream asset yielded nothing; the skipping step
    says which downstream asset still has work under the key, and how to finish it."""
    model = tmp_path / "models" / "customer_totals.sql"
    good = model.read_text()
    model.write_text("SELECT no_such_column FROM stg_orders")
    broken = pipeline_assets(
        TransformationPipeline(
            warehouse=str(shop["warehouse"]), models_dir=str(tmp_path / "models")
        ),
        name="build",
    )[0]
    failed = materialize(
        [shop["replicate"], broken],
        instance=instance,
        tags={KEY_TAG: "day-3"},
        resources={"ledger": IdempotencyLedger()},
        raise_on_error=False,
    )
    assert not failed.success
    assert ledger.get("day-3/customer_totals").state == State.FAILED
    model.write_text(good)
    second = _run(instance, [shop["replicate"], shop["build"]], "day-3")
    messages = [
        record.event_log_entry.user_message
        for record in instance.get_records_for_run(second.run_id).records
    ]
    assert any(
        "'customer_totals' is not done" in m and "re-execute this run from failure" in m
        for m in messages
    ), messages
