"""Every way a pipeline run fails: a PipelineError subclass naming the pipeline, the table or
file and, where there is one, the line; and the warehouse exactly as it was before the run."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_helpers import dump, execute

from rocky_dagster.pipelines import (
    KeyChangeError,
    LoadError,
    LoadPipeline,
    ModelGraphError,
    PipelineConfig,
    PipelineError,
    QualityChecksFailed,
    QualityPipeline,
    ReplicationPipeline,
    SchemaConflictError,
    SnapshotPipeline,
    TransformationPipeline,
    ViewValidationError,
    WarehouseError,
)


@dataclass(frozen=True)
class Case:
    """A failing run: `setup` prepares the files under a directory and returns the config."""

    setup: Callable[[Path, str], PipelineConfig]
    error: type[PipelineError]
    table: str | None = None
    file: str | None = None  # name of the file the error must name
    line: int | None = None


def _replication(tmp: Path, wh: str, source_sql: str, **options: object) -> ReplicationPipeline:
    source = str(tmp / "source.db")
    execute(source, source_sql)
    return ReplicationPipeline(warehouse=wh, source=source, **options)  # type: ignore[arg-type]


def _prior_replication(tmp: Path, wh: str) -> None:
    source = str(tmp / "prior.db")
    execute(source, "CREATE TABLE t (k TEXT, v INTEGER); INSERT INTO t VALUES ('a', 1), ('a', 2);")
    ReplicationPipeline(warehouse=wh, source=source, key_columns=["k", "v"]).run()


def _models(tmp: Path, wh: str, models: dict[str, str]) -> TransformationPipeline:
    directory = tmp / "models"
    directory.mkdir(exist_ok=True)
    for name, text in models.items():
        (directory / name).write_text(text)
    return TransformationPipeline(warehouse=wh, models_dir=str(directory))


def _load(tmp: Path, wh: str, files: dict[str, bytes], **options: object) -> LoadPipeline:
    inbox = tmp / "inbox"
    inbox.mkdir(exist_ok=True)
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    return LoadPipeline(warehouse=wh, directory=str(inbox), table="t", **options)  # type: ignore[arg-type]


def _broken_view(tmp: Path, wh: str) -> TransformationPipeline:
    execute(wh, "CREATE TABLE raw (a INTEGER, b INTEGER); INSERT INTO raw VALUES (1, 2);")
    _models(tmp, wh, {"m.sql": "SELECT a, b FROM raw"}).run()
    execute(wh, "CREATE VIEW reads_b AS SELECT b FROM m;")
    return _models(tmp, wh, {"m.sql": "SELECT a FROM raw"})


def _snapshot(wh: str, rows: str) -> SnapshotPipeline:
    execute(wh, f"CREATE TABLE src (id INTEGER, u TEXT); {rows}")
    return SnapshotPipeline(
        warehouse=wh, source_table="src", target_table="snap", unique_key="id", updated_at="u"
    )


def _view_target(tmp: Path, wh: str) -> LoadPipeline:
    execute(wh, "CREATE TABLE x (a INTEGER); CREATE VIEW t AS SELECT a FROM x;")
    return _load(tmp, wh, {"a.csv": b"a\n1\n"})


CASES: dict[str, Case] = {
    "replication: type conflict": Case(
        lambda tmp, wh: (
            execute(wh, "CREATE TABLE t (k TEXT);"),
            _replication(tmp, wh, "CREATE TABLE t (k INTEGER); INSERT INTO t VALUES (1);"),
        )[1],
        SchemaConflictError,
        table="t",
    ),
    "replication: duplicate source keys": Case(
        lambda tmp, wh: _replication(
            tmp,
            wh,
            "CREATE TABLE t (k TEXT, v INTEGER); INSERT INTO t VALUES ('a', 1), ('a', 2);",
            key_columns=["k"],
        ),
        PipelineError,
        table="t",
    ),
    "replication: missing source file": Case(
        lambda tmp, wh: ReplicationPipeline(warehouse=wh, source=str(tmp / "absent.db")),
        PipelineError,
        file="absent.db",
    ),
    "replication: source is not a database": Case(
        lambda tmp, wh: (
            (tmp / "junk.db").write_bytes(b"not a database" * 100),
            ReplicationPipeline(warehouse=wh, source=str(tmp / "junk.db")),
        )[1],
        WarehouseError,
        file="junk.db",
    ),
    "replication: new key the stored rows break": Case(
        lambda tmp, wh: (
            _prior_replication(tmp, wh),
            _replication(
                tmp,
                wh,
                "CREATE TABLE t (k TEXT, v INTEGER, u INTEGER);INSERT INTO t VALUES ('a', 3, 3);",
                key_columns=["k"],
                strategy="incremental",
                cursor_column="u",
            ),
        )[1],
        KeyChangeError,
        table="t",
    ),
    "transformation: cycle": Case(
        lambda tmp, wh: _models(tmp, wh, {"a.sql": "SELECT * FROM b", "b.sql": "SELECT * FROM a"}),
        ModelGraphError,
        table="a",
    ),
    "transformation: missing table": Case(
        lambda tmp, wh: (
            execute(wh, "CREATE TABLE here (x INTEGER);"),
            _models(tmp, wh, {"a.sql": "SELECT * FROM here", "m.sql": "SELECT * FROM nowhere"}),
        )[1],
        ModelGraphError,
        table="m",
    ),
    "transformation: failing model": Case(
        lambda tmp, wh: _models(tmp, wh, {"a.sql": "SELECT 1 AS x", "b.sql": "SELECT nope FROM a"}),
        WarehouseError,
        table="b",
    ),
    "transformation: unparseable model": Case(
        lambda tmp, wh: _models(tmp, wh, {"bad.sql": "SELECT * FROM (a JOIN"}),
        PipelineError,
        table="bad",
        file="bad.sql",
    ),
    "transformation: view broken by a model": Case(
        _broken_view, ViewValidationError, table="reads_b"
    ),
    "quality: failed checks": Case(
        lambda tmp, wh: (
            execute(wh, "CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (NULL);"),
            QualityPipeline(
                warehouse=wh, checks=[{"kind": "not_null", "table": "t", "column": "a"}]
            ),
        )[1],
        QualityChecksFailed,
        table="t",
    ),
    "quality: missing warehouse": Case(
        lambda tmp, wh: QualityPipeline(
            warehouse=str(tmp / "absent.db"),
            checks=[{"kind": "not_null", "table": "t", "column": "a"}],
        ),
        PipelineError,
        file="absent.db",
    ),
    "snapshot: NULL keys": Case(
        lambda tmp, wh: _snapshot(wh, "INSERT INTO src VALUES (NULL, 'x');"),
        PipelineError,
        table="snap",
    ),
    "snapshot: missing source": Case(
        lambda tmp, wh: SnapshotPipeline(
            warehouse=wh, source_table="src", target_table="snap", unique_key="id", updated_at="u"
        ),
        PipelineError,
        table="src",
    ),
    "load: wrong field count": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.csv": b"a,b\n1,2\n3\n"}),
        LoadError,
        table="t",
        file="a.csv",
        line=3,
    ),
    "load: unterminated quote": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.csv": b'a,b\n1,"2\n3,4\n'}),
        LoadError,
        table="t",
        file="a.csv",
        line=2,
    ),
    "load: bad bytes": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.csv": b"a,b\n1,2\n3,\xfe\n"}),
        LoadError,
        table="t",
        file="a.csv",
        line=3,
    ),
    "load: integer beyond 64 bits": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.jsonl": b'{"a": 1}\n{"a": 99999999999999999999}\n'}),
        LoadError,
        table="t",
        file="a.jsonl",
        line=2,
    ),
    "load: invalid JSON": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.jsonl": b'{"a": 1}\n{"a": \n'}),
        LoadError,
        table="t",
        file="a.jsonl",
        line=2,
    ),
    "load: empty file, no schema": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.csv": b""}),
        LoadError,
        table="t",
        file="a.csv",
    ),
    "load: unknown extension": Case(
        lambda tmp, wh: _load(tmp, wh, {"a.xml": b"<a/>"}),
        LoadError,
        table="t",
        file="a.xml",
    ),
    "load: target is a view": Case(_view_target, PipelineError, table="t"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_failure_names_where_it_happened_and_changes_nothing(
    tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    warehouse = str(tmp_path / "warehouse.db")
    config = case.setup(tmp_path, warehouse)
    before = dump(warehouse)
    with pytest.raises(PipelineError) as caught:
        config.run()
    error = caught.value
    assert isinstance(error, case.error), repr(error)
    message = str(error)
    assert error.pipeline == config.pipeline_type
    assert message.startswith(f"{config.pipeline_type} pipeline: "), message
    assert case.table or case.file, "a case names a table or a file"
    if case.table:
        assert error.table == case.table and repr(case.table) in message, message
    if case.file:
        assert Path(error.path or "").name == case.file and case.file in message, message
    if case.line is not None:
        assert error.line == case.line and f"line {case.line}" in message, message
    assert dump(warehouse) == before
    copy = pickle.loads(pickle.dumps(error))  # Dagster and subprocesses pickle errors
    assert (type(copy), str(copy), copy.table, copy.path, copy.line) == (
        type(error),
        message,
        error.table,
        error.path,
        error.line,
    )


def test_an_unexpected_exception_is_still_a_pipeline_error_with_its_cause(
    tmp_path: Path,
) -> None:
    class Exploding(ReplicationPipeline):
        def run(self) -> object:  # type: ignore[override]
            raise ZeroDivisionError("boom")

    execute(str(tmp_path / "s.db"), "CREATE TABLE t (a INTEGER);")
    config = Exploding(warehouse=str(tmp_path / "w.db"), source=str(tmp_path / "s.db"))
    with pytest.raises(
        PipelineError, match="replication pipeline: unexpected ZeroDivisionError"
    ) as c:
        config.run()
    assert isinstance(c.value.__cause__, ZeroDivisionError)


def test_a_warehouse_that_is_not_a_database_is_named_and_left_byte_for_byte(
    tmp_path: Path,
) -> None:
    warehouse = tmp_path / "warehouse.db"
    junk = b"this is not an SQLite database" * 200
    warehouse.write_bytes(junk)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.sql").write_text("SELECT 1 AS x")
    config = TransformationPipeline(warehouse=str(warehouse), models_dir=str(tmp_path / "models"))
    with pytest.raises(WarehouseError) as caught:
        config.run()
    assert caught.value.pipeline == "transformation"
    assert caught.value.path == str(warehouse) and str(warehouse) in str(caught.value)
    assert warehouse.read_bytes() == junk
