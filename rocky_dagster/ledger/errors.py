"""Errors raised by the ledger.

Every error says what is wrong and what to do about it, and every error raised
before a write leaves the ledger unchanged.
"""

from __future__ import annotations

from ..errors import RockyDagsterError


class LedgerError(RockyDagsterError):
    """Base class of every error the ledger raises (a `RockyDagsterError`)."""


class LedgerConfigError(LedgerError, ValueError):
    """A ledger setting or URL is invalid; the message names the field and the fix."""


class InvalidArgumentError(LedgerError, ValueError):
    """An argument to a ledger call is malformed; nothing was written."""


class InvalidKeyError(InvalidArgumentError):
    """A key, run id or label cannot be stored verbatim (empty, too long, control characters)."""


class InvalidResultError(InvalidArgumentError):
    """A result summary is not JSON-serializable (or too large) and cannot be kept with a success."""


class FingerprintMismatchError(LedgerError):
    """The same key was claimed with different work parameters than the recorded ones."""

    def __init__(self, key: str, stored: str, given: str, run_id: str | None) -> None:
        self.key = key
        self.stored = stored
        self.given = given
        self.run_id = run_id
        super().__init__(
            f"key {key!r} was recorded by run {run_id} with fingerprint {stored}, "
            f"but this claim has fingerprint {given}: the same key now names different work. "
            "Use a new key for new parameters, reset the key (rocky-dagster ledger reset KEY), "
            "or set on_fingerprint_mismatch='ignore'."
        )


class LedgerUnavailableError(LedgerError):
    """The store cannot be read or written; callers must fail closed and do no work."""


class LedgerSchemaError(LedgerUnavailableError):
    """The store was written by a newer rocky_dagster (or is not a ledger at all)."""


class LedgerCorruptError(LedgerUnavailableError):
    """A stored row or page cannot be read back as written: the store is damaged.

    A subclass of `LedgerUnavailableError`, so every caller already fails closed (no claim
    ever proceeds on a row it cannot read); `rocky-dagster ledger check` lists the damage.
    """
