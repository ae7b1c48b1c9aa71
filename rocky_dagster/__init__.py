"""rocky_dagster: every Dagster pipeline run is exactly-once per key, through an idempotency ledger.

Names are imported on first use (PEP 562), so ``import rocky_dagster.ledger`` (the CLI, a
worker that only talks to the ledger) does not pay for importing Dagster.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # the Dagster layer
    "IdempotencyLedger": ".resource",
    "idempotent_op": ".ops",
    "replication_op": ".pipeline_ops",
    "transformation_op": ".pipeline_ops",
    "quality_op": ".pipeline_ops",
    "quality_checks": ".pipeline_ops",
    "snapshot_op": ".pipeline_ops",
    "load_op": ".pipeline_ops",
    "ledger_success_hook": ".hooks",
    "ledger_failure_hook": ".hooks",
    "ledger_hook": ".hooks",
    "ledger_hooks": ".hooks",
    "ledger_job": ".jobs",
    "with_ledger": ".jobs",
    "ledger_run_status_sensors": ".sensors",
    "guard_run_requests": ".sensors",
    "idempotent_asset": ".assets",
    "KEY_TAG": ".keys",
    "FORCE_TAG": ".keys",
    # the ledger
    "open_ledger": ".ledger",
    "LedgerConfig": ".ledger",
    "Decision": ".ledger",
    "Outcome": ".ledger",
    # the pipelines
    "ReplicationPipeline": ".pipelines",
    "TransformationPipeline": ".pipelines",
    "QualityPipeline": ".pipelines",
    "SnapshotPipeline": ".pipelines",
    "LoadPipeline": ".pipelines",
    "PipelineResult": ".pipelines",
    "QualityChecksFailed": ".pipelines",
}

__all__ = [
    "FORCE_TAG",
    "KEY_TAG",
    "Decision",
    "IdempotencyLedger",
    "LedgerConfig",
    "LoadPipeline",
    "Outcome",
    "PipelineResult",
    "QualityChecksFailed",
    "QualityPipeline",
    "ReplicationPipeline",
    "SnapshotPipeline",
    "TransformationPipeline",
    "guard_run_requests",
    "idempotent_asset",
    "idempotent_op",
    "ledger_failure_hook",
    "ledger_hook",
    "ledger_hooks",
    "ledger_job",
    "ledger_run_status_sensors",
    "ledger_success_hook",
    "load_op",
    "open_ledger",
    "quality_checks",
    "quality_op",
    "replication_op",
    "snapshot_op",
    "transformation_op",
    "with_ledger",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rocky_dagster' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .assets import idempotent_asset
    from .hooks import ledger_failure_hook, ledger_hook, ledger_hooks, ledger_success_hook
    from .jobs import ledger_job, with_ledger
    from .keys import FORCE_TAG, KEY_TAG
    from .ledger import Decision, LedgerConfig, Outcome, open_ledger
    from .ops import idempotent_op
    from .pipeline_ops import (
        load_op,
        quality_checks,
        quality_op,
        replication_op,
        snapshot_op,
        transformation_op,
    )
    from .pipelines import (
        LoadPipeline,
        PipelineResult,
        QualityChecksFailed,
        QualityPipeline,
        ReplicationPipeline,
        SnapshotPipeline,
        TransformationPipeline,
    )
    from .resource import IdempotencyLedger
    from .sensors import guard_run_requests, ledger_run_status_sensors
