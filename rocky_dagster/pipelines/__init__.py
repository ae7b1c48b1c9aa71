"""The five pipeline types behind the Dagster ops, on an embedded SQLite warehouse.

No Dagster import here: configs are pydantic models, `run()` returns a JSON-able
PipelineResult, and `fingerprint()` identifies a config for the idempotency ledger.
"""

from .base import PipelineConfig, connect_warehouse
from .effects import EFFECTS, EffectClaim, EffectScope, exactly_once, read_marker
from .errors import (
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
from .load import LoadPipeline
from .quality import (
    AcceptedValuesCheck,
    ExpressionCheck,
    FreshnessCheck,
    NotNullCheck,
    QualityCheck,
    QualityPipeline,
    RowCountCheck,
    UniqueCheck,
)
from .registry import PIPELINE_TYPES, pipeline_from_dict, pipeline_from_yaml
from .replication import ReplicationPipeline, ReplicationTableOptions
from .results import CheckResult, FileRecord, PipelineResult, TableStats
from .snapshot import SnapshotPipeline, SnapshotStrategy
from .sqlmodels import SqlModel
from .transformation import TransformationPipeline

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
    "pipeline_from_dict",
    "pipeline_from_yaml",
    "read_marker",
]
