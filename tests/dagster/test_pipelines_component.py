"""`PipelinesComponent`: the warehouse's pipelines declared in defs.yaml, on a real instance."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from rocky_dagster import IdempotencyLedger, PipelinesComponent
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.step.keys import FORCE_TAG, KEY_TAG

TYPE = "rocky_dagster.PipelinesComponent"


def _source(folder: Path) -> None:
    with closing(sqlite3.connect(folder / "shop.db")) as conn:
        conn.executescript(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount REAL);"
            "INSERT INTO orders VALUES (1, 'ada', 12.5), (2, 'grace', 7.0), (3, 'ada', 3.25);"
        )
        conn.commit()


PIPELINES = [
    {
        "type": "replication",
        "name": "replicate",
        "warehouse": "wh.db",
        "source": "shop.db",
        "tables": ["orders"],
        "target_prefix": "raw_",
        "group_name": "warehouse",
        "schedule": "0 6 * * *",
    },
    {
        "type": "transformation",
        "name": "models",
        "warehouse": "wh.db",
        "models_dir": "models",
        "group_name": "warehouse",
        "sensor": {"minimum_interval_seconds": 60},
    },
    {
        "type": "quality",
        "name": "quality",
        "warehouse": "wh.db",
        "checks": [{"kind": "not_null", "table": "raw_orders", "column": "customer"}],
    },
]


@contextmanager
def _load(attributes: dict) -> Iterator[tuple[Path, dg.Definitions]]:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.defs_folder_path / "warehouse"
        path.mkdir(parents=True)
        (path / "defs.yaml").write_text(yaml.safe_dump({"type": TYPE, "attributes": attributes}))
        _source(path)
        (path / "models").mkdir()
        (path / "models" / "totals.sql").write_text(
            "SELECT customer, sum(amount) AS amount FROM raw_orders GROUP BY customer"
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (_component, defs):
            yield path, defs


def test_scaffold_writes_a_working_warehouse() -> None:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(PipelinesComponent)
        data = sandbox.project_root / "data"  # data beside the project, not in its package
        assert (data / "drops" / "orders_sample.csv").exists()
        assert not (path / "drops").exists()
        with sandbox.load_component_and_build_defs(defs_path=path) as (_component, defs):
            keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"orders", "customer_totals"}


def test_yaml_pipelines_become_assets_jobs_schedule_sensor_and_the_ledger(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    with _load({"pipelines": PIPELINES}) as (path, defs):
        _check_loaded(instance, ledger, path, defs)


def _check_loaded(
    instance: dg.DagsterInstance, ledger: Ledger, path: Path, defs: dg.Definitions
) -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_orders", "totals", "shop/orders"}  # shop/orders: the external source
    assert graph.get(dg.AssetKey("totals")).parent_keys == {dg.AssetKey("raw_orders")}
    repository = defs.get_repository_def()
    assert {j.name for j in repository.get_all_jobs()} >= {
        "replicate_job",
        "models_job",
        "quality_job",
    }
    assert {s.name for s in repository.schedule_defs} == {"replicate_schedule"}
    assert "models_sensor" in {s.name for s in repository.sensor_defs}
    assert "rocky_ledger_on_failure" in {s.name for s in repository.sensor_defs}
    assert isinstance(defs.resources["ledger"], IdempotencyLedger)

    job = repository.get_job("replicate_job")
    first = job.execute_in_process(instance=instance, tags={KEY_TAG: "d1"})
    second = job.execute_in_process(instance=instance, tags={KEY_TAG: "d1"})
    assert first.success and second.success
    entry = ledger.get("d1/raw_orders")
    assert entry is not None and entry.state == State.SUCCEEDED and entry.run_id == first.run_id
    assert len(instance.fetch_materializations(dg.AssetKey("raw_orders"), limit=5).records) == 1
    assert (path / "wh.db").exists()  # relative paths are read from the defs.yaml folder


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"type": "nope", "warehouse": "wh.db"}, "type"),
        (
            {"type": "load", "warehouse": "wh.db", "directory": ".", "table": "t", "tabel": 1},
            "tabel",
        ),
        (
            {"type": "load", "warehouse": "wh.db", "directory": ".", "table": "t", "schedule": 5},
            "schedule",
        ),
        (
            {
                "type": "load",
                "warehouse": "wh.db",
                "directory": ".",
                "table": "t",
                "partitions": {"type": "daily"},
            },
            "start_date",
        ),
    ],
)
def test_a_bad_pipeline_entry_fails_at_load_naming_entry_and_field(entry: dict, field: str) -> None:
    with pytest.raises(Exception) as info, _load({"pipelines": [entry]}):
        pass
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(chain)
    assert "pipelines[0]" in text and field in text, text


def _materializations(instance: dg.DagsterInstance, name: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey(name), limit=10).records)


def test_key_fn_input_versions_skips_a_relaunch_until_its_inputs_change(
    instance: dg.DagsterInstance, ledger: Ledger
) -> None:
    with _load({"pipelines": PIPELINES[:2], "key_fn": "input_versions"}) as (path, defs):
        repository = defs.get_repository_def()
        replicate, models = repository.get_job("replicate_job"), repository.get_job("models_job")
        assert replicate.execute_in_process(instance=instance, tags={KEY_TAG: "d1"}).success

        # no key on the run: the key is totals' code version and raw_orders' latest version
        assert models.execute_in_process(instance=instance).success
        assert models.execute_in_process(instance=instance).success  # inputs unchanged: skip
        assert _materializations(instance, "totals") == 1
        [entry] = [e for e in ledger.entries() if e.key.endswith("/totals")]
        assert entry.key.startswith("inputs:") and entry.state == State.SUCCEEDED

        with closing(sqlite3.connect(path / "shop.db")) as conn:  # new source data
            conn.execute("INSERT INTO orders VALUES (4, 'grace', 1.5)")
            conn.commit()
        # raw_orders' own input (the external shop/orders) did not change: force its rerun
        assert replicate.execute_in_process(instance=instance, tags={FORCE_TAG: "force"}).success
        assert _materializations(instance, "raw_orders") == 2
        assert models.execute_in_process(instance=instance).success  # raw_orders changed: runs
        assert _materializations(instance, "totals") == 2
        assert models.execute_in_process(instance=instance).success
        assert _materializations(instance, "totals") == 2
