"""What each pipeline writes and reads, as Dagster asset specs: the map behind `pipeline_assets`.

A warehouse table is one asset, keyed ``[*key_prefix, table]``: the same table has the same key
whichever pipeline writes or reads it, so lineage joins up across pipelines (replication →
transformation → snapshot) and a quality check lands on the table it checks.

| pipeline | assets (tables it writes) | deps |
|---|---|---|
| load | its ``table`` | - |
| replication | each selected source table's target (``target_prefix`` + name) | the source table, keyed ``[<source file stem>, table]`` |
| transformation | each model | every table its SQL reads (parsed, not guessed) |
| snapshot | ``target_table`` | ``source_table`` |
| quality | - (an `AssetCheckSpec` per check, on the table it checks) | - |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import AssetCheckSpec, AssetKey, AssetSpec

from rocky_dagster.pipelines import (
    LoadPipeline,
    PipelineConfig,
    QualityPipeline,
    ReplicationPipeline,
    SnapshotPipeline,
    TransformationPipeline,
)


@dataclass(frozen=True)
class TableAsset:
    """One warehouse table a pipeline writes, as an asset."""

    table: str
    key: AssetKey
    deps: tuple[AssetKey, ...] = ()
    description: str | None = None
    source: str | None = None
    """Replication: the source table it copies (what a subset run selects)."""


@dataclass(frozen=True)
class TableCheck:
    """One quality check, as an asset check on the table it checks."""

    name: str
    table: str
    asset: AssetKey
    blocking: bool
    description: str


@dataclass
class PipelinePlan:
    """A pipeline's assets, checks, and the tables it reads that it does not write."""

    pipeline: PipelineConfig
    assets: list[TableAsset] = field(default_factory=list)
    checks: list[TableCheck] = field(default_factory=list)
    reads: dict[AssetKey, str] = field(default_factory=dict)

    def asset_specs(
        self, *, group_name: str | None = None, automation_condition: Any = None
    ) -> list[AssetSpec]:
        kind = self.pipeline.pipeline_type
        return [
            AssetSpec(
                key=asset.key,
                deps=list(asset.deps),
                description=asset.description,
                group_name=group_name,
                automation_condition=automation_condition,
                skippable=True,  # a step whose key is done materializes nothing
                kinds={"sqlite"},
                metadata={"rocky/table": asset.table, "rocky/pipeline": kind},
            )
            for asset in self.assets
        ]

    def check_specs(self) -> list[AssetCheckSpec]:
        return [
            AssetCheckSpec(
                name=check.name,
                asset=check.asset,
                blocking=check.blocking,
                description=check.description,
            )
            for check in self.checks
        ]


def table_key(table: str, key_prefix: Sequence[str] = ()) -> AssetKey:
    """The asset key of a warehouse table."""
    return AssetKey([*key_prefix, table])


def plan_pipeline(pipeline: PipelineConfig, *, key_prefix: Sequence[str] = ()) -> PipelinePlan:
    """The assets, checks and external reads of one pipeline (see the module's table)."""
    plan = PipelinePlan(pipeline)
    prefix = tuple(key_prefix)
    if isinstance(pipeline, LoadPipeline):
        plan.assets.append(
            TableAsset(
                pipeline.table,
                table_key(pipeline.table, prefix),
                description=f"Rows of {pipeline.pattern} files in {pipeline.directory}",
            )
        )
    elif isinstance(pipeline, ReplicationPipeline):
        stem = Path(pipeline.source).stem
        for source in pipeline.selected_tables():
            target = pipeline.plan(source).target
            source_key = AssetKey([stem, source])
            plan.reads[source_key] = source
            plan.assets.append(
                TableAsset(
                    target,
                    table_key(target, prefix),
                    deps=(source_key,),
                    description=f"Copy of {source} from {pipeline.source}",
                    source=source,
                )
            )
    elif isinstance(pipeline, TransformationPipeline):
        models = pipeline.selected_models()
        names = {m.name for m in models}
        for model in models:
            deps = tuple(table_key(ref, prefix) for ref in _unique(model.references))
            plan.assets.append(
                TableAsset(
                    model.name,
                    table_key(model.name, prefix),
                    deps=deps,
                    description=model.description or f"{model.materialized} from {model.path}",
                )
            )
            for ref in model.references:
                if ref not in names:
                    plan.reads[table_key(ref, prefix)] = ref
    elif isinstance(pipeline, SnapshotPipeline):
        source_key = table_key(pipeline.source_table, prefix)
        plan.reads[source_key] = pipeline.source_table
        plan.assets.append(
            TableAsset(
                pipeline.target_table,
                table_key(pipeline.target_table, prefix),
                deps=(source_key,),
                description=f"SCD-2 history of {pipeline.source_table}",
            )
        )
    elif isinstance(pipeline, QualityPipeline):
        for check in pipeline.checks:
            if not check.target:
                continue  # an expression check over several tables has no one asset
            plan.checks.append(
                TableCheck(
                    name=check.name,
                    table=check.target,
                    asset=table_key(check.target, prefix),
                    blocking=check.severity == "error",
                    description=check.description or check.rule(),
                )
            )
            plan.reads[table_key(check.target, prefix)] = check.target
    else:
        raise TypeError(f"not a rocky_dagster pipeline config: {type(pipeline).__name__}")
    return plan


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
