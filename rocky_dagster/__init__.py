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
    "RetryBackoff": ".backoff",
    "idempotent_asset": ".assets",
    "input_versions_key": ".input_versions",
    "idempotent_multi_asset": ".multi_asset",
    "proceeding_asset_keys": ".multi_asset",
    "pipeline_assets": ".pipeline_assets",
    "pipeline_op": ".pipeline_ops",
    "step_decisions": ".presentation",
    "KEY_TAG": ".keys",
    "FORCE_TAG": ".keys",
    "OUTCOME_TAG": ".keys",
    # components (defs.yaml, dg)
    "IdempotencyLedgerComponent": ".components",
    "PipelinesComponent": ".components",
    # operating the ledger from the UI
    "ledger_admin_job": ".admin",
    "ledger_definitions": ".admin",
    "LedgerAdminConfig": ".admin",
    # the ledger
    "open_ledger": ".ledger",
    "LedgerConfig": ".ledger",
    "Decision": ".ledger",
    "Outcome": ".ledger",
    "LedgerError": ".ledger",
    "LedgerUnavailableError": ".ledger",
    "LedgerConfigError": ".ledger",
    "LedgerSchemaError": ".ledger",
    "FingerprintMismatchError": ".ledger",
    # the pipelines
    "ReplicationPipeline": ".pipelines",
    "TransformationPipeline": ".pipelines",
    "QualityPipeline": ".pipelines",
    "SnapshotPipeline": ".pipelines",
    "LoadPipeline": ".pipelines",
    "PipelineResult": ".pipelines",
    "QualityChecksFailed": ".pipelines",
    "PipelineError": ".pipelines",
    "FenceLostError": ".pipelines",
    "ClaimRefusedError": ".pipelines",
    "exactly_once": ".pipelines",
    "running_claim": ".guard",
}
"""Every public name and the module it lives in: the one export list (``__all__`` is its keys)."""

__all__ = sorted(_EXPORTS)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rocky-dagster")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _package_version()


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
    from .admin import (
        LedgerAdminConfig as LedgerAdminConfig,
    )
    from .admin import (
        ledger_admin_job as ledger_admin_job,
    )
    from .admin import (
        ledger_definitions as ledger_definitions,
    )
    from .assets import (
        idempotent_asset as idempotent_asset,
    )
    from .backoff import (
        RetryBackoff as RetryBackoff,
    )
    from .components import (
        IdempotencyLedgerComponent as IdempotencyLedgerComponent,
    )
    from .components import (
        PipelinesComponent as PipelinesComponent,
    )
    from .guard import (
        running_claim as running_claim,
    )
    from .hooks import (
        ledger_failure_hook as ledger_failure_hook,
    )
    from .hooks import (
        ledger_hook as ledger_hook,
    )
    from .hooks import (
        ledger_hooks as ledger_hooks,
    )
    from .hooks import (
        ledger_success_hook as ledger_success_hook,
    )
    from .input_versions import (
        input_versions_key as input_versions_key,
    )
    from .jobs import (
        ledger_job as ledger_job,
    )
    from .jobs import (
        with_ledger as with_ledger,
    )
    from .keys import (
        FORCE_TAG as FORCE_TAG,
    )
    from .keys import (
        KEY_TAG as KEY_TAG,
    )
    from .keys import (
        OUTCOME_TAG as OUTCOME_TAG,
    )
    from .ledger import (
        Decision as Decision,
    )
    from .ledger import (
        FingerprintMismatchError as FingerprintMismatchError,
    )
    from .ledger import (
        LedgerConfig as LedgerConfig,
    )
    from .ledger import (
        LedgerConfigError as LedgerConfigError,
    )
    from .ledger import (
        LedgerError as LedgerError,
    )
    from .ledger import (
        LedgerSchemaError as LedgerSchemaError,
    )
    from .ledger import (
        LedgerUnavailableError as LedgerUnavailableError,
    )
    from .ledger import (
        Outcome as Outcome,
    )
    from .ledger import (
        open_ledger as open_ledger,
    )
    from .multi_asset import (
        idempotent_multi_asset as idempotent_multi_asset,
    )
    from .multi_asset import (
        proceeding_asset_keys as proceeding_asset_keys,
    )
    from .ops import (
        idempotent_op as idempotent_op,
    )
    from .pipeline_assets import (
        pipeline_assets as pipeline_assets,
    )
    from .pipeline_ops import (
        load_op as load_op,
    )
    from .pipeline_ops import (
        pipeline_op as pipeline_op,
    )
    from .pipeline_ops import (
        quality_checks as quality_checks,
    )
    from .pipeline_ops import (
        quality_op as quality_op,
    )
    from .pipeline_ops import (
        replication_op as replication_op,
    )
    from .pipeline_ops import (
        snapshot_op as snapshot_op,
    )
    from .pipeline_ops import (
        transformation_op as transformation_op,
    )
    from .pipelines import (
        ClaimRefusedError as ClaimRefusedError,
    )
    from .pipelines import (
        FenceLostError as FenceLostError,
    )
    from .pipelines import (
        LoadPipeline as LoadPipeline,
    )
    from .pipelines import (
        PipelineError as PipelineError,
    )
    from .pipelines import (
        PipelineResult as PipelineResult,
    )
    from .pipelines import (
        QualityChecksFailed as QualityChecksFailed,
    )
    from .pipelines import (
        QualityPipeline as QualityPipeline,
    )
    from .pipelines import (
        ReplicationPipeline as ReplicationPipeline,
    )
    from .pipelines import (
        SnapshotPipeline as SnapshotPipeline,
    )
    from .pipelines import (
        TransformationPipeline as TransformationPipeline,
    )
    from .pipelines import (
        exactly_once as exactly_once,
    )
    from .presentation import (
        step_decisions as step_decisions,
    )
    from .resource import (
        IdempotencyLedger as IdempotencyLedger,
    )
    from .sensors import (
        guard_run_requests as guard_run_requests,
    )
    from .sensors import (
        ledger_run_status_sensors as ledger_run_status_sensors,
    )
