"""rocky_dagster: every Dagster pipeline run is exactly-once per key, through an idempotency ledger.

Names are imported on first use (PEP 562), so ``import rocky_dagster.ledger`` (the CLI, a
worker that only talks to the ledger) does not pay for importing Dagster.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # the resource
    "IdempotencyLedger": ".resource",
    # the decorators
    "idempotent_op": ".decorators.ops",
    "idempotent_asset": ".decorators.assets",
    "idempotent_multi_asset": ".decorators.multi_asset",
    "proceeding_asset_keys": ".decorators.multi_asset",
    "input_versions_key": ".step.input_versions",
    # jobs and the optional backstop hooks
    "ledger_job": ".decorators.jobs",
    "with_ledger": ".decorators.jobs",
    "ledger_hooks": ".decorators.hooks",
    # sensors and schedules
    "ledger_run_status_sensors": ".sensors.run_requests",
    "guard_run_requests": ".sensors.run_requests",
    "RequestBackoff": ".sensors.backoff",
    # definitions: the sensors and the admin job, ready to merge
    "ledger_definitions": ".operations.admin_job",
    "ledger_admin_job": ".operations.admin_job",
    # components (defs.yaml, dg)
    "IdempotencyLedgerComponent": ".components",
    "PipelinesComponent": ".components",
    # effects written once, and the run tags
    "exactly_once": ".effects",
    "KEY_TAG": ".step.keys",
    "IDEMPOTENCY_TAG": ".step.keys",
    "FORCE_VALUE": ".step.keys",
}
"""Every top-level name and the module it lives in: the one export list (``__all__`` is its keys).

What a README user types, no more: the pipelines and their builders are in
`rocky_dagster.pipelines`, the ledger's types in `rocky_dagster.ledger`, every error in
`rocky_dagster.errors`, the admin job's config in `rocky_dagster.operations.admin_job`."""

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
    from .components import (
        IdempotencyLedgerComponent as IdempotencyLedgerComponent,
    )
    from .components import (
        PipelinesComponent as PipelinesComponent,
    )
    from .decorators.assets import (
        idempotent_asset as idempotent_asset,
    )
    from .decorators.hooks import (
        ledger_hooks as ledger_hooks,
    )
    from .decorators.jobs import (
        ledger_job as ledger_job,
    )
    from .decorators.jobs import (
        with_ledger as with_ledger,
    )
    from .decorators.multi_asset import (
        idempotent_multi_asset as idempotent_multi_asset,
    )
    from .decorators.multi_asset import (
        proceeding_asset_keys as proceeding_asset_keys,
    )
    from .decorators.ops import (
        idempotent_op as idempotent_op,
    )
    from .effects import (
        exactly_once as exactly_once,
    )
    from .operations.admin_job import (
        ledger_admin_job as ledger_admin_job,
    )
    from .operations.admin_job import (
        ledger_definitions as ledger_definitions,
    )
    from .resource import (
        IdempotencyLedger as IdempotencyLedger,
    )
    from .sensors.backoff import (
        RequestBackoff as RequestBackoff,
    )
    from .sensors.run_requests import (
        guard_run_requests as guard_run_requests,
    )
    from .sensors.run_requests import (
        ledger_run_status_sensors as ledger_run_status_sensors,
    )
    from .step.input_versions import (
        input_versions_key as input_versions_key,
    )
    from .step.keys import (
        FORCE_VALUE as FORCE_VALUE,
    )
    from .step.keys import (
        IDEMPOTENCY_TAG as IDEMPOTENCY_TAG,
    )
    from .step.keys import (
        KEY_TAG as KEY_TAG,
    )
