"""The idempotency ledger: atomic, fenced, one-shot claims per key. Imports no Dagster."""

from __future__ import annotations

import os
from pathlib import Path

from .backend import Clock, Ledger, redact_url
from .config import DedupPolicy, LedgerConfig, MismatchPolicy
from .defaults import default_ledger_url
from .errors import (
    FingerprintMismatchError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidResultError,
    LedgerConfigError,
    LedgerCorruptError,
    LedgerError,
    LedgerSchemaError,
    LedgerUnavailableError,
)
from .model import (
    Claim,
    Decision,
    Entry,
    Event,
    EventKind,
    FinalizeReason,
    FinalizeResult,
    Outcome,
    State,
    Stats,
)

__all__ = [
    "Claim",
    "Clock",
    "Decision",
    "DedupPolicy",
    "Entry",
    "Event",
    "EventKind",
    "FinalizeReason",
    "FinalizeResult",
    "FingerprintMismatchError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidResultError",
    "Ledger",
    "LedgerConfig",
    "LedgerConfigError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerSchemaError",
    "LedgerUnavailableError",
    "MismatchPolicy",
    "Outcome",
    "State",
    "Stats",
    "check_url",
    "default_ledger_url",
    "open_ledger",
    "redact_url",
    "sqlite_url",
]


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The ledger URL of a SQLite file (absolute paths give four slashes, as in SQLAlchemy)."""
    return f"sqlite:///{Path(path)}"


def open_ledger(
    url: str | os.PathLike[str],
    config: LedgerConfig | dict | None = None,
    *,
    clock: Clock | None = None,
) -> Ledger:
    """Open (creating if needed) the ledger at `url`.

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or a plain file path select the
    embedded backend; `postgresql://user:pass@host:port/db` the shared one (extra `postgres`).
    `clock` (returning an aware UTC datetime) replaces the store's clock, for tests.
    """
    config = LedgerConfig.parse(config)
    text = _url_text(url)
    backend = check_url(text)
    if backend == "postgresql":
        try:
            from .postgres import PostgresLedger
        except ImportError as exc:
            raise LedgerConfigError(
                f"url: {redact_url(text)!r} needs the PostgreSQL backend, which is not installed "
                f"({exc}); install its drivers: pip install 'psycopg[binary]>=3.2,<4' "
                "'psycopg-pool>=3.2,<4' (or, from a clone of rocky_dagster: pip install "
                "'.[postgres]')"
            ) from None
        return PostgresLedger(text, config, clock)
    from .sqlite import SQLiteLedger

    if "://" not in text:
        return SQLiteLedger(sqlite_url(text), text, config, clock)
    return SQLiteLedger(text, text.partition("://")[2][1:], config, clock)


def check_url(url: str) -> str:
    """Which backend `url` names ("sqlite" or "postgresql"), or `LedgerConfigError` saying why
    none: run where definitions load, so a typo fails there and not in the first step."""
    text = _url_text(url)
    if not text.strip():
        raise LedgerConfigError(
            "url: empty ledger url; give sqlite:///path/to/ledger.db or postgresql://user@host/db"
        )
    if "://" not in text:
        return "sqlite"
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path or path == ":memory:":
            raise LedgerConfigError(
                f"url: {redact_url(text)!r} names no file; use sqlite:///relative/ledger.db or "
                "sqlite:////absolute/ledger.db (an in-memory ledger cannot be shared by Dagster's "
                "processes)"
            )
        return "sqlite"
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        return "postgresql"
    raise LedgerConfigError(
        f"url: unknown scheme {scheme!r} in {redact_url(text)!r}; use sqlite:///path/to/ledger.db "
        "or postgresql://user:password@host:5432/dbname"
    )


def _url_text(url: object) -> str:
    """The URL as text, refusing what no store could be named by (bytes, numbers, NUL, …)."""
    text = os.fspath(url) if isinstance(url, str | os.PathLike) else url
    if not isinstance(text, str):
        raise LedgerConfigError(
            f"url must be a string or a path, got {type(text).__name__}; give "
            "sqlite:///path/to/ledger.db or postgresql://user@host/db"
        )
    for position, char in enumerate(text):
        if char == "\x00" or "\ud800" <= char <= "\udfff":
            what = "a NUL character" if char == "\x00" else "a lone surrogate (undecodable bytes)"
            raise LedgerConfigError(
                f"url contains {what} at position {position}; give the ledger url as plain "
                "UTF-8 text"
            )
    return text
