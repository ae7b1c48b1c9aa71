"""SCD type 2 snapshots of a real warehouse table."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, query, scratch_dir
from pydantic import ValidationError

from rocky_dagster.pipelines import PipelineError, SnapshotPipeline

CUSTOMERS = (
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, tier TEXT, updated_at TEXT);"
)
T1, T2, T3, T4 = (datetime(2024, 1, d, tzinfo=UTC) for d in (10, 11, 12, 13))


def history(warehouse: str, table: str = "snap") -> list[tuple[object, ...]]:
    return query(
        warehouse,
        f"SELECT id, name, valid_from, valid_to, is_current FROM {table} ORDER BY id, valid_from",
    )


def snapshot(warehouse: str, **options: object) -> SnapshotPipeline:
    return SnapshotPipeline(
        warehouse=warehouse,
        source_table="customers",
        target_table="snap",
        unique_key="id",
        **options,
    )


def test_timestamp_strategy_history_across_inserts_updates_and_hard_deletes(warehouse: str) -> None:
    execute(
        warehouse,
        CUSTOMERS,
        {"customers": [(1, "Ann", "gold", "2024-01-01"), (2, "Bob", "std", "2024-01-01")]},
    )
    pipeline = snapshot(warehouse, updated_at="updated_at", invalidate_hard_deletes=True)
    assert pipeline.strategy == "timestamp"
    first = pipeline.run(now=T1).tables["snap"]
    assert (first.rows_inserted, first.rows_updated, first.rows_deleted) == (2, 0, 0)

    execute(
        warehouse,
        "UPDATE customers SET name = 'Ann B', updated_at = '2024-01-05' WHERE id = 1;"
        "UPDATE customers SET tier = 'gold' WHERE id = 2;"  # updated_at unchanged: not a change
        "INSERT INTO customers VALUES (3, 'Cy', 'std', '2024-01-06');",
    )
    second = pipeline.run(now=T2).tables["snap"]
    assert (second.rows_inserted, second.rows_updated, second.rows_deleted) == (2, 1, 0)

    execute(warehouse, "DELETE FROM customers WHERE id = 2;")
    third = pipeline.run(now=T3).tables["snap"]
    assert (third.rows_inserted, third.rows_updated, third.rows_deleted) == (0, 0, 1)

    assert history(warehouse) == [
        (1, "Ann", "2024-01-01", "2024-01-05", 0),
        (1, "Ann B", "2024-01-05", None, 1),
        (2, "Bob", "2024-01-01", T3.isoformat(), 0),
        (3, "Cy", "2024-01-06", None, 1),
    ]
    before = dump(warehouse)
    assert pipeline.run(now=T4).rows_changed == 0
    assert dump(warehouse) == before


def test_check_strategy_versions_are_stamped_with_the_run_time(warehouse: str) -> None:
    execute(warehouse, CUSTOMERS, {"customers": [(1, "Ann", "gold", "x"), (2, "Bob", "std", "x")]})
    pipeline = snapshot(warehouse, check_columns=["name"])
    assert pipeline.strategy == "check"
    pipeline.run(now=T1)
    execute(
        warehouse,
        "UPDATE customers SET tier = 'std' WHERE id = 1; UPDATE customers SET name = 'B2' WHERE id = 2;",
    )
    result = pipeline.run(now=T2).tables["snap"]
    assert (result.rows_inserted, result.rows_updated) == (1, 1)  # tier is not a check column
    assert history(warehouse) == [
        (1, "Ann", T1.isoformat(), None, 1),
        (2, "Bob", T1.isoformat(), T2.isoformat(), 0),
        (2, "B2", T2.isoformat(), None, 1),
    ]


def test_check_all_columns_and_a_deleted_key_coming_back(warehouse: str) -> None:
    execute(warehouse, CUSTOMERS, {"customers": [(1, "Ann", "gold", "x")]})
    pipeline = snapshot(warehouse, check_columns="all", invalidate_hard_deletes=True)
    pipeline.run(now=T1)
    execute(warehouse, "DELETE FROM customers;")
    pipeline.run(now=T2)
    execute(warehouse, "INSERT INTO customers VALUES (1, 'Ann', 'silver', 'y');")
    assert pipeline.run(now=T3).tables["snap"].rows_inserted == 1
    assert history(warehouse) == [
        (1, "Ann", T1.isoformat(), T2.isoformat(), 0),
        (1, "Ann", T3.isoformat(), None, 1),
    ]


def test_without_invalidation_a_deleted_row_stays_current(warehouse: str) -> None:
    execute(warehouse, CUSTOMERS, {"customers": [(1, "Ann", "gold", "x")]})
    pipeline = snapshot(warehouse, check_columns="all")
    pipeline.run(now=T1)
    execute(warehouse, "DELETE FROM customers;")
    assert pipeline.run(now=T2).rows_changed == 0
    assert history(warehouse) == [(1, "Ann", T1.isoformat(), None, 1)]


def test_new_source_column_is_added_and_versions_its_rows(warehouse: str) -> None:
    execute(warehouse, CUSTOMERS, {"customers": [(1, "Ann", "gold", "x")]})
    pipeline = snapshot(warehouse, check_columns="all")
    pipeline.run(now=T1)
    execute(
        warehouse,
        "ALTER TABLE customers ADD COLUMN email TEXT; UPDATE customers SET email = 'a@x';",
    )
    result = pipeline.run(now=T2)
    assert result.details["added_columns"] == ["email"]
    assert query(warehouse, "SELECT email, is_current FROM snap ORDER BY valid_from") == [
        (None, 0),
        ("a@x", 1),
    ]


def test_null_and_duplicate_keys_are_refused_and_nothing_is_written(warehouse: str) -> None:
    execute(
        warehouse,
        "CREATE TABLE customers (id INTEGER, name TEXT, updated_at TEXT);",
        {"customers": [(1, "a", "t"), (1, "b", "t")]},
    )
    pipeline = snapshot(warehouse, updated_at="updated_at")
    before = dump(warehouse)
    with pytest.raises(PipelineError, match="share key"):
        pipeline.run()
    assert dump(warehouse) == before
    execute(warehouse, "DELETE FROM customers; INSERT INTO customers VALUES (NULL, 'a', 't');")
    with pytest.raises(PipelineError, match="NULL"):
        pipeline.run()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "strategy: give updated_at"),
        ({"strategy": "timestamp"}, "updated_at: required"),
        ({"strategy": "check"}, "check_columns: required"),
        ({"updated_at": "u", "check_columns": ["a"]}, "strategy"),
        ({"updated_at": "u", "target_table": "customers"}, "target_table: must differ"),
        ({"updated_at": "u", "target_table": "_rocky_snap"}, "reserved prefix"),
    ],
)
def test_bad_config_fails_at_definition(
    warehouse: str, options: dict[str, object], message: str
) -> None:
    fields = {
        "warehouse": warehouse,
        "source_table": "customers",
        "target_table": "snap",
        "unique_key": ["id"],
    }
    with pytest.raises(ValidationError, match=message):
        SnapshotPipeline.model_validate({**fields, **options})


states = st.lists(
    st.dictionaries(st.integers(0, 6), st.sampled_from(["a", "b", "c"]), max_size=6),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None)
@given(states=states, invalidate=st.booleans())
def test_history_tracks_every_state_and_reruns_write_nothing(
    states: list[dict[int, str]], invalidate: bool
) -> None:
    with scratch_dir() as tmp:
        warehouse = str(tmp / "w.db")
        execute(warehouse, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);")
        pipeline = snapshot(warehouse, check_columns="all", invalidate_hard_deletes=invalidate)
        expected: dict[int, str] = {}
        for step, state in enumerate(states):
            execute(warehouse, "DELETE FROM customers;", {"customers": sorted(state.items())})
            pipeline.run(now=datetime(2024, 1, 1 + step, tzinfo=UTC))
            # without invalidation a vanished key keeps its last version as current
            expected = dict(state) if invalidate else {**expected, **state}
            current = query(warehouse, "SELECT id, name FROM snap WHERE is_current = 1")
            assert sorted(current) == sorted(expected.items())
            assert query(
                warehouse, "SELECT count(*) FROM snap WHERE (valid_to IS NULL) != is_current"
            ) == [(0,)]
            before = dump(warehouse)
            assert pipeline.run(now=datetime(2024, 2, 1 + step, tzinfo=UTC)).rows_changed == 0
            assert dump(warehouse) == before
