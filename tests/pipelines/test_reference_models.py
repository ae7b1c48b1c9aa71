"""Replication, snapshot and quality against small reference models in plain Python.

Each model states the semantics users bring from dbt (incremental models, snapshots, generic
tests) as a few lines of Python; hypothesis drives random sequences of source changes and
runs through the real pipeline on real SQLite files and through the model, and the warehouse
must match the model after every run, row for row and count for count.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_helpers import dump, execute, query, scratch_dir

from rocky_dagster.pipelines import (
    QualityChecksFailed,
    QualityPipeline,
    ReplicationPipeline,
    SnapshotPipeline,
)

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
values = st.one_of(st.none(), st.integers(-3, 3), st.sampled_from(["", "a", "B", "1"]))

# ---------------------------------------------------------------------------------------------
# Replication: full refresh = the target equals the source; incremental = dbt's merge on the
# key of the rows whose cursor is >= the last watermark (deletes never propagate).


@dataclass
class ReplicationModel:
    incremental: bool
    target: dict[int, tuple[Any, int]] = field(default_factory=dict)
    watermark: int | None = None

    def run(self, source: dict[int, tuple[Any, int]]) -> tuple[int, int, int]:
        """Apply one run; returns (inserted, updated, deleted)."""
        if self.incremental:
            batch = {
                k: row
                for k, row in source.items()
                if self.watermark is None or row[1] >= self.watermark
            }
            if batch:
                self.watermark = max(row[1] for row in batch.values())
            deleted = 0
        else:
            batch = source
            deleted = len(set(self.target) - set(source))
            self.target = {k: v for k, v in self.target.items() if k in source}
        inserted = sum(k not in self.target for k in batch)
        updated = sum(
            k in self.target and not _same(self.target[k], row) for k, row in batch.items()
        )
        self.target.update(batch)
        return inserted, updated, deleted


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """SQLite's IS: equal storage class and value (our values never mix 1 and 1.0)."""
    return all(type(x) is type(y) and x == y for x, y in zip(a, b, strict=True))


replication_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 6), values, st.integers(0, 3)),
        st.tuples(st.just("delete"), st.integers(0, 6)),
        st.tuples(st.just("run")),
    ),
    max_size=14,
)


@SETTINGS
@given(ops=replication_ops, incremental=st.booleans())
def test_replication_matches_the_reference_model(
    ops: list[tuple[Any, ...]], incremental: bool
) -> None:
    with scratch_dir() as tmp:
        source, warehouse = str(tmp / "s.db"), str(tmp / "w.db")
        execute(source, "CREATE TABLE t (id INTEGER PRIMARY KEY, val, cur INTEGER);")
        pipeline = ReplicationPipeline(
            warehouse=warehouse,
            source=source,
            strategy="incremental" if incremental else "full_refresh",
            cursor_column="cur",
            key_columns=["id"],
        )
        model = ReplicationModel(incremental)
        state: dict[int, tuple[Any, int]] = {}
        for op in [*ops, ("run",)]:
            if op[0] == "put":
                state[op[1]] = (op[2], op[3])
                put(source, op[1], op[2], op[3])
            elif op[0] == "delete":
                state.pop(op[1], None)
                execute(source, f"DELETE FROM t WHERE id = {op[1]};")
            else:
                stats = pipeline.run().tables["t"]
                expected = model.run(state)
                got = (stats.rows_inserted, stats.rows_updated, stats.rows_deleted)
                assert got == expected
                rows = query(warehouse, "SELECT id, val, cur FROM t")
                assert {r[0]: (r[1], r[2]) for r in rows} == model.target
                assert len(rows) == len(model.target)
                assert stats.rows_changed == sum(expected)


def put(path: str, key: int, value: Any, cursor: int) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?, ?)", (key, value, cursor))
        conn.commit()


# ---------------------------------------------------------------------------------------------
# Snapshot: dbt snapshots (SCD type 2). A changed row closes its current version and opens a
# new one; timestamp strategy: changed = updated_at moved forward, versions valid from it;
# check strategy: changed = a checked column differs, versions valid from the run's time.


@dataclass
class Version:
    key: int
    val: Any
    ts: str
    valid_from: Any
    valid_to: Any = None

    @property
    def current(self) -> bool:
        return self.valid_to is None

    def row(self) -> tuple[Any, ...]:
        return (self.key, self.val, self.ts, self.valid_from, self.valid_to, int(self.current))


@dataclass
class SnapshotModel:
    timestamp: bool
    invalidate: bool
    history: list[Version] = field(default_factory=list)

    def run(self, source: dict[int, tuple[Any, str]], now: str) -> tuple[int, int, int]:
        current = {v.key: v for v in self.history if v.current}
        inserted = updated = deleted = 0
        for key, (val, ts) in source.items():
            old = current.get(key)
            if old is not None:
                changed = ts > old.ts if self.timestamp else not _same((val,), (old.val,))
                if not changed:
                    continue
                old.valid_to = ts if self.timestamp else now
                updated += 1
            self.history.append(Version(key, val, ts, ts if self.timestamp else now))
            inserted += 1
        if self.invalidate:
            for key, old in current.items():
                if key not in source and old.current:
                    old.valid_to = now
                    deleted += 1
        return inserted, updated, deleted


days = st.integers(1, 7).map(lambda d: f"2024-01-{d:02d}")  # ISO text, as timestamps are
snapshot_states = st.lists(
    st.dictionaries(st.integers(0, 5), st.tuples(values, days), max_size=6),
    min_size=1,
    max_size=5,
)


@SETTINGS
@given(states=snapshot_states, timestamp=st.booleans(), invalidate=st.booleans())
def test_snapshot_matches_the_reference_model(
    states: list[dict[int, tuple[Any, str]]], timestamp: bool, invalidate: bool
) -> None:
    with scratch_dir() as tmp:
        warehouse = str(tmp / "w.db")
        execute(warehouse, "CREATE TABLE src (id INTEGER PRIMARY KEY, val, ts TEXT);")
        options: dict[str, Any] = {"updated_at": "ts"} if timestamp else {"check_columns": ["val"]}
        pipeline = SnapshotPipeline(
            warehouse=warehouse,
            source_table="src",
            target_table="snap",
            unique_key="id",
            invalidate_hard_deletes=invalidate,
            **options,
        )
        model = SnapshotModel(timestamp, invalidate)
        for step, state in enumerate(states):
            rows = sorted((k, v, ts) for k, (v, ts) in state.items())
            execute(warehouse, "DELETE FROM src;", {"src": rows})
            moment = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=step)
            stats = pipeline.run(now=moment).tables["snap"]
            expected = model.run(state, moment.isoformat())
            assert (stats.rows_inserted, stats.rows_updated, stats.rows_deleted) == expected
            got = query(warehouse, "SELECT id, val, ts, valid_from, valid_to, is_current FROM snap")
            assert sorted(got, key=repr) == sorted((v.row() for v in model.history), key=repr)


# ---------------------------------------------------------------------------------------------
# Quality: dbt's generic tests. not_null fails on NULLs; unique on repeated non-NULL values
# (every row of a repeated value counts); accepted_values on non-NULL values outside the list;
# row_count on the number of rows; freshness on the age of the newest timestamp.

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
table_rows = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(0, 4)),
        st.one_of(st.none(), st.sampled_from(["x", "y", "z"])),
        st.one_of(st.none(), st.integers(-10_000, 0).map(lambda s: NOW + timedelta(seconds=s))),
    ),
    max_size=12,
)


def reference_checks(rows: list[tuple[Any, ...]], low: int, high: int, age: int) -> list[Any]:
    """(passed, failing_rows) per check, in the order `quality_checks` lists them."""
    ids = [r[0] for r in rows if r[0] is not None]
    repeated = sum(ids.count(i) for i in set(ids) if ids.count(i) > 1)
    outside = sum(r[1] is not None and r[1] not in ("x", "y") for r in rows)
    nulls = sum(r[0] is None for r in rows)
    stamps = [r[2] for r in rows if r[2] is not None]
    fresh = bool(stamps) and NOW - max(stamps) <= timedelta(seconds=age)
    return [
        (nulls == 0, nulls),
        (repeated == 0, repeated),
        (outside == 0, outside),
        (low <= len(rows) <= high, 0),
        (fresh, 0),
    ]


def quality_checks(low: int, high: int, age: int) -> list[dict[str, Any]]:
    return [
        {"kind": "not_null", "table": "t", "column": "id"},
        {"kind": "unique", "table": "t", "column": "id"},
        {"kind": "accepted_values", "table": "t", "column": "tag", "values": ["x", "y"]},
        {"kind": "row_count", "table": "t", "min": low, "max": high},
        {"kind": "freshness", "table": "t", "column": "ts", "max_age": age},
    ]


@SETTINGS
@given(
    rows=table_rows,
    low=st.integers(0, 6),
    span=st.integers(0, 6),
    age=st.integers(1, 10_000),
    iso=st.booleans(),
)
def test_quality_matches_the_reference_model(
    rows: list[tuple[Any, ...]], low: int, span: int, age: int, iso: bool
) -> None:
    with scratch_dir() as tmp:
        warehouse = str(tmp / "w.db")
        stored = [
            (i, tag, None if ts is None else ts.isoformat() if iso else int(ts.timestamp()))
            for i, tag, ts in rows
        ]
        execute(warehouse, "CREATE TABLE t (id INTEGER, tag TEXT, ts);", {"t": stored})
        pipeline = QualityPipeline(warehouse=warehouse, checks=quality_checks(low, low + span, age))
        expected = reference_checks(rows, low, low + span, age)
        before = dump(warehouse)
        try:
            result = pipeline.run(now=NOW)
            raised = False
        except QualityChecksFailed as exc:
            result, raised = exc.result, True
        got = [(c.passed, c.failing_rows) for c in result.checks]
        assert got == expected
        assert raised == (not all(passed for passed, _ in expected))
        assert all(c.error is None for c in result.checks)
        assert dump(warehouse) == before
