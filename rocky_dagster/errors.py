"""Every error rocky_dagster raises, under one root: ``except RockyDagsterError`` catches them all.

Two families share the root: `LedgerError` (the ledger: claims, configuration, the store,
operator actions) and `PipelineError` (a pipeline run failed; the warehouse was left as it was).
The classes live beside the code that raises them; this module gathers them. The root is defined
here and the rest are imported on first use (PEP 562), so the ledger can import the root without
a cycle and importing this module imports no Dagster.

Examples:
    .. code-block:: python

        from rocky_dagster.errors import LedgerUnavailableError, RockyDagsterError

        try:
            ledger.claim("daily@2026-12-01/load", run_id)
        except LedgerUnavailableError:
            ...  # fail closed: do no work
        except RockyDagsterError:
            ...  # anything else rocky_dagster refused
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any


class RockyDagsterError(Exception):
    """The root of every error rocky_dagster raises; its message names the field and the fix."""


_EXPORTS: dict[str, str] = {
    # the ledger
    "LedgerError": ".ledger.errors",
    "LedgerConfigError": ".ledger.errors",
    "InvalidArgumentError": ".ledger.errors",
    "InvalidKeyError": ".ledger.errors",
    "InvalidResultError": ".ledger.errors",
    "FingerprintMismatchError": ".ledger.errors",
    "LedgerUnavailableError": ".ledger.errors",
    "LedgerSchemaError": ".ledger.errors",
    "LedgerCorruptError": ".ledger.errors",
    "OperationRefused": ".ledger.operations",
    # the pipelines (PipelineError and the claim errors are raised by the effects too)
    "PipelineError": ".effects.errors",
    "PipelineConfigError": ".pipelines.errors",
    "SchemaConflictError": ".pipelines.errors",
    "ModelGraphError": ".pipelines.errors",
    "FenceLostError": ".effects.errors",
    "ClaimRefusedError": ".effects.errors",
    "KeyChangeError": ".pipelines.errors",
    "ViewValidationError": ".pipelines.errors",
    "WarehouseError": ".pipelines.errors",
    "LoadError": ".pipelines.errors",
    "QualityChecksFailed": ".pipelines.errors",
}
"""Every error but the root, and the module it lives in."""

__all__ = sorted(["RockyDagsterError", *_EXPORTS])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rocky_dagster.errors' has no attribute {name!r}")
    value = getattr(import_module(module, "rocky_dagster"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from rocky_dagster.effects.errors import ClaimRefusedError as ClaimRefusedError
    from rocky_dagster.effects.errors import FenceLostError as FenceLostError
    from rocky_dagster.effects.errors import PipelineError as PipelineError
    from rocky_dagster.ledger.errors import FingerprintMismatchError as FingerprintMismatchError
    from rocky_dagster.ledger.errors import InvalidArgumentError as InvalidArgumentError
    from rocky_dagster.ledger.errors import InvalidKeyError as InvalidKeyError
    from rocky_dagster.ledger.errors import InvalidResultError as InvalidResultError
    from rocky_dagster.ledger.errors import LedgerConfigError as LedgerConfigError
    from rocky_dagster.ledger.errors import LedgerCorruptError as LedgerCorruptError
    from rocky_dagster.ledger.errors import LedgerError as LedgerError
    from rocky_dagster.ledger.errors import LedgerSchemaError as LedgerSchemaError
    from rocky_dagster.ledger.errors import LedgerUnavailableError as LedgerUnavailableError
    from rocky_dagster.ledger.operations import OperationRefused as OperationRefused
    from rocky_dagster.pipelines.errors import KeyChangeError as KeyChangeError
    from rocky_dagster.pipelines.errors import LoadError as LoadError
    from rocky_dagster.pipelines.errors import ModelGraphError as ModelGraphError
    from rocky_dagster.pipelines.errors import PipelineConfigError as PipelineConfigError
    from rocky_dagster.pipelines.errors import QualityChecksFailed as QualityChecksFailed
    from rocky_dagster.pipelines.errors import SchemaConflictError as SchemaConflictError
    from rocky_dagster.pipelines.errors import ViewValidationError as ViewValidationError
    from rocky_dagster.pipelines.errors import WarehouseError as WarehouseError
