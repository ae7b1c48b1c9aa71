"""Quality checks against a real warehouse file: every kind, passing and failing, both severities."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, scratch_dir
from pydantic import ValidationError

from rocky_dagster.pipelines import PipelineResult, QualityChecksFailed, QualityPipeline

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def ago(hours: float) -> str:
    return (NOW - timedelta(hours=hours)).isoformat()


@pytest.fixture
def orders(warehouse: str) -> str:
    execute(
        warehouse,
        "CREATE TABLE orders (id INTEGER, status TEXT, amount REAL, created_at TEXT);",
        {
            "orders": [
                (1, "new", 10.0, ago(1)),
                (2, "done", None, ago(2)),
                (3, "done", 5.0, ago(3)),
                (3, "weird", 1.0, ago(4)),
            ]
        },
    )
    return warehouse


# kind -> (passing check, failing check, failing_rows of the failing one)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "not_null": ({"column": "status"}, {"column": "amount"}, 1),
    "unique": ({"columns": ["id", "status"]}, {"column": "id"}, 2),
    "accepted_values": (
        {"column": "status", "values": ["new", "done", "weird"]},
        {"column": "status", "values": ["new", "done"]},
        1,
    ),
    "row_count": ({"min": 1, "max": 4}, {"min": 5}, 0),
    "freshness": (
        {"column": "created_at", "max_age": "2h"},
        {"column": "created_at", "max_age": "30m"},
        0,
    ),
    "expression": (
        {"name": "no_refunds", "sql": "SELECT * FROM orders WHERE amount < 0"},
        {"name": "no_refunds", "sql": "SELECT id, amount FROM orders WHERE amount < 6"},
        2,
    ),
}


def pipeline(warehouse: str, *checks: dict[str, Any]) -> QualityPipeline:
    return QualityPipeline(warehouse=warehouse, checks=[{"table": "orders", **c} for c in checks])


@pytest.mark.parametrize("severity", ["error", "warn"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_passes_on_good_data(orders: str, kind: str, severity: str) -> None:
    good, _, _ = CASES[kind]
    result = pipeline(orders, {"kind": kind, "severity": severity, **good}).run(now=NOW)
    [check] = result.checks
    assert (check.kind, check.passed, check.failing_rows, check.error) == (kind, True, 0, None)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_failing_with_error_severity_fails_the_run(orders: str, kind: str) -> None:
    _, bad, failing = CASES[kind]
    with pytest.raises(QualityChecksFailed) as info:
        pipeline(orders, {"kind": kind, **bad}).run(now=NOW)
    [check] = info.value.result.checks
    assert (check.passed, check.severity, check.failing_rows) == (False, "error", failing)
    assert check.name in str(info.value)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_failing_with_warn_severity_is_reported_not_raised(
    orders: str, kind: str
) -> None:
    _, bad, failing = CASES[kind]
    result = pipeline(orders, {"kind": kind, "severity": "warn", **bad}).run(now=NOW)
    [check] = result.checks
    assert (check.passed, check.severity, check.failing_rows) == (False, "warn", failing)
    assert result.summary()["checks"]["failed_warn"] == 1


def test_failure_details_name_what_failed(orders: str) -> None:
    result = pipeline(
        orders,
        {"kind": "unique", "column": "id", "severity": "warn"},
        {"kind": "row_count", "min": 5, "severity": "warn"},
        {"kind": "freshness", "column": "created_at", "max_age": 1800, "severity": "warn"},
        {
            "kind": "accepted_values",
            "column": "status",
            "values": ["new", "done"],
            "severity": "warn",
        },
    ).run(now=NOW)
    unique, count, fresh, accepted = result.checks
    assert unique.sample_rows == [{"id": 3, "duplicate_count": 2}]
    assert count.details["row_count"] == 4
    assert fresh.details["age_seconds"] == pytest.approx(3600, abs=1)
    assert fresh.details["max_age_seconds"] == 1800
    assert accepted.sample_rows[0]["status"] == "weird"


def test_every_check_is_reported_even_after_an_error_failure(orders: str) -> None:
    with pytest.raises(QualityChecksFailed) as info:
        pipeline(
            orders,
            {"kind": "not_null", "column": "amount"},
            {"kind": "row_count", "max": 100},
            {"kind": "unique", "column": "id", "severity": "warn"},
            {"kind": "not_null", "column": "id"},
        ).run(now=NOW)
    result: PipelineResult = info.value.result
    assert [(c.name, c.passed) for c in result.checks] == [
        ("not_null_amount", False),
        ("row_count", True),
        ("unique_id", False),
        ("not_null_id", True),
    ]
    assert result.summary()["checks"] == {
        "total": 4,
        "passed": 2,
        "failed_error": 1,
        "failed_warn": 1,
        "failed_names": ["not_null_amount", "unique_id"],
    }
    assert result.finished_at is not None


def test_samples_are_capped_at_five_rows(warehouse: str) -> None:
    execute(warehouse, "CREATE TABLE t (v TEXT);", {"t": [(None,)] * 8})
    result = QualityPipeline(
        warehouse=warehouse,
        checks=[{"kind": "not_null", "table": "t", "column": "v", "severity": "warn"}],
    ).run()
    assert (result.checks[0].failing_rows, len(result.checks[0].sample_rows)) == (8, 5)


def test_where_filter_limits_the_checked_rows(orders: str) -> None:
    result = pipeline(orders, {"kind": "unique", "column": "id", "where": "status != 'weird'"}).run(
        now=NOW
    )
    assert result.checks[0].passed


def test_freshness_accepts_unix_seconds_and_fails_without_timestamps(warehouse: str) -> None:
    execute(
        warehouse,
        "CREATE TABLE e (ts INTEGER, empty TEXT);",
        {"e": [(int(NOW.timestamp()) - 60, None)]},
    )
    result = QualityPipeline(
        warehouse=warehouse,
        checks=[
            {"kind": "freshness", "table": "e", "column": "ts", "max_age": "2m"},
            {
                "kind": "freshness",
                "table": "e",
                "column": "empty",
                "max_age": "1d",
                "severity": "warn",
            },
        ],
    ).run(now=NOW)
    assert result.checks[0].passed
    assert result.checks[0].details["age_seconds"] == pytest.approx(60, abs=1)
    assert not result.checks[1].passed and result.checks[1].details["latest"] is None


@pytest.mark.parametrize(
    ("stored", "latest"),
    [
        ("2024-03-01T12:00:00.123456", datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-03-01 12:00:00.1", datetime(2024, 3, 1, 12, 0, 0, 100000, tzinfo=UTC)),
        ("2024-03-01T13:00:00.7+01:00", datetime(2024, 3, 1, 12, 0, 0, 700000, tzinfo=UTC)),
        ("2024-03-01 12:00", datetime(2024, 3, 1, 12, 0, tzinfo=UTC)),
        (1709294400, datetime(2024, 3, 1, 12, 0, tzinfo=UTC)),
        (1709294400.25, datetime(2024, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize("max_age", ["1h", "3d", "17s", 0.001])
def test_freshness_exactly_max_age_old_passes_and_a_microsecond_more_fails(
    warehouse: str, stored: object, latest: datetime, max_age: object
) -> None:
    execute(warehouse, "CREATE TABLE e (ts);", {"e": [(stored,), ("2024-01-01",)]})
    cfg = QualityPipeline(
        warehouse=warehouse,
        checks=[{"kind": "freshness", "table": "e", "column": "ts", "max_age": max_age}],
    )
    limit = cfg.checks[0].max_age  # type: ignore[union-attr]
    check = cfg.run(now=latest + limit).checks[0]
    assert check.passed, check.details
    assert check.details["latest"] == latest.isoformat()
    with pytest.raises(QualityChecksFailed):
        cfg.run(now=latest + limit + timedelta(microseconds=1))


def test_a_date_out_of_range_is_a_failed_check_and_every_other_check_still_reports(
    warehouse: str,
) -> None:
    # SQLite reads the text '5' as Julian day 5 (4713 BC) and '9999999' as year 22666
    execute(
        warehouse,
        "CREATE TABLE e (old TEXT, future TEXT, id INTEGER);",
        {"e": [("5", "9999999", 1)]},
    )
    checks = [
        {"kind": "freshness", "table": "e", "column": "old", "max_age": "1d"},
        {
            "kind": "freshness",
            "table": "e",
            "column": "future",
            "max_age": "1d",
            "severity": "warn",
        },
        {"kind": "not_null", "table": "e", "column": "id"},
    ]
    before = dump(warehouse)
    with pytest.raises(QualityChecksFailed) as caught:
        QualityPipeline(warehouse=warehouse, checks=checks).run(now=NOW)
    result = caught.value.result
    assert [(c.name, c.passed) for c in result.checks] == [
        ("freshness_old", False),
        ("freshness_future", False),
        ("not_null_id", True),
    ]
    assert "outside years 1-9999" in (result.checks[0].error or "")
    assert "'5'" in (result.checks[0].error or "")
    assert caught.value.pipeline == "quality" and caught.value.table == "e"
    assert dump(warehouse) == before


def test_a_broken_check_fails_at_its_severity_with_the_sql_error(orders: str) -> None:
    result = pipeline(orders, {"kind": "not_null", "column": "nope", "severity": "warn"}).run(
        now=NOW
    )
    check = result.checks[0]
    assert not check.passed and "no such column: nope" in (check.error or "")


def test_expression_must_be_one_select_and_checks_leave_the_warehouse_alone(orders: str) -> None:
    before = dump(orders)
    for sql in ("DELETE FROM orders RETURNING *", "SELECT 1; DELETE FROM orders"):
        with pytest.raises(ValidationError, match="must be one SELECT statement"):
            pipeline(orders, {"kind": "expression", "name": "sneaky", "sql": sql})
    sneaky_where = {"kind": "not_null", "column": "id", "where": "1); DELETE FROM orders; --"}
    with pytest.raises(QualityChecksFailed) as info:
        pipeline(orders, sneaky_where).run()
    assert info.value.result.checks[0].error
    assert dump(orders) == before


def test_expression_sql_may_end_with_a_semicolon_and_a_comment(orders: str) -> None:
    sql = "SELECT * FROM orders WHERE amount > 6; -- big orders"
    result = pipeline(
        orders, {"kind": "expression", "name": "big", "sql": sql, "severity": "warn"}
    ).run()
    assert (result.checks[0].failing_rows, result.checks[0].error) == (1, None)


def test_check_metadata_is_json_able(orders: str) -> None:
    result = pipeline(orders, {"kind": "unique", "column": "id", "severity": "warn"}).run(now=NOW)
    meta = result.checks[0].metadata()
    assert json.loads(json.dumps(meta))["failing_rows"] == 2
    assert meta["severity"] == "warn" and meta["table"] == "orders"


@pytest.mark.parametrize(
    ("check", "field"),
    [
        ({"kind": "teleport", "table": "t"}, "kind"),
        ({"kind": "expression", "sql": "SELECT 1"}, "name"),
        ({"kind": "row_count", "table": "t"}, "min/max"),
        ({"kind": "row_count", "table": "t", "min": 5, "max": 1}, "min"),
        ({"kind": "not_null", "table": "t", "column": "c", "name": "has space"}, "name"),
        ({"kind": "freshness", "table": "t", "column": "c", "max_age": "-1h"}, "max_age"),
        ({"kind": "not_null", "table": "t", "column": "c", "severity": "fatal"}, "severity"),
        ({"kind": "not_null", "table": "t", "column": "c", "values": [1]}, "values"),
    ],
)
def test_bad_check_config_fails_at_definition_naming_the_field(
    warehouse: str, check: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        QualityPipeline(warehouse=warehouse, checks=[check])
    assert field in str(info.value)


def test_duplicate_check_names_on_one_table_are_rejected(warehouse: str) -> None:
    check = {"kind": "not_null", "table": "t", "column": "c"}
    with pytest.raises(ValidationError, match="are named 'not_null_c'"):
        QualityPipeline(warehouse=warehouse, checks=[check, {**check, "severity": "warn"}])


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.sampled_from(["a", "b", "z", None])),
        max_size=12,
    )
)
def test_running_checks_never_writes(values: list[tuple[int | None, str | None]]) -> None:
    with scratch_dir() as tmp:
        warehouse = str(tmp / "w.db")
        execute(warehouse, "CREATE TABLE t (k INTEGER, v TEXT);", {"t": values})
        before = dump(warehouse)
        result = QualityPipeline(
            warehouse=warehouse,
            checks=[
                {"kind": "not_null", "table": "t", "column": "k", "severity": "warn"},
                {"kind": "unique", "table": "t", "column": "k", "severity": "warn"},
                {
                    "kind": "accepted_values",
                    "table": "t",
                    "column": "v",
                    "values": ["a", "b"],
                    "severity": "warn",
                },
                {"kind": "row_count", "table": "t", "max": 5, "severity": "warn"},
            ],
        ).run()
        assert result.rows_changed == 0
        assert dump(warehouse) == before
        nulls = sum(k is None for k, _ in values)
        assert result.checks[0].failing_rows == nulls
        assert result.checks[2].failing_rows == sum(v == "z" for _, v in values)
        assert result.checks[3].passed == (len(values) <= 5)
