"""Replication from a real source SQLite file into a real warehouse file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, query, scratch_dir, table_rows
from pydantic import ValidationError

from rocky_dagster.pipelines import (
    KeyChangeError,
    PipelineError,
    ReplicationPipeline,
    SchemaConflictError,
)

ORDERS = "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER, updated_at TEXT);"


def incremental(warehouse: str, source: str, **extra: object) -> ReplicationPipeline:
    return ReplicationPipeline(
        warehouse=warehouse,
        source=source,
        tables=["orders"],
        strategy="incremental",
        cursor_column="updated_at",
        key_columns=["id"],
        **extra,
    )


def test_incremental_picks_up_only_new_and_changed_rows_across_three_runs(
    warehouse: str, source_db: str
) -> None:
    rows = [(i, f"item{i}", i, f"2024-01-{i:02d}") for i in range(1, 11)]
    execute(source_db, ORDERS, {"orders": rows})
    pipeline = incremental(warehouse, source_db)

    first = pipeline.run()
    assert first.tables["orders"].rows_inserted == 10
    assert first.details["watermarks"] == {"orders": "2024-01-10"}
    assert table_rows(warehouse, "orders") == rows

    # Two rows change (cursor bumped), three are new; one row is edited *without* bumping
    # its cursor, which an incremental run must not see.
    execute(
        source_db,
        "UPDATE orders SET qty = 100, updated_at = '2024-02-01' WHERE id IN (2, 5);"
        "UPDATE orders SET item = 'silent edit' WHERE id = 7;"
        "INSERT INTO orders VALUES (11, 'n11', 1, '2024-02-02'), (12, 'n12', 1, '2024-02-02'),"
        " (13, 'n13', 1, '2024-02-03');",
    )
    second = pipeline.run()
    stats = second.tables["orders"]
    # rows at or after the watermark: the boundary row 10, the 2 changed and 3 new rows
    assert stats.rows_read == 6
    assert (stats.rows_inserted, stats.rows_updated, stats.rows_deleted) == (3, 2, 0)
    assert second.rows_changed == 5
    assert second.details["watermarks"] == {"orders": "2024-02-03"}
    wh = dict((r[0], r) for r in table_rows(warehouse, "orders"))
    assert wh[2][2] == wh[5][2] == 100
    assert wh[7][1] == "item7"  # not re-read: proves only cursor-selected rows were copied
    assert len(wh) == 13

    before = dump(warehouse)
    third = pipeline.run()
    assert third.tables["orders"].rows_read == 1  # the boundary row, unchanged
    assert third.rows_changed == 0
    assert dump(warehouse) == before
    assert query(warehouse, "SELECT value_json FROM _rocky_watermarks") == [('"2024-02-03"',)]


def test_full_refresh_writes_only_differences_and_deletes_vanished_rows(
    warehouse: str, source_db: str
) -> None:
    execute(source_db, ORDERS, {"orders": [(1, "a", 1, "t"), (2, "b", 2, "t"), (3, "c", 3, "t")]})
    pipeline = ReplicationPipeline(warehouse=warehouse, source=source_db)
    assert pipeline.run().tables["orders"].rows_inserted == 3
    execute(
        source_db,
        "DELETE FROM orders WHERE id = 1; UPDATE orders SET qty = 20 WHERE id = 2;"
        "INSERT INTO orders VALUES (4, 'd', 4, 't');",
    )
    stats = pipeline.run().tables["orders"]
    assert (stats.rows_read, stats.rows_inserted, stats.rows_updated, stats.rows_deleted) == (
        3,
        1,
        1,
        1,
    )
    assert table_rows(warehouse, "orders") == table_rows(source_db, "orders")
    assert pipeline.run().rows_changed == 0


def test_full_refresh_of_a_keyless_table_replaces_it_only_when_content_differs(
    warehouse: str, source_db: str
) -> None:
    execute(
        source_db,
        "CREATE TABLE events (kind TEXT, n INTEGER);",
        {"events": [("a", 1), ("a", 1), ("b", None)]},
    )
    pipeline = ReplicationPipeline(warehouse=warehouse, source=source_db)
    pipeline.run()
    assert pipeline.run().rows_changed == 0
    execute(source_db, "INSERT INTO events VALUES ('a', 1);")  # a third duplicate is a change
    stats = pipeline.run().tables["events"]
    assert (stats.rows_deleted, stats.rows_inserted) == (3, 4)
    assert sorted(table_rows(warehouse, "events"), key=repr) == sorted(
        table_rows(source_db, "events"), key=repr
    )


def test_new_source_column_is_added_to_the_target(warehouse: str, source_db: str) -> None:
    execute(source_db, ORDERS, {"orders": [(1, "a", 1, "2024-01-01")]})
    pipeline = incremental(warehouse, source_db)
    pipeline.run()
    execute(
        source_db,
        "ALTER TABLE orders ADD COLUMN price REAL;"
        "UPDATE orders SET price = 9.5, updated_at = '2024-01-02' WHERE id = 1;"
        "INSERT INTO orders VALUES (2, 'b', 2, '2024-01-03', 1.25);",
    )
    result = pipeline.run()
    assert result.details["added_columns"] == {"orders": ["price"]}
    assert query(warehouse, "SELECT id, price, typeof(price) FROM orders ORDER BY id") == [
        (1, 9.5, "real"),
        (2, 1.25, "real"),
    ]
    assert ("price", "REAL") in [
        (r[1], r[2]) for r in query(warehouse, "PRAGMA table_info(orders)")
    ]


def test_type_conflict_is_a_clear_error_and_the_run_changes_nothing(
    warehouse: str, source_db: str
) -> None:
    execute(
        source_db,
        ORDERS + "CREATE TABLE zones (code TEXT PRIMARY KEY, name TEXT);",
        {"orders": [(1, "a", 1, "t")], "zones": [("007", "x")]},
    )
    pipeline = ReplicationPipeline(
        warehouse=warehouse, source=source_db, tables=["orders", "zones"]
    )
    pipeline.run()
    execute(
        source_db,
        "INSERT INTO orders VALUES (2, 'b', 2, 't');"
        "DROP TABLE zones; CREATE TABLE zones (code INTEGER PRIMARY KEY, name TEXT);",
    )
    before = dump(warehouse)
    with pytest.raises(SchemaConflictError) as info:
        pipeline.run()
    message = str(info.value)
    assert "'code'" in message and "TEXT" in message and "INTEGER" in message
    assert "zones" in message
    assert dump(warehouse) == before  # orders (replicated first) was rolled back too


def test_tables_are_selected_by_list_glob_and_exclude(warehouse: str, source_db: str) -> None:
    execute(
        source_db,
        "CREATE TABLE crm_people (id INTEGER PRIMARY KEY); CREATE TABLE crm_deals (id INTEGER PRIMARY KEY);"
        "CREATE TABLE crm_tmp (id INTEGER PRIMARY KEY); CREATE TABLE billing (id INTEGER PRIMARY KEY);",
        {"crm_people": [(1,)], "crm_deals": [(1,)], "crm_tmp": [(1,)], "billing": [(1,)]},
    )
    result = ReplicationPipeline(
        warehouse=warehouse,
        source=source_db,
        tables=["crm_*"],
        exclude=["*_tmp"],
        target_prefix="raw_",
    ).run()
    assert result.tables_touched == ["raw_crm_deals", "raw_crm_people"]
    with pytest.raises(PipelineError, match="has no table 'missing'"):
        ReplicationPipeline(
            warehouse=warehouse, source=source_db, tables=["billing", "missing"]
        ).run()


def test_a_listed_name_with_glob_characters_selects_exactly_that_table(
    warehouse: str, source_db: str
) -> None:
    execute(
        source_db,
        'CREATE TABLE "weird[1]" (id INTEGER PRIMARY KEY); CREATE TABLE weird1 (id INTEGER);'
        'CREATE TABLE "a*b" (id INTEGER); CREATE TABLE axb (id INTEGER);',
        {"weird[1]": [(1,), (2,)], "weird1": [(9,)], "a*b": [(3,)], "axb": [(4,)]},
    )
    result = ReplicationPipeline(
        warehouse=warehouse, source=source_db, tables=["weird[1]", "A*B"]
    ).run()
    assert sorted(result.tables_touched) == ["a*b", "weird[1]"]
    assert table_rows(warehouse, "weird[1]") == [(1,), (2,)]
    # a glob that names no table exactly still globs; exclude follows the same rule
    everything = ReplicationPipeline(
        warehouse=warehouse, source=source_db, tables=["weird*", "a?b"], exclude=["weird[1]"]
    ).run()
    assert sorted(everything.tables_touched) == ["a*b", "axb", "weird1"]
    # excluding the exact name spares weird1 even when weird[1] was not selected
    spared = ReplicationPipeline(
        warehouse=warehouse, source=source_db, tables=["weird1"], exclude=["weird[1]"]
    ).run()
    assert spared.tables_touched == ["weird1"]


def test_changing_key_columns_between_runs_rebuilds_the_key(warehouse: str, source_db: str) -> None:
    execute(source_db, "CREATE TABLE ev (id INTEGER, v INTEGER, note TEXT);", {"ev": [(1, 1, "a")]})

    def run(key: list[str]) -> ReplicationPipeline:
        cfg = ReplicationPipeline(warehouse=warehouse, source=source_db, key_columns=key)
        cfg.run()
        return cfg

    run([])  # no key: the table is created without one
    run(["id"])  # rocky adds a unique index on id
    execute(source_db, "INSERT INTO ev VALUES (1, 2, 'b');")  # id alone no longer identifies
    run(["id", "v"])  # was: "index _rocky_key_ev already exists"
    assert table_rows(warehouse, "ev") == [(1, 1, "a"), (1, 2, "b")]
    # a table created with PRIMARY KEY (id) is rebuilt for the new key, indexes kept
    other = str(Path(warehouse).with_name("other.db"))
    execute(source_db, "DELETE FROM ev WHERE v = 2;")
    ReplicationPipeline(warehouse=other, source=source_db, key_columns=["id"]).run()
    execute(other, "CREATE INDEX ev_note ON ev (note);")
    execute(source_db, "INSERT INTO ev VALUES (1, 2, 'b');")
    result = ReplicationPipeline(warehouse=other, source=source_db, key_columns=["id", "v"]).run()
    assert result.tables["ev"].rows_inserted == 1
    assert table_rows(other, "ev") == [(1, 1, "a"), (1, 2, "b")]
    assert query(other, "SELECT name FROM sqlite_master WHERE name = 'ev_note'") == [("ev_note",)]


def test_a_new_key_the_stored_rows_break_fails_incremental_and_rebuilds_full_refresh(
    warehouse: str, source_db: str
) -> None:
    execute(
        source_db,
        "CREATE TABLE ev (id INTEGER, v INTEGER, note TEXT, u INTEGER);",
        {"ev": [(1, 1, "a", 1), (1, 2, "a", 2)]},
    )

    def cfg(key: list[str], strategy: str = "incremental") -> ReplicationPipeline:
        return ReplicationPipeline(
            warehouse=warehouse,
            source=source_db,
            strategy=strategy,  # type: ignore[arg-type]
            cursor_column="u",
            key_columns=key,
        )

    cfg(["id", "v"]).run()
    execute(source_db, "UPDATE ev SET note = 'b', u = 3 WHERE v = 2;")
    before = dump(warehouse)
    with pytest.raises(KeyChangeError) as caught:
        cfg(["note"]).run()  # the stored rows share note 'a'; the source no longer does
    assert (caught.value.pipeline, caught.value.table) == ("replication", "ev")
    assert "drop the table" in str(caught.value)
    assert dump(warehouse) == before
    # a full refresh makes the table equal to the source anyway, so it rebuilds it
    result = cfg(["note"], "full_refresh").run()
    assert table_rows(warehouse, "ev") == [(1, 1, "a", 1), (1, 2, "b", 3)]
    assert result.tables["ev"].rows_deleted == 2 and result.tables["ev"].rows_inserted == 2


def test_a_dropped_target_is_rebuilt_in_full_despite_its_watermark(
    warehouse: str, source_db: str
) -> None:
    rows = [(i, f"item{i}", i, f"2024-01-{i:02d}") for i in range(1, 6)]
    execute(source_db, ORDERS, {"orders": rows})
    pipeline = incremental(warehouse, source_db)
    pipeline.run()
    execute(warehouse, "DROP TABLE orders;")
    execute(source_db, "INSERT INTO orders VALUES (6, 'item6', 6, '2024-01-06');")
    result = pipeline.run()
    assert result.tables["orders"].rows_inserted == 6
    assert table_rows(warehouse, "orders") == [*rows, (6, "item6", 6, "2024-01-06")]
    assert result.details["watermarks"] == {"orders": "2024-01-06"}


def test_incremental_without_cursor_or_key_fails_at_definition(warehouse: str) -> None:
    with pytest.raises(ValidationError, match="cursor_column: required"):
        ReplicationPipeline(
            warehouse=warehouse, source="s.db", strategy="incremental", key_columns=["id"]
        )
    with pytest.raises(ValidationError, match=r"table_options\.orders\.key_columns: required"):
        ReplicationPipeline(
            warehouse=warehouse,
            source="s.db",
            table_options={"orders": {"strategy": "incremental", "cursor_column": "u"}},
        )


def test_duplicate_or_null_keys_are_refused(warehouse: str, source_db: str) -> None:
    execute(
        source_db,
        "CREATE TABLE t (k TEXT, v INTEGER, u INTEGER);",
        {"t": [("a", 1, 1), ("a", 2, 2)]},
    )
    cfg = dict(
        warehouse=warehouse,
        source=source_db,
        strategy="incremental",
        cursor_column="u",
        key_columns=["k"],
    )
    with pytest.raises(PipelineError, match="share key"):
        ReplicationPipeline(**cfg).run()  # type: ignore[arg-type]
    execute(source_db, "DELETE FROM t; INSERT INTO t VALUES (NULL, 1, 1);")
    with pytest.raises(PipelineError, match="NULL in key columns"):
        ReplicationPipeline(**cfg).run()  # type: ignore[arg-type]


def test_missing_source_file_is_an_error_naming_the_field(warehouse: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="source: database file"):
        ReplicationPipeline(warehouse=warehouse, source=str(tmp_path / "absent.db")).run()
    assert not (tmp_path / "absent.db").exists()


def test_result_is_json_able(warehouse: str, source_db: str) -> None:
    execute(source_db, ORDERS, {"orders": [(1, "a", 1, "t")]})
    result = incremental(warehouse, source_db).run()
    assert (
        json.loads(json.dumps(result.model_dump(mode="json")))["tables"]["orders"]["rows_changed"]
        == 1
    )


row = st.tuples(
    st.text(max_size=5),
    st.one_of(
        st.none(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32)
    ),
    st.integers(0, 20),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.dictionaries(st.integers(0, 50), row, max_size=20),
    strategy=st.sampled_from(["full_refresh", "incremental"]),
)
def test_rerun_on_unchanged_source_writes_nothing(
    rows: dict[int, tuple[str, object, int]], strategy: str
) -> None:
    with scratch_dir() as tmp:
        source, warehouse = str(tmp / "s.db"), str(tmp / "w.db")
        execute(
            source,
            "CREATE TABLE t (id INTEGER PRIMARY KEY, label TEXT, value, cursor INTEGER);",
            {"t": [(k, *v) for k, v in rows.items()]},
        )
        pipeline = ReplicationPipeline(
            warehouse=warehouse,
            source=source,
            strategy=strategy,
            cursor_column="cursor",
            key_columns=["id"],
        )
        first = pipeline.run()
        assert first.tables["t"].rows_inserted == len(rows)
        before = dump(warehouse)
        again = pipeline.run()
        assert again.rows_changed == 0
        assert dump(warehouse) == before
        assert table_rows(warehouse, "t") == table_rows(source, "t")
