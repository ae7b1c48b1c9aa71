"""`IdempotencyLedger`: the ledger as a Dagster resource (resource key ``ledger`` by convention)."""

from __future__ import annotations

import os
import threading
from typing import Any

from dagster import ConfigurableResource, EnvVar, get_dagster_logger
from pydantic import Field, PrivateAttr, field_validator

from .ledger import (
    DedupPolicy,
    Ledger,
    LedgerConfig,
    LedgerConfigError,
    MismatchPolicy,
    check_url,
    default_ledger_url,
    open_ledger,
)
from .ledger.defaults import ENV_URL

RESOURCE_KEY = "ledger"

_warned_fallback: set[str] = set()

_OPEN: dict[tuple[str, str], Ledger] = {}
_OPEN_LOCK = threading.Lock()


class IdempotencyLedger(ConfigurableResource):
    """The idempotency ledger every guarded op, hook and sensor asks before and after work.

    Setup is cheap and never claims (Dagster sets a resource up once per step process, and
    sometimes with no op at all); the store is opened on first use and shared by everything in
    the process that names the same URL and policy.

    Examples:
        .. code-block:: python

            from dagster import Definitions, EnvVar
            from rocky_dagster import IdempotencyLedger, ledger_run_status_sensors

            Definitions(
                jobs=[my_job],
                sensors=ledger_run_status_sensors(),
                resources={"ledger": IdempotencyLedger(url=EnvVar("ROCKY_LEDGER_URL"))},
            )
    """

    url: str | None = Field(
        default=None,
        description=(
            "Ledger location: sqlite:///relative.db, sqlite:////absolute.db or "
            "postgresql://user:password@host:5432/db. Default: $ROCKY_LEDGER_URL, else "
            "$DAGSTER_HOME/rocky_ledger.db, else ./.rocky/ledger.db, resolved in the process "
            "that uses it."
        ),
    )
    dedup_on: str = Field(
        default=DedupPolicy.SUCCESS.value,
        description=(
            "'success': only a success deduplicates and a failed key runs again at once; "
            "'any': a failure is final too, until retention ends."
        ),
    )
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="How long a finished key keeps deduplicating, in days.",
    )
    in_flight_ttl_hours: float = Field(
        default=24.0,
        gt=0,
        description="Hard cap on one claim's life in hours, heartbeats or not.",
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description=(
            "A claim not heartbeated for this long may be taken over by another run; a running "
            "step heartbeats every lease_seconds / 4."
        ),
    )
    on_fingerprint_mismatch: str = Field(
        default=MismatchPolicy.ERROR.value,
        description=(
            "'error': claiming a key recorded with other work parameters fails the step; "
            "'ignore': it does not."
        ),
    )

    replay_skips: bool = Field(
        default=False,
        description=(
            "True: a skipped asset whose key is done reports a materialization that replays "
            "the recorded one (no work, same data version, rocky/replay = true, the decision and "
            "the run that did the work in its metadata), so the asset catalog and the asset "
            "page show the run that skipped. It is an update to Dagster: eager automation "
            "downstream reacts to it (and skips in turn, the data version being unchanged). "
            "False: a skip is an observation, seen in the asset's Events tab, and nothing "
            "downstream sees an update. Backfill runs replay either way (a backfill counts "
            "only materializations)."
        ),
    )

    _ledger: Ledger | None = PrivateAttr(default=None)

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, value: Any) -> Any:
        """Catch a wrong scheme at definition time; the store itself is opened on first use."""
        if isinstance(value, EnvVar) or value is None or not isinstance(value, str):
            return value
        if value.strip():
            try:
                check_url(value.strip())
            except LedgerConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("dedup_on", mode="before")
    @classmethod
    def _check_dedup_on(cls, value: Any) -> Any:
        return _check_choice("dedup_on", value, DedupPolicy)

    @field_validator("on_fingerprint_mismatch", mode="before")
    @classmethod
    def _check_mismatch(cls, value: Any) -> Any:
        return _check_choice("on_fingerprint_mismatch", value, MismatchPolicy)

    def ledger_config(self) -> LedgerConfig:
        """The validated ledger policy these fields describe."""
        return LedgerConfig.parse(
            {
                "dedup_on": self.dedup_on,
                "retention_days": self.retention_days,
                "in_flight_ttl_hours": self.in_flight_ttl_hours,
                "lease_seconds": self.lease_seconds,
                "on_fingerprint_mismatch": self.on_fingerprint_mismatch,
            }
        )

    def resolved_url(self) -> str:
        """The URL in force: the configured one, else the default location rule."""
        if self.url and self.url.strip():
            return self.url.strip()
        url = default_ledger_url()
        if (
            not os.environ.get(ENV_URL, "").strip()
            and not os.environ.get("DAGSTER_HOME", "").strip()
        ):
            _warn_fallback(url)
        return url

    def open(self) -> Ledger:
        """The ledger, opened on first use and shared per process (callers must not close it)."""
        if self._ledger is None:
            config = self.ledger_config()
            url = self.resolved_url()
            cache_key = (url, config.model_dump_json())
            with _OPEN_LOCK:
                ledger = _OPEN.get(cache_key)
                if ledger is None:
                    ledger = open_ledger(url, config)
                    _OPEN[cache_key] = ledger
            self._ledger = ledger
        return self._ledger


def _warn_fallback(url: str) -> None:
    """Say once per process that the ledger is a file in the working directory: runs launched
    without $DAGSTER_HOME (a throwaway instance) and a `dagster dev` with it would each see a
    different ledger, so a rerun could not find the run it names."""
    if url in _warned_fallback:
        return
    _warned_fallback.add(url)
    get_dagster_logger("rocky_dagster").warning(
        f"rocky_dagster: neither ${ENV_URL} nor $DAGSTER_HOME is set, so the ledger is "
        f"{url.removeprefix('sqlite:///')} in the working directory. Set DAGSTER_HOME (as for "
        f"`dagster dev`) or IdempotencyLedger(url=...) so every process uses one ledger."
    )


def _check_choice(field: str, value: Any, choices: type[DedupPolicy] | type[MismatchPolicy]) -> Any:
    """Reject an unknown policy at construction, naming the field; EnvVars are checked on resolve."""
    if isinstance(value, EnvVar):
        return value
    allowed = [c.value for c in choices]
    text = value.value if isinstance(value, choices) else value
    if text not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
    return text
