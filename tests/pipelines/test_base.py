"""Config loading, fingerprints and the result model shared by every pipeline type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import execute
from pydantic import ValidationError

from rocky_dagster.pipelines import (
    PIPELINE_TYPES,
    CheckResult,
    FileRecord,
    LoadPipeline,
    PipelineConfigError,
    PipelineResult,
    QualityPipeline,
    ReplicationPipeline,
    SnapshotPipeline,
    TableStats,
    TransformationPipeline,
    pipeline_from_dict,
    pipeline_from_yaml,
)


def test_every_type_is_registered_under_its_pipeline_type() -> None:
    assert {name: cls.__name__ for name, cls in PIPELINE_TYPES.items()} == {
        "replication": "ReplicationPipeline",
        "transformation": "TransformationPipeline",
        "quality": "QualityPipeline",
        "snapshot": "SnapshotPipeline",
        "load": "LoadPipeline",
    }


def test_python_dict_and_yaml_builds_are_equal_and_share_a_fingerprint(tmp_path: Path) -> None:
    wh = str(tmp_path / "w.db")
    built = SnapshotPipeline(
        warehouse=wh, source_table="s", target_table="t", unique_key=["id"], updated_at="u"
    )
    from_dict = SnapshotPipeline.model_validate(
        {
            "warehouse": wh,
            "source_table": "s",
            "target_table": "t",
            "unique_key": "id",
            "updated_at": "u",
        }
    )
    yaml_file = tmp_path / "snap.yaml"
    yaml_file.write_text(
        f"warehouse: {wh}\nsource_table: s\ntarget_table: t\nunique_key: [id]\nupdated_at: u\n"
    )
    from_file = SnapshotPipeline.from_yaml(yaml_file)
    from_text = SnapshotPipeline.from_yaml(yaml_file.read_text())
    from_str_path = SnapshotPipeline.from_yaml(str(yaml_file))
    assert built == from_dict == from_file == from_text == from_str_path
    assert len({c.fingerprint() for c in (built, from_dict, from_file, from_text)}) == 1
    assert from_dict.strategy == "timestamp"  # inferred, and part of the fingerprint


def test_fingerprint_is_stable_across_processes_and_sensitive_to_config(tmp_path: Path) -> None:
    wh = str(tmp_path / "w.db")
    cfg = LoadPipeline(
        warehouse=wh, directory=str(tmp_path), table="t", column_types={"a": "integer"}
    )
    code = (
        "from rocky_dagster.pipelines import LoadPipeline;"
        f"print(LoadPipeline(warehouse={wh!r}, directory={str(tmp_path)!r}, table='t',"
        "column_types={'a': 'INTEGER'}).fingerprint())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == cfg.fingerprint()
    assert len(other) == 64
    changed = cfg.model_copy(update={"table": "u"})
    assert changed.fingerprint() != cfg.fingerprint()
    round_tripped = LoadPipeline.model_validate(cfg.model_dump())
    assert round_tripped.fingerprint() == cfg.fingerprint()


def test_fingerprint_differs_between_types_with_identical_fields(tmp_path: Path) -> None:
    class OtherLoad(LoadPipeline):
        pipeline_type = "load2"

    cfg = LoadPipeline(warehouse=str(tmp_path / "w.db"), directory=str(tmp_path), table="t")
    assert OtherLoad.model_validate(cfg.model_dump()).fingerprint() != cfg.fingerprint()


def test_missing_warehouse_directory_fails_at_definition_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        QualityPipeline(
            warehouse=str(tmp_path / "nope" / "w.db"),
            checks=[{"kind": "row_count", "table": "t", "min": 1}],
        )
    assert info.value.errors()[0]["loc"] == ("warehouse",)
    assert "does not exist" in str(info.value)


def test_unknown_field_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        ReplicationPipeline.model_validate(
            {"warehouse": str(tmp_path / "w.db"), "source": "s.db", "tabels": ["x"]}
        )
    assert info.value.errors()[0]["loc"] == ("tabels",)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = TransformationPipeline(warehouse=str(tmp_path / "w.db"), models_dir=str(tmp_path))
    with pytest.raises(ValidationError):
        cfg.models_dir = "/elsewhere"  # type: ignore[misc]


def test_bad_yaml_and_non_mapping_yaml_are_config_errors() -> None:
    with pytest.raises(PipelineConfigError, match="invalid YAML"):
        LoadPipeline.from_yaml("warehouse: [unclosed\nx: 1")
    with pytest.raises(PipelineConfigError, match="mapping"):
        LoadPipeline.from_yaml("- just\n- a list\n")
    with pytest.raises(PipelineConfigError, match="cannot read"):
        LoadPipeline.from_yaml("/no/such/config.yaml")


def test_pipeline_from_dict_and_yaml_dispatch_on_type(tmp_path: Path) -> None:
    wh = str(tmp_path / "w.db")
    cfg = pipeline_from_dict(
        {"type": "load", "warehouse": wh, "directory": str(tmp_path), "table": "t"}
    )
    assert isinstance(cfg, LoadPipeline)
    text = f"type: quality\nwarehouse: {wh}\nchecks:\n  - {{kind: row_count, table: t, max: 3}}\n"
    assert isinstance(pipeline_from_yaml(text), QualityPipeline)
    with pytest.raises(PipelineConfigError, match="type: must be one of"):
        pipeline_from_dict({"type": "teleport", "warehouse": wh})


def test_result_is_json_able_and_summary_stays_small() -> None:
    result = PipelineResult(pipeline_type="replication")
    for i in range(300):
        stats = result.table(f"table_with_a_rather_long_name_{i:04d}")
        stats.rows_read, stats.rows_inserted, stats.rows_updated, stats.rows_deleted = 10, 3, 2, 1
    result.checks = [
        CheckResult(name=f"c{i}", table="t", kind="not_null", severity="warn", passed=False)
        for i in range(100)
    ]
    result.files = [FileRecord(path="/x.csv", size=1, sha256="0" * 64, status="skipped")]
    result.details = {"watermarks": {"t": "2024-01-01"}}
    result.finish()
    dumped = json.dumps(result.model_dump(mode="json"))
    assert json.loads(dumped)["rows_changed"] == 300 * 6
    summary = result.summary()
    encoded = json.dumps(summary)
    assert len(encoded) < 8_000
    assert summary["rows_read"] == 3000
    assert summary["rows_changed"] == 1800
    assert "rows_written" not in summary and "rows_written" not in dumped
    assert summary["tables_truncated"] == 250
    assert summary["checks"]["failed_warn"] == 100
    assert len(summary["checks"]["failed_names"]) == 20
    assert summary["files"] == {"loaded": 0, "skipped": 1}
    restored = PipelineResult.model_validate_json(dumped)
    assert restored.rows_changed == result.rows_changed
    assert restored.tables_touched == result.tables_touched


def test_table_stats_rows_changed_adds_inserted_updated_deleted() -> None:
    stats = TableStats(rows_read=9, rows_inserted=1, rows_updated=2, rows_deleted=4)
    assert stats.rows_changed == 7
    assert stats.model_dump()["rows_changed"] == 7
    assert "rows_written" not in stats.model_dump()


def test_rows_written_is_a_deprecated_alias_of_rows_changed() -> None:
    result = PipelineResult(pipeline_type="load")
    result.table("t").rows_inserted = 3
    with pytest.warns(DeprecationWarning, match="use rows_changed"):
        assert result.rows_written == 3
    with pytest.warns(DeprecationWarning, match="use rows_changed"):
        assert result.tables["t"].rows_written == 3


def test_a_rebuild_reports_rows_changed_not_rows_written(tmp_path: Path) -> None:
    """Refreshing a 3-row table deletes 3 and inserts 3: 6 rows changed, and the summary
    says so under a name that does not claim 6 rows were written."""
    warehouse = str(tmp_path / "w.db")
    execute(warehouse, "CREATE TABLE raw (x INTEGER); INSERT INTO raw VALUES (1), (2), (3);")
    models = tmp_path / "m"
    models.mkdir()
    (models / "t.sql").write_text("SELECT x FROM raw")
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
    pipeline.run()
    execute(warehouse, "UPDATE raw SET x = x + 10;")
    summary = pipeline.run().summary()
    assert summary["rows_changed"] == 6
    assert summary["tables"]["t"] == {
        "read": 0,
        "inserted": 3,
        "updated": 0,
        "deleted": 3,
        "changed": 6,
    }
    assert not any("written" in key for key in [*summary, *summary["tables"]["t"]])
