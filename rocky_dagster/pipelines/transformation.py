"""Transformation: SQL models from a directory, materialized in dependency order.

A table model is computed into a TEMP staging table first and only written to the warehouse
when its content differs, so a re-run on unchanged input writes nothing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from ..effects import EffectClaim
from .base import PipelineConfig, as_list, check_identifier, failure_context, write_transaction
from .errors import ModelGraphError, PipelineError, ViewValidationError
from .results import PipelineResult, TableStats
from .sql import broken_views, count_rows, object_type, qi, same_rows, table_columns
from .sqlmodels import Materialization, SqlModel, discover

STAGE = "_rocky_stage"


class TransformationPipeline(PipelineConfig):
    """Run the `*.sql` models of a directory; each file is one SELECT named after the file.

    A model's materialization and description come from header lines
    (`-- materialized: view`, `-- description: …`) or a `<name>.yml` sidecar.
    """

    pipeline_type: ClassVar[str] = "transformation"

    models_dir: str = Field(description="Directory searched recursively for *.sql models.")
    select: list[str] = Field(
        default_factory=list,
        description="Model names or globs to run (all if empty); '+name' adds its upstream "
        "models, 'name+' its downstream models.",
    )
    default_materialization: Materialization = "table"

    _lists = field_validator("select", mode="before")(as_list)

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, value: str) -> str:
        if not Path(value).is_dir():
            raise ValueError(f"directory {value!r} does not exist; create it or fix the path")
        return value

    @field_validator("select")
    @classmethod
    def _select_not_blank(cls, value: list[str]) -> list[str]:
        for spec in value:
            if not spec.strip("+").strip():
                raise ValueError(f"entry {spec!r} names no model")
        return value

    def models(self) -> list[SqlModel]:
        """Every model in dependency order (raises on cycles, duplicates, non-SELECT files)."""
        models = discover(self.models_dir, self.default_materialization)
        for model in models:
            check_identifier(model.name, f"model {model.path}: name")
        return models

    def selected_models(self) -> list[SqlModel]:
        """The models `select` picks, in dependency order."""
        models = self.models()
        if not self.select:
            return models
        upstream = {m.name: m.depends_on for m in models}
        downstream: dict[str, list[str]] = {m.name: [] for m in models}
        for m in models:
            for dep in m.depends_on:
                downstream[dep].append(m.name)
        chosen: set[str] = set()
        for spec in self.select:
            pattern = spec.strip("+").lower()
            matched = [m.name for m in models if fnmatchcase(m.name.lower(), pattern)]
            if not matched:
                names = ", ".join(m.name for m in models) or "none"
                raise PipelineError(
                    f"select: {spec!r} matches no model (models: {names})", table=spec
                )
            chosen.update(matched)
            if spec.startswith("+"):
                chosen.update(_closure(matched, upstream))
            if spec.endswith("+"):
                chosen.update(_closure(matched, downstream))
        return [m for m in models if m.name in chosen]

    def run(self, *, claim: EffectClaim | None = None) -> PipelineResult:
        """Materialize the selected models in one transaction; a failure changes nothing."""
        effect = self._effect(claim)
        models = self.models()
        chosen = self.selected_models()
        result = PipelineResult(pipeline_type=self.pipeline_type)
        info: dict[str, Any] = {}
        with self._session() as (conn, _db), write_transaction(conn):
            recorded = effect.begin(conn)
            if recorded is not None:
                return recorded
            _check_references(conn, models, chosen)
            already_broken = set(broken_views(conn))
            for model in chosen:
                started = time.perf_counter()
                stats = result.table(model.name)
                with failure_context(f"model {model.name!r} ({model.path})", table=model.name):
                    action = _materialize(conn, model, stats)
                stats.duration_seconds = round(time.perf_counter() - started, 6)
                info[model.name] = {
                    "materialized": model.materialized,
                    "action": action,
                    "depends_on": list(model.depends_on),
                    "description": model.description,
                }
            _check_views(conn, already_broken, {m.name.lower() for m in chosen})
            result.details = {"models": info, "order": [m.name for m in chosen]}
            effect.commit(conn, result.finish())
        return result


def _closure(start: Iterable[str], edges: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _check_references(
    conn: sqlite3.Connection, models: list[SqlModel], chosen: list[SqlModel]
) -> None:
    """Every table a selected model reads must be a model that runs first, or exist already."""
    model_names = {m.name.lower(): m.name for m in models}
    running = {m.name.lower() for m in chosen}
    problems: list[str] = []
    culprits: list[str] = []
    for model in chosen:
        for ref in model.references:
            if ref in running or object_type(conn, ref) is not None:
                continue
            culprits.append(model.name)
            if ref in model_names:
                problems.append(
                    f"model {model.name!r} depends on model {model_names[ref]!r}, which is not "
                    "selected and not yet in the warehouse"
                )
            else:
                problems.append(f"model {model.name!r} references missing table {ref!r}")
    if problems:
        raise ModelGraphError("; ".join(problems), table=culprits[0])


def _check_views(conn: sqlite3.Connection, already_broken: set[str], models: set[str]) -> None:
    """Fail (rolling back) when a view this run broke, or a view model it ran, no longer
    compiles; a view that was broken before the run and is not a model here is not its doing."""
    broken = {
        name: reason
        for name, reason in broken_views(conn).items()
        if name not in already_broken or name.lower() in models
    }
    if broken:
        names = sorted(broken)
        reasons = "; ".join(f"view {name!r}: {broken[name]}" for name in names)
        raise ViewValidationError(
            f"the run would leave {len(names)} view(s) unreadable, so nothing was changed: "
            f"{reasons}; change the view or the model it reads",
            table=names[0],
        )


def _drop(conn: sqlite3.Connection, name: str, kind: str | None, stats: TableStats) -> None:
    if kind == "table":
        stats.rows_deleted += count_rows(conn, name)
        conn.execute(f"DROP TABLE main.{qi(name)}")
    elif kind == "view":
        conn.execute(f"DROP VIEW main.{qi(name)}")


def _materialize(conn: sqlite3.Connection, model: SqlModel, stats: TableStats) -> str:
    """Create or refresh one model; returns created/replaced/refreshed/unchanged."""
    name = model.name
    kind = object_type(conn, name)
    if model.materialized == "view":
        ddl = f"CREATE VIEW {qi(name)} AS\n{model.sql}"
        current = conn.execute(
            "SELECT sql FROM main.sqlite_master WHERE type = 'view' AND lower(name) = lower(?)",
            (name,),
        ).fetchone()
        if current is not None and current[0] == ddl:
            return "unchanged"
        _drop(conn, name, kind, stats)
        conn.execute(ddl)
        try:  # fail now, not at first read
            conn.execute(f"SELECT * FROM main.{qi(name)} LIMIT 0").fetchall()
        except sqlite3.Error as exc:
            raise ViewValidationError(f"view {name!r} does not compile: {exc}", table=name) from exc
        return "created" if kind is None else "replaced"
    conn.execute(f"CREATE TEMP TABLE {STAGE} AS {model.sql}")
    try:
        staged = table_columns(conn, STAGE, "temp")
        if kind == "table":
            current_cols = table_columns(conn, name)
            if [(c.name, c.type) for c in current_cols] == [(c.name, c.type) for c in staged]:
                target = f"main.{qi(name)}"
                if same_rows(conn, f"temp.{STAGE}", target, [c.name for c in staged]):
                    return "unchanged"
                stats.rows_deleted = conn.execute(f"DELETE FROM {target}").rowcount
                stats.rows_inserted = conn.execute(
                    f"INSERT INTO {target} SELECT * FROM temp.{STAGE}"
                ).rowcount
                return "refreshed"
        _drop(conn, name, kind, stats)
        conn.execute(f"CREATE TABLE main.{qi(name)} AS SELECT * FROM temp.{STAGE}")
        stats.rows_inserted = count_rows(conn, name)
        return "created" if kind is None else "replaced"
    finally:
        conn.execute(f"DROP TABLE temp.{STAGE}")
