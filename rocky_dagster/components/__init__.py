"""Components: the ledger and the pipelines declared in ``defs.yaml`` for ``dg``."""

from .ledger import IdempotencyLedgerComponent as IdempotencyLedgerComponent
from .ledger import LedgerSettings as LedgerSettings
from .pipelines import PipelinesComponent as PipelinesComponent

__all__ = ["IdempotencyLedgerComponent", "LedgerSettings", "PipelinesComponent"]
