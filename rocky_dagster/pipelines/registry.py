"""Build any pipeline from one mapping with a `type` key (YAML-friendly)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import PipelineConfig, read_yaml_mapping
from .errors import PipelineConfigError
from .load import LoadPipeline
from .quality import QualityPipeline
from .replication import ReplicationPipeline
from .snapshot import SnapshotPipeline
from .transformation import TransformationPipeline

PIPELINE_TYPES: dict[str, type[PipelineConfig]] = {
    cls.pipeline_type: cls
    for cls in (
        ReplicationPipeline,
        TransformationPipeline,
        QualityPipeline,
        SnapshotPipeline,
        LoadPipeline,
    )
}


def pipeline_from_dict(data: Mapping[str, Any]) -> PipelineConfig:
    """`{"type": "replication", "warehouse": ..., ...}` → a validated ReplicationPipeline."""
    fields = dict(data)
    kind = fields.pop("type", None)
    if kind not in PIPELINE_TYPES:
        raise PipelineConfigError(f"type: must be one of {sorted(PIPELINE_TYPES)}, got {kind!r}")
    return PIPELINE_TYPES[kind].model_validate(fields)


def pipeline_from_yaml(path_or_text: str | Path) -> PipelineConfig:
    """Like pipeline_from_dict, from a YAML file path or YAML text."""
    return pipeline_from_dict(read_yaml_mapping(path_or_text))
