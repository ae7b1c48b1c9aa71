"""SQL models from a real directory run against a real warehouse file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, query, scratch_dir, table_rows
from pydantic import ValidationError

from rocky_dagster.pipelines import (
    ModelGraphError,
    PipelineError,
    TransformationPipeline,
    ViewValidationError,
)
from rocky_dagster.pipelines.sqlmodels import referenced_tables

RAW = "CREATE TABLE raw_orders (id INTEGER, customer TEXT, amount REAL);"


def write_models(directory: Path, models: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in models.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    # Names sort against the dependency order: a_report <- m_customers <- z_orders <- raw.
    return write_models(
        tmp_path / "models",
        {
            "z_orders.sql": "-- description: cleaned orders\n"
            "SELECT id, lower(customer) AS customer, amount FROM raw_orders WHERE amount > 0;",
            "m_customers.sql": "SELECT customer, sum(amount) AS total, count(*) AS n\n"
            "FROM z_orders GROUP BY customer",
            "a_report.sql": "-- materialized: view\n"
            "WITH big AS (SELECT * FROM m_customers WHERE total > 10)\n"
            "SELECT c.customer, c.total FROM big c JOIN z_orders o ON o.customer = c.customer\n"
            "GROUP BY c.customer",
        },
    )


def test_models_run_in_dependency_order(warehouse: str, models_dir: Path) -> None:
    execute(warehouse, RAW, {"raw_orders": [(1, "Ann", 5.0), (2, "ann", 7.5), (3, "Bob", -1.0)]})
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models_dir))
    assert [(m.name, m.depends_on) for m in pipeline.models()] == [
        ("z_orders", ()),
        ("m_customers", ("z_orders",)),
        ("a_report", ("m_customers", "z_orders")),
    ]
    result = pipeline.run()
    assert result.details["order"] == ["z_orders", "m_customers", "a_report"]
    assert result.details["models"]["z_orders"]["description"] == "cleaned orders"
    assert query(warehouse, "SELECT type FROM sqlite_master WHERE name = 'a_report'") == [("view",)]
    assert table_rows(warehouse, "a_report") == [("ann", 12.5)]
    assert result.tables["z_orders"].rows_inserted == 2


def test_rerun_writes_nothing_and_a_source_change_refreshes_downstream(
    warehouse: str, models_dir: Path
) -> None:
    execute(warehouse, RAW, {"raw_orders": [(1, "Ann", 5.0)]})
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models_dir))
    pipeline.run()
    before = dump(warehouse)
    again = pipeline.run()
    assert again.rows_changed == 0
    assert {m["action"] for m in again.details["models"].values()} == {"unchanged"}
    assert dump(warehouse) == before
    execute(warehouse, "INSERT INTO raw_orders VALUES (2, 'Cy', 3.0);")
    changed = pipeline.run()
    assert changed.details["models"]["z_orders"]["action"] == "refreshed"
    assert (changed.tables["z_orders"].rows_deleted, changed.tables["z_orders"].rows_inserted) == (
        1,
        2,
    )
    assert changed.details["models"]["a_report"]["action"] == "unchanged"  # a view holds no rows


def test_cycle_is_an_error_naming_the_models(tmp_path: Path, warehouse: str) -> None:
    models = write_models(
        tmp_path / "m",
        {
            "a.sql": "SELECT * FROM b",
            "b.sql": "SELECT * FROM c",
            "c.sql": "SELECT * FROM a",
            "d.sql": "SELECT 1 AS x",
        },
    )
    with pytest.raises(ModelGraphError, match=r"cycle: a -> b -> c -> a"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).run()
    write_models(models, {"c.sql": "SELECT 1 AS x", "d.sql": "SELECT * FROM d"})
    with pytest.raises(ModelGraphError, match=r"cycle: d -> d"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).models()


def test_missing_table_is_an_error_naming_model_and_table_and_nothing_runs(
    tmp_path: Path, warehouse: str
) -> None:
    models = write_models(
        tmp_path / "m",
        {"ok.sql": "SELECT 1 AS x", "bad.sql": "SELECT * FROM ok JOIN nowhere USING (x)"},
    )
    execute(warehouse, "CREATE TABLE keep (x INTEGER);")
    before = dump(warehouse)
    with pytest.raises(ModelGraphError, match="model 'bad' references missing table 'nowhere'"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).run()
    assert dump(warehouse) == before


def test_failing_model_rolls_back_the_models_before_it(tmp_path: Path, warehouse: str) -> None:
    models = write_models(
        tmp_path / "m",
        {"first.sql": "SELECT 1 AS x", "second.sql": "SELECT no_such_column FROM first"},
    )
    execute(warehouse, "CREATE TABLE keep (x INTEGER);")
    before = dump(warehouse)
    with pytest.raises(PipelineError, match=r"model 'second'.*no such column"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).run()
    assert dump(warehouse) == before


def test_select_runs_a_subset_with_optional_upstream_and_downstream(
    warehouse: str, models_dir: Path
) -> None:
    execute(warehouse, RAW, {"raw_orders": [(1, "Ann", 50.0)]})

    def run(*select: str) -> list[str]:
        cfg = TransformationPipeline(
            warehouse=warehouse, models_dir=str(models_dir), select=list(select)
        )
        return cfg.run().details["order"]

    with pytest.raises(
        ModelGraphError, match="'m_customers' depends on model 'z_orders', which is not"
    ):
        run("m_customers")
    assert run("+m_customers") == ["z_orders", "m_customers"]
    assert run("m_*") == ["m_customers"]  # z_orders now exists in the warehouse
    assert run("z_orders+") == ["z_orders", "m_customers", "a_report"]
    with pytest.raises(PipelineError, match="select: 'nope' matches no model"):
        run("nope")


def test_sidecar_sets_materialization_and_must_agree_with_header(
    tmp_path: Path, warehouse: str
) -> None:
    models = write_models(
        tmp_path / "m",
        {"v.sql": "SELECT 1 AS x", "v.yml": "materialized: view\ndescription: from sidecar\n"},
    )
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
    assert [(m.materialized, m.description) for m in pipeline.models()] == [
        ("view", "from sidecar")
    ]
    pipeline.run()
    assert query(warehouse, "SELECT type FROM sqlite_master WHERE name = 'v'") == [("view",)]
    write_models(models, {"v.sql": "-- materialized: table\nSELECT 1 AS x"})
    with pytest.raises(PipelineError, match="header and sidecar disagree"):
        pipeline.models()
    write_models(models, {"v.sql": "SELECT 1 AS x", "v.yml": "materialised: view\n"})
    with pytest.raises(PipelineError, match="materialised"):
        pipeline.models()


def test_switching_a_table_model_to_a_view_replaces_it(tmp_path: Path, warehouse: str) -> None:
    models = write_models(tmp_path / "m", {"t.sql": "SELECT 1 AS x UNION ALL SELECT 2"})
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
    pipeline.run()
    write_models(models, {"t.sql": "-- materialized: view\nSELECT 1 AS x UNION ALL SELECT 2"})
    result = pipeline.run()
    assert result.details["models"]["t"]["action"] == "replaced"
    assert result.tables["t"].rows_deleted == 2
    assert query(warehouse, "SELECT type FROM sqlite_master WHERE name = 't'") == [("view",)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("DELETE FROM x", "found no SELECT"),
        ("SELECT 1; SELECT 2", "found several"),
        ("-- only a comment", "found no SELECT"),
    ],
)
def test_a_model_must_be_exactly_one_select(
    tmp_path: Path, warehouse: str, text: str, message: str
) -> None:
    models = write_models(tmp_path / "m", {"bad.sql": text})
    with pytest.raises(PipelineError, match=message):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).models()


def test_models_dir_must_exist_at_definition(tmp_path: Path, warehouse: str) -> None:
    with pytest.raises(ValidationError, match="models_dir"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(tmp_path / "absent"))


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM a, b AS x, main.c", ["a", "b", "c"]),
        (
            'WITH x AS (SELECT * FROM a) SELECT * FROM x LEFT JOIN "Odd T" USING (id)',
            ["a", "odd t"],
        ),
        ("SELECT 'FROM s' AS t -- FROM comment\nFROM real_t /* FROM c */", ["real_t"]),
        ("SELECT * FROM (SELECT 1 FROM a) s, b WHERE x IN (SELECT id FROM d)", ["a", "b", "d"]),
        ("SELECT * FROM json_each('[1]'), f WHERE a IS DISTINCT FROM b", ["f"]),
        ("SELECT 1 FROM (a JOIN b ON a.id = b.id)", ["a", "b"]),
        ("SELECT * FROM temp.t, g WINDOW w AS (PARTITION BY 1)", ["g"]),
        # a CTE reading the model it is named after: the qualified name is the table
        ("WITH orders AS (SELECT * FROM main.orders) SELECT * FROM orders", ["orders"]),
        ("WITH a AS (SELECT 1 AS x) SELECT * FROM main.a", ["a"]),
        # a CTE defined inside a subquery shadows only there
        ("SELECT * FROM (WITH a AS (SELECT 1 AS x) SELECT * FROM a) s, a", ["a"]),
        (
            "SELECT * FROM t WHERE EXISTS (WITH u AS (SELECT 1) SELECT * FROM u) AND y IN u",
            ["t", "u"],
        ),
        # SQLite's `x IN table`, plain, negated, qualified; a CTE name there is no table
        ("SELECT * FROM t WHERE x IN b AND y NOT IN main.c", ["b", "c", "t"]),
        ("WITH b AS (SELECT 1 AS x) SELECT * FROM t WHERE x IN b", ["t"]),
        ("SELECT * FROM t WHERE x IN (b)", ["t"]),  # a value list holding column b
        ("SELECT * FROM t INDEXED BY t_idx, pragma_table_info('t'), other.z", ["t"]),
        # every CTE of a WITH is visible in each body, as in SQLite (a forward reference)
        ("WITH b AS (SELECT * FROM a), a AS (SELECT 1 AS x FROM t) SELECT * FROM b", ["t"]),
        ("WITH b AS (SELECT * FROM (SELECT * FROM a)), a AS (SELECT 1 AS x) SELECT * FROM b", []),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
            "SELECT * FROM r",
            [],
        ),
    ],
)
def test_referenced_tables(sql: str, expected: list[str]) -> None:
    assert referenced_tables(sql) == expected


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["a", "B", None])), max_size=15))
def test_rerun_on_unchanged_input_writes_nothing(rows: list[tuple[int, str | None]]) -> None:
    with scratch_dir() as tmp:
        warehouse = str(tmp / "w.db")
        execute(warehouse, "CREATE TABLE src (n INTEGER, tag TEXT);", {"src": rows})
        models = write_models(
            tmp / "models",
            {
                "tags.sql": "SELECT upper(tag) AS tag, n FROM src",
                "totals.sql": "SELECT tag, sum(n) AS total FROM tags GROUP BY tag",
                "view_of.sql": "-- materialized: view\nSELECT * FROM totals",
            },
        )
        pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
        first = pipeline.run()
        assert first.tables["tags"].rows_inserted == len(rows)
        before = dump(warehouse)
        assert pipeline.run().rows_changed == 0
        assert dump(warehouse) == before


def test_references_hidden_by_ctes_subqueries_and_in_table_order_the_models(
    tmp_path: Path, warehouse: str
) -> None:
    """Each reader sorts before the model it reads, so only real dependency analysis runs
    them in the right order; a wrong order reads stale rows (or no table at all)."""
    execute(warehouse, RAW, {"raw_orders": [(1, "ann", 5.0), (2, "bob", 7.0)]})
    models = write_models(
        tmp_path / "m",
        {
            "orders.sql": "SELECT id, customer, amount FROM raw_orders",
            "vip_ids.sql": "SELECT id FROM raw_orders WHERE amount > 6",
            "a_cte.sql": "WITH orders AS (SELECT * FROM main.orders WHERE amount > 0)\n"
            "SELECT count(*) AS n FROM orders",
            "a_sub.sql": "SELECT * FROM (WITH orders AS (SELECT 1 AS id) SELECT id FROM orders) s\n"
            "JOIN orders USING (id)",
            "a_in.sql": "SELECT customer FROM raw_orders WHERE id IN vip_ids",
        },
    )
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
    deps = {m.name: m.depends_on for m in pipeline.models()}
    assert deps == {
        "orders": (),
        "vip_ids": (),
        "a_cte": ("orders",),
        "a_sub": ("orders",),
        "a_in": ("vip_ids",),
    }
    order = pipeline.run().details["order"]
    assert order.index("orders") < order.index("a_cte")
    assert order.index("orders") < order.index("a_sub")
    assert order.index("vip_ids") < order.index("a_in")
    execute(warehouse, "INSERT INTO raw_orders VALUES (3, 'cy', 9.0);")
    pipeline.run()
    assert table_rows(warehouse, "a_cte") == [(3,)]
    assert table_rows(warehouse, "a_in") == [("bob",), ("cy",)]


def test_sql_that_cannot_be_parsed_is_an_error_naming_the_model(
    tmp_path: Path, warehouse: str
) -> None:
    models = write_models(tmp_path / "m", {"bad.sql": "SELECT * FROM (a JOIN"})
    with pytest.raises(PipelineError, match=r"model .*bad\.sql.*cannot parse"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).models()


def test_a_view_broken_by_a_model_change_fails_the_run_naming_it_and_rolls_back(
    tmp_path: Path, warehouse: str
) -> None:
    execute(warehouse, RAW, {"raw_orders": [(1, "ann", 5.0)]})
    models = write_models(
        tmp_path / "m",
        {
            "orders.sql": "SELECT id, customer, amount FROM raw_orders",
            "by_customer.sql": "-- materialized: view\nSELECT customer, amount FROM orders",
        },
    )
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))
    pipeline.run()
    # a view the models do not manage, reading the same model
    execute(warehouse, "CREATE VIEW hand_made AS SELECT id, amount FROM orders;")
    before = dump(warehouse)
    write_models(models, {"orders.sql": "SELECT id, customer FROM raw_orders"})  # drops amount
    with pytest.raises(ViewValidationError) as caught:
        pipeline.run()
    error = caught.value
    assert (error.pipeline, error.table) == ("transformation", "by_customer")
    assert "'by_customer'" in str(error) and "'hand_made'" in str(error)
    assert "amount" in str(error)
    assert dump(warehouse) == before
    assert table_rows(warehouse, "by_customer") == [("ann", 5.0)]


def test_a_view_broken_before_the_run_does_not_block_it(tmp_path: Path, warehouse: str) -> None:
    execute(
        warehouse,
        "CREATE TABLE gone (x INTEGER); CREATE VIEW stale AS SELECT x FROM gone; DROP TABLE gone;",
    )
    models = write_models(tmp_path / "m", {"t.sql": "SELECT 1 AS x"})
    result = TransformationPipeline(warehouse=warehouse, models_dir=str(models)).run()
    assert result.details["order"] == ["t"]
    # ...but a view model that is broken is this run's business
    write_models(
        models, {"v.sql": "-- materialized: view\nSELECT x FROM t", "t.sql": "SELECT 2 AS y"}
    )
    with pytest.raises(ViewValidationError, match="view 'v'"):
        TransformationPipeline(warehouse=warehouse, models_dir=str(models)).run()


def test_independent_models_run_in_name_order(tmp_path: Path, warehouse: str) -> None:
    """Ties are broken by name, not by where the files are: `b.sql` is found before
    `later/a.sql`, yet `a` runs first."""
    models = write_models(tmp_path / "m", {"b.sql": "SELECT 2 AS x"})
    write_models(models / "later", {"a.sql": "SELECT 1 AS x"})
    pipeline = TransformationPipeline(warehouse=warehouse, models_dir=str(models))

    assert [m.name for m in pipeline.models()] == ["a", "b"]
    assert pipeline.run().details["order"] == ["a", "b"]
