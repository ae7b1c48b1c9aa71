"""The five pipeline types behind the Dagster ops, on an embedded SQLite warehouse, and their
Dagster builders.

``import rocky_dagster.pipelines`` imports no Dagster: configs are pydantic models, `run()`
returns a JSON-able PipelineResult, and `fingerprint()` identifies a config for the idempotency
ledger. The Dagster builders (`pipeline_op`, `pipeline_assets`, `quality_checks`) are imported
on first use (PEP 562), so only a program that uses them pays for Dagster.

Examples:
    .. code-block:: python

        from rocky_dagster.pipelines import LoadPipeline, pipeline_op

        load = pipeline_op(LoadPipeline(warehouse="warehouse.db", directory="drops", table="t"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rocky_dagster.effects import EFFECTS, EffectClaim, EffectScope, exactly_once, read_marker
from rocky_dagster.pipelines.base import PipelineConfig, connect_warehouse
from rocky_dagster.pipelines.errors import (
    ClaimRefusedError,
    FenceLostError,
    KeyChangeError,
    LoadError,
    ModelGraphError,
    PipelineConfigError,
    PipelineError,
    QualityChecksFailed,
    SchemaConflictError,
    ViewValidationError,
    WarehouseError,
)
from rocky_dagster.pipelines.load import LoadPipeline
from rocky_dagster.pipelines.quality import (
    AcceptedValuesCheck,
    ExpressionCheck,
    FreshnessCheck,
    NotNullCheck,
    QualityCheck,
    QualityPipeline,
    RowCountCheck,
    UniqueCheck,
)
from rocky_dagster.pipelines.registry import PIPELINE_TYPES, pipeline_from_dict, pipeline_from_yaml
from rocky_dagster.pipelines.replication import ReplicationPipeline, ReplicationTableOptions
from rocky_dagster.pipelines.results import CheckResult, FileRecord, PipelineResult, TableStats
from rocky_dagster.pipelines.snapshot import SnapshotPipeline, SnapshotStrategy
from rocky_dagster.pipelines.sqlmodels import SqlModel
from rocky_dagster.pipelines.transformation import TransformationPipeline

_DAGSTER_BUILDERS: dict[str, str] = {
    "pipeline_op": "rocky_dagster.decorators.pipeline_ops",
    "quality_checks": "rocky_dagster.decorators.pipeline_ops",
    "pipeline_assets": "rocky_dagster.decorators.pipeline_assets",
}
"""The Dagster-side builders of these pipelines and their modules (imported on first use)."""

__all__ = [
    "EFFECTS",
    "PIPELINE_TYPES",
    "AcceptedValuesCheck",
    "CheckResult",
    "ClaimRefusedError",
    "EffectClaim",
    "EffectScope",
    "ExpressionCheck",
    "FenceLostError",
    "FileRecord",
    "FreshnessCheck",
    "KeyChangeError",
    "LoadError",
    "LoadPipeline",
    "ModelGraphError",
    "NotNullCheck",
    "PipelineConfig",
    "PipelineConfigError",
    "PipelineError",
    "PipelineResult",
    "QualityCheck",
    "QualityChecksFailed",
    "QualityPipeline",
    "ReplicationPipeline",
    "ReplicationTableOptions",
    "RowCountCheck",
    "SchemaConflictError",
    "SnapshotPipeline",
    "SnapshotStrategy",
    "SqlModel",
    "TableStats",
    "TransformationPipeline",
    "UniqueCheck",
    "ViewValidationError",
    "WarehouseError",
    "connect_warehouse",
    "exactly_once",
    "pipeline_assets",
    "pipeline_from_dict",
    "pipeline_from_yaml",
    "pipeline_op",
    "quality_checks",
    "read_marker",
]


def __getattr__(name: str) -> Any:
    module = _DAGSTER_BUILDERS.get(name)
    if module is None:
        raise AttributeError(f"module 'rocky_dagster.pipelines' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from rocky_dagster.decorators.pipeline_assets import pipeline_assets as pipeline_assets
    from rocky_dagster.decorators.pipeline_ops import pipeline_op as pipeline_op
    from rocky_dagster.decorators.pipeline_ops import quality_checks as quality_checks
