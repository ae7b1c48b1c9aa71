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
    "idempotent_op": ".ops",
    "idempotent_asset": ".assets",
    "idempotent_multi_asset": ".multi_asset",
    "proceeding_asset_keys": ".multi_asset",
    "input_versions_key": ".input_versions",
    # jobs and the optional backstop hooks
    "ledger_job": ".jobs",
    "with_ledger": ".jobs",
    "ledger_hooks": ".hooks",
    # sensors and schedules
    "ledger_run_status_sensors": ".sensors",
    "guard_run_requests": ".sensors",
    "RequestBackoff": ".backoff",
    # definitions: the sensors and the admin job, ready to merge
    "ledger_definitions": ".admin",
    "ledger_admin_job": ".admin",
    # components (defs.yaml, dg)
    "IdempotencyLedgerComponent": ".components",
    "PipelinesComponent": ".components",
    # effects written once, and the run tags
    "exactly_once": ".pipelines",
    "KEY_TAG": ".keys",
    "IDEMPOTENCY_TAG": ".keys",
    "FORCE_VALUE": ".keys",
}
"""Every top-level name and the module it lives in: the one export list (``__all__`` is its keys).

What a README user types, no more: the pipelines and their builders are in
`rocky_dagster.pipelines`, the ledger's types in `rocky_dagster.ledger`, every error in
`rocky_dagster.errors`, the admin job's config in `rocky_dagster.admin`."""

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
        ledger_admin_job as ledger_admin_job,
    )
    from .admin import (
        ledger_definitions as ledger_definitions,
    )
    from .assets import (
        idempotent_asset as idempotent_asset,
    )
    from .backoff import (
        RequestBackoff as RequestBackoff,
    )
    from .components import (
        IdempotencyLedgerComponent as IdempotencyLedgerComponent,
    )
    from .components import (
        PipelinesComponent as PipelinesComponent,
    )
    from .hooks import (
        ledger_hooks as ledger_hooks,
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
        FORCE_VALUE as FORCE_VALUE,
    )
    from .keys import (
        IDEMPOTENCY_TAG as IDEMPOTENCY_TAG,
    )
    from .keys import (
        KEY_TAG as KEY_TAG,
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
    from .pipelines import (
        exactly_once as exactly_once,
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
