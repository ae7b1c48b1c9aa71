"""Loading real CSV and JSON-lines files into a real warehouse file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, query, scratch_dir, table_rows
from pydantic import ValidationError

from rocky_dagster.pipelines import LoadError, LoadPipeline, PipelineError

ORDERS_CSV = 'id,customer,amount,zip\n1,ann,1.5,007\n2,bob,,01234\n\n3,"cy, jr",2,99\n'


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    directory = tmp_path / "inbox"
    directory.mkdir()
    return directory


def loader(warehouse: str, inbox: Path, **options: object) -> LoadPipeline:
    return LoadPipeline(warehouse=warehouse, directory=str(inbox), table="orders", **options)


def loaded_files(warehouse: str) -> list[tuple[object, ...]]:
    return query(
        warehouse, "SELECT path, sha256, size, rows FROM _rocky_loaded_files ORDER BY path"
    )


def test_csv_load_infers_types_and_records_the_file(warehouse: str, inbox: Path) -> None:
    path = inbox / "orders.csv"
    path.write_text(ORDERS_CSV)
    result = loader(warehouse, inbox, pattern="*.csv").run()
    assert [(f.status, f.rows) for f in result.files] == [("loaded", 3)]
    assert result.tables["orders"].rows_inserted == 3
    assert query(warehouse, "SELECT name, type FROM pragma_table_info('orders')") == [
        ("id", "INTEGER"),
        ("customer", "TEXT"),
        ("amount", "REAL"),
        ("zip", "TEXT"),  # leading zeros keep the column text
    ]
    assert table_rows(warehouse, "orders") == [
        (1, "ann", 1.5, "007"),
        (2, "bob", None, "01234"),
        (3, "cy, jr", 2.0, "99"),
    ]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded_files(warehouse) == [(str(path), digest, path.stat().st_size, 3)]
    assert result.files[0].sha256 == digest


def test_a_file_is_loaded_once_per_checksum_unless_reload(warehouse: str, inbox: Path) -> None:
    (inbox / "a.csv").write_text(ORDERS_CSV)
    pipeline = loader(warehouse, inbox)
    pipeline.run()
    before = dump(warehouse)

    again = pipeline.run()
    assert [(f.status, f.rows) for f in again.files] == [("skipped", 0)]
    assert again.rows_changed == 0
    assert dump(warehouse) == before

    (inbox / "b_copy.csv").write_text(ORDERS_CSV)  # same content under another name
    copy = pipeline.run()
    assert [f.status for f in copy.files] == ["skipped", "skipped"]
    assert "already loaded from" in (copy.files[1].reason or "")

    (inbox / "a.csv").write_text(ORDERS_CSV + "4,dee,3,1\n")  # changed content: a new file
    changed = pipeline.run()
    assert [f.status for f in changed.files] == ["loaded", "skipped"]
    assert changed.rows_changed == 4
    assert query(warehouse, "SELECT count(*) FROM orders") == [(7,)]

    forced = loader(warehouse, inbox, reload=True).run()
    assert [f.status for f in forced.files] == ["loaded", "loaded"]
    assert query(warehouse, "SELECT count(*) FROM orders") == [(14,)]


def test_malformed_row_names_file_and_line_and_commits_nothing(warehouse: str, inbox: Path) -> None:
    (inbox / "a_good.csv").write_text(ORDERS_CSV)
    loader(warehouse, inbox).run()
    (inbox / "b_good.csv").write_text("id,customer,amount,zip\n10,x,1,1\n")
    (inbox / "c_bad.csv").write_text("id,customer,amount,zip\n11,y,1,1\n12,z,1\n")
    before = dump(warehouse)
    with pytest.raises(LoadError) as info:
        loader(warehouse, inbox).run()
    assert (Path(info.value.path).name, info.value.line) == ("c_bad.csv", 3)
    assert "c_bad.csv, line 3: expected 4 fields, found 3" in str(info.value)
    assert dump(warehouse) == before  # neither b_good nor c_bad's first row was committed


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (
            "id,customer,amount,zip\n5,x,1,1\n6,y,abc,2\n",
            3,
            "column 'amount' expects REAL, got 'abc'",
        ),
        (
            "id,customer,amount,zip\n5,x,1,1\n6.5,y,3,2\n",
            3,
            "column 'id' expects INTEGER, got '6.5'",
        ),
        ("id,customer,amount,zip,extra\n5,x,1,1,1\n", 1, "columns ['extra'] are not in table"),
    ],
)
def test_mistyped_value_in_a_later_file_is_rejected_with_its_line(
    warehouse: str, inbox: Path, content: str, line: int, message: str
) -> None:
    (inbox / "a.csv").write_text(ORDERS_CSV)
    loader(warehouse, inbox).run()
    (inbox / "b.csv").write_text(content)
    before = dump(warehouse)
    with pytest.raises(LoadError) as info:
        loader(warehouse, inbox).run()
    assert info.value.line == line and message in str(info.value)
    assert dump(warehouse) == before


def test_error_line_is_exact_beyond_the_first_batch(warehouse: str, inbox: Path) -> None:
    rows = "".join(f"{i},c{i},1.0,1\n" for i in range(1, 24))
    (inbox / "big.csv").write_text("id,customer,amount,zip\n" + rows + "24,c24,oops,1\n")
    pipeline = loader(warehouse, inbox, batch_size=5, column_types={"amount": "REAL"}, infer_rows=1)
    with pytest.raises(LoadError) as info:
        pipeline.run()
    assert info.value.line == 25
    assert (
        not Path(warehouse).exists()
        or query(warehouse, "SELECT name FROM sqlite_master WHERE name = 'orders'") == []
    )


def test_existing_non_strict_table_is_type_checked_too(warehouse: str, inbox: Path) -> None:
    execute(warehouse, "CREATE TABLE orders (id INTEGER, customer TEXT, amount REAL, zip TEXT);")
    (inbox / "a.csv").write_text("id,customer,amount,zip\n1,a,1,1\n2,b,x,2\n")
    with pytest.raises(LoadError, match="line 3: row rejected: column 'amount' expects REAL"):
        loader(warehouse, inbox).run()
    assert query(warehouse, "SELECT count(*) FROM orders") == [(0,)]
    assert query(warehouse, "SELECT name FROM sqlite_temp_master") == []
    (inbox / "a.csv").write_text("customer,id\na,1\n")  # header order differs from the table
    loader(warehouse, inbox).run()
    assert table_rows(warehouse, "orders") == [(1, "a", None, None)]


def test_json_lines_with_nested_values(warehouse: str, inbox: Path) -> None:
    lines = [
        {"id": 1, "tags": ["a"], "ok": True, "score": 1},
        {"id": 2, "meta": {"k": 1}, "score": 2.5},
    ]
    (inbox / "events.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    result = loader(warehouse, inbox).run()
    assert result.files[0].rows == 2
    assert query(warehouse, "SELECT name, type FROM pragma_table_info('orders')") == [
        ("id", "INTEGER"),
        ("tags", "TEXT"),
        ("ok", "INTEGER"),
        ("score", "REAL"),
        ("meta", "TEXT"),
    ]
    assert table_rows(warehouse, "orders") == [
        (1, '["a"]', 1, 1.0, None),
        (2, None, None, 2.5, '{"k": 1}'),
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"id": 1}\n{"id": 2, "nope": 3}\n', 2, "keys ['nope'] are not columns"),
        ('{"id": 1}\n{"id": \n', 2, "invalid JSON"),
        ('{"id": 1}\n\n[1, 2]\n', 3, "expected a JSON object"),
        ('{"id": 1}\n{"id": "two"}\n', 2, "column 'id' expects INTEGER"),
    ],
)
def test_bad_json_line_names_file_and_line(
    warehouse: str, inbox: Path, text: str, line: int, message: str
) -> None:
    (inbox / "e.jsonl").write_text(text)
    with pytest.raises(LoadError) as info:
        loader(warehouse, inbox, infer_rows=1).run()
    assert info.value.line == line and message in str(info.value) and "e.jsonl" in str(info.value)


def test_headerless_csv_with_declared_names_types_and_delimiter(
    warehouse: str, inbox: Path
) -> None:
    (inbox / "a.txt").write_text("1;0042\n2;7\n")
    loader(
        warehouse,
        inbox,
        header=False,
        column_names=["id", "code"],
        column_types={"code": "integer"},
        delimiter=";",
    ).run()
    assert table_rows(warehouse, "orders") == [(1, 42), (2, 7)]


def test_create_table_false_requires_the_table(warehouse: str, inbox: Path) -> None:
    (inbox / "a.csv").write_text(ORDERS_CSV)
    with pytest.raises(PipelineError, match="does not exist and create_table is false"):
        loader(warehouse, inbox, create_table=False).run()


def test_truncate_first_replaces_content_only_when_the_files_changed(
    warehouse: str, inbox: Path
) -> None:
    (inbox / "a.csv").write_text(ORDERS_CSV)
    pipeline = loader(warehouse, inbox, truncate_first=True)
    pipeline.run()
    before = dump(warehouse)
    assert pipeline.run().rows_changed == 0
    assert dump(warehouse) == before
    (inbox / "a.csv").write_text("id,customer,amount,zip\n9,z,1,1\n")
    result = pipeline.run()
    assert (result.tables["orders"].rows_deleted, result.tables["orders"].rows_inserted) == (3, 1)
    assert table_rows(warehouse, "orders") == [(9, "z", 1.0, "1")]
    assert len(loaded_files(warehouse)) == 1


def test_concurrent_runs_of_one_load_load_each_file_once(warehouse: str, inbox: Path) -> None:
    rows = "".join(f"{i},c{i},1.0,1\n" for i in range(2000))
    (inbox / "a.csv").write_text("id,customer,amount,zip\n" + rows)
    pipeline = loader(warehouse, inbox)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: pipeline.run(), range(4)))
    assert sorted(r.files[0].status for r in results) == ["loaded", "skipped", "skipped", "skipped"]
    assert sum(r.rows_changed for r in results) == 2000
    assert query(warehouse, "SELECT count(*) FROM orders") == [(2000,)]


def test_bad_config_fails_at_definition(warehouse: str, inbox: Path) -> None:
    with pytest.raises(ValidationError, match="column_names: required when header is false"):
        loader(warehouse, inbox, header=False)
    with pytest.raises(ValidationError, match="column_types"):
        loader(warehouse, inbox, column_types={"a": "DATE"})
    with pytest.raises(ValidationError, match="encoding"):
        loader(warehouse, inbox, encoding="klingon")
    with pytest.raises(ValidationError, match="reserved prefix"):
        LoadPipeline(warehouse=warehouse, directory=str(inbox), table="_rocky_x")


cell = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.text(alphabet='abc ,"\n', max_size=6),
    st.just(""),
)


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(cell, cell), max_size=15))
def test_reloading_unchanged_files_writes_nothing(rows: list[tuple[str, str]]) -> None:
    with scratch_dir() as tmp:
        warehouse, inbox = str(tmp / "w.db"), tmp / "in"
        inbox.mkdir()
        buffer = io.StringIO()
        csv.writer(buffer).writerows([("a", "b"), *rows])
        (inbox / "data.csv").write_text(buffer.getvalue())
        pipeline = LoadPipeline(
            warehouse=warehouse,
            directory=str(inbox),
            table="t",
            column_types={"a": "TEXT", "b": "TEXT"},
        )
        first = pipeline.run()
        assert first.rows_changed == len(rows)
        before = dump(warehouse)
        again = pipeline.run()
        assert again.rows_changed == 0
        assert [f.status for f in again.files] == ["skipped"]
        assert dump(warehouse) == before
        expected = [tuple(v if v != "" else None for v in r) for r in rows]
        assert sorted(map(repr, table_rows(warehouse, "t"))) == sorted(map(repr, expected))


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "blank.jsonl"])
def test_an_empty_file_loads_zero_rows_into_an_existing_table(
    warehouse: str, inbox: Path, name: str
) -> None:
    (inbox / "a.csv").write_text(ORDERS_CSV)
    loader(warehouse, inbox, pattern="a.csv").run()
    before = table_rows(warehouse, "orders")
    (inbox / name).write_text("\n\n" if name.startswith("blank") else "")
    result = loader(warehouse, inbox, pattern=name).run()
    assert [(f.status, f.rows) for f in result.files] == [("loaded", 0)]
    assert table_rows(warehouse, "orders") == before


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_an_empty_file_creates_the_table_from_column_names_or_is_a_named_error(
    warehouse: str, inbox: Path, name: str
) -> None:
    (inbox / name).write_bytes(b"")
    result = loader(warehouse, inbox, column_names=["id", "note"]).run()
    assert result.files[0].rows == 0
    assert query(warehouse, "SELECT name FROM pragma_table_info('orders')") == [("id",), ("note",)]
    other = str(Path(warehouse).with_name("other.db"))
    with pytest.raises(LoadError) as caught:
        loader(other, inbox).run()
    error = caught.value
    assert Path(error.path or "").name == name and error.table == "orders"
    assert error.pipeline == "load" and "column_names" in str(error)
    assert dump(other) == {}
    # a later file in the same run gives the table its columns: the empty one loads 0 rows
    (inbox / "z.csv").write_text("id,note\n1,x\n")
    (inbox / "z.jsonl").write_text('{"id": 1, "note": "x"}\n')
    loaded = loader(other, inbox, pattern=f"*{Path(name).suffix}").run()
    assert [f.rows for f in loaded.files] == [0, 1]


def test_a_json_integer_beyond_64_bits_is_a_load_error(warehouse: str, inbox: Path) -> None:
    (inbox / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 18446744073709551616}\n')
    with pytest.raises(LoadError) as caught:
        loader(warehouse, inbox).run()
    assert (Path(caught.value.path or "").name, caught.value.line) == ("a.jsonl", 3)
    assert "64-bit" in str(caught.value)
    (inbox / "a.jsonl").write_text('{"id": 1, "x": NaN}\n')
    with pytest.raises(LoadError, match="NaN is not a JSON value"):
        loader(warehouse, inbox).run()


def test_a_csv_field_over_128_kib_loads(warehouse: str, inbox: Path) -> None:
    big = "x" * (300 * 1024)
    (inbox / "a.csv").write_text(f'id,note\n1,"{big}"\n2,{big}\n')
    loader(warehouse, inbox).run()
    assert query(warehouse, "SELECT id, length(note) FROM orders") == [
        (1, 300 * 1024),
        (2, 300 * 1024),
    ]
    assert csv.field_size_limit() == 128 * 1024  # the process-wide limit is restored


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('id,note\n1,ok\n2,"never closed\n3,swallowed\n4,too\n', 3),
        ('id,note\n1,"multi\nline"\n2,"after"junk\n', 4),
        ('id,"note\n1,x\n', 1),
    ],
)
def test_malformed_quoting_is_a_load_error_naming_file_and_line(
    warehouse: str, inbox: Path, text: str, line: int
) -> None:
    (inbox / "a.csv").write_text("id,note\n0,kept\n")
    loader(warehouse, inbox).run()
    (inbox / "b.csv").write_text(text)
    before = dump(warehouse)
    with pytest.raises(LoadError) as caught:
        loader(warehouse, inbox).run()
    assert (Path(caught.value.path or "").name, caught.value.line) == ("b.csv", line)
    assert f"b.csv, line {line}" in str(caught.value)
    assert dump(warehouse) == before


def test_invalid_bytes_name_their_line_even_while_inferring(warehouse: str, inbox: Path) -> None:
    (inbox / "a.csv").write_bytes(b"id,note\n1,ok\n2,\xff\n")
    with pytest.raises(LoadError) as caught:
        loader(warehouse, inbox).run()
    assert caught.value.line == 3 and "utf-8" in str(caught.value)
