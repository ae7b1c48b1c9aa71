"""Ledger policy, validated once at the edge so the state machine can trust it."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LedgerConfigError

MAX_DURATION = timedelta(days=36_525)
"""The longest duration a setting may name (100 years): every deadline the ledger computes
(now + retention, claimed_at + TTL, now + lease) stays a valid datetime on both backends."""
MIN_DURATION = timedelta(microseconds=1)
"""The stores keep microseconds; a shorter positive duration would round to zero."""
_UNITS = {"retention_days": "days", "in_flight_ttl_hours": "hours", "lease_seconds": "seconds"}


class DedupPolicy(StrEnum):
    """Which terminal outcomes stop a later claim of the same key."""

    SUCCESS = "success"
    """Only a success dedups; a failure is claimable again at once (the default)."""
    ANY = "any"
    """Any terminal outcome dedups until retention ends; failures are final."""


class MismatchPolicy(StrEnum):
    """What a claim does when the key was recorded with a different fingerprint."""

    ERROR = "error"
    IGNORE = "ignore"


class LedgerConfig(BaseModel):
    """Policy of one ledger. Durations lie between one microsecond and 100 years; unknown
    fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dedup_on: DedupPolicy = Field(
        DedupPolicy.SUCCESS,
        description="'success': only successes dedup, failures retry at once; 'any': failures dedup too.",
    )
    retention_days: float = Field(
        30,
        gt=0,
        allow_inf_nan=False,
        description="How long a finalized key keeps deduplicating (days).",
    )
    in_flight_ttl_hours: float = Field(
        24,
        gt=0,
        allow_inf_nan=False,
        description="Hard cap on the life of one claim, heartbeats or not (hours).",
    )
    lease_seconds: float = Field(
        120,
        gt=0,
        allow_inf_nan=False,
        description="A claim not heartbeated for this long may be adopted; holders beat every lease/4.",
    )
    on_fingerprint_mismatch: MismatchPolicy = Field(
        MismatchPolicy.ERROR,
        description="'error': a claim whose fingerprint differs from the recorded one raises; 'ignore': it does not.",
    )

    def __init__(self, **data: Any) -> None:
        """As pydantic's, but a bad field is a `LedgerConfigError` here too (not only in `parse`)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise LedgerConfigError(describe_validation_error(exc, "ledger config")) from None

    @field_validator("retention_days", "in_flight_ttl_hours", "lease_seconds")
    @classmethod
    def _a_representable_duration(cls, value: float, info: Any) -> float:
        unit = _UNITS[info.field_name]
        limit = MAX_DURATION / timedelta(**{unit: 1})
        if value > limit:
            raise ValueError(
                f"must be at most {limit:g} {unit} (100 years): longer deadlines overflow a "
                "datetime"
            )
        floor = MIN_DURATION / timedelta(**{unit: 1})
        if value < floor:
            raise ValueError(
                f"must be at least one microsecond ({floor:g} "
                f"{unit}); the store keeps microseconds and a shorter one rounds to zero"
            )
        return value

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

    @property
    def in_flight_ttl(self) -> timedelta:
        return timedelta(hours=self.in_flight_ttl_hours)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.lease_seconds / 4

    @classmethod
    def parse(cls, value: LedgerConfig | dict[str, Any] | None) -> LedgerConfig:
        """Build a config, turning pydantic's errors into one `LedgerConfigError` naming each field."""
        if value is None:
            return cls()
        if isinstance(value, LedgerConfig):
            # checked again: `model_copy(update=...)` and `model_construct` skip validation
            value = dict(value.__dict__)
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise LedgerConfigError(describe_validation_error(exc, "ledger config")) from None


def describe_validation_error(
    exc: ValidationError, what: str, known_fields: list[str] | None = None
) -> str:
    """One line per bad field: '<field>: <problem> (got <value>)'.

    `known_fields` (default: `LedgerConfig`'s) are named when a field is unknown.
    """
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = known_fields if known_fields is not None else _known_fields()
            msg = "unknown field; remove it (known fields: " + ", ".join(known) + ")"
        given = err.get("input")
        lines.append(f"{field}: {msg} (got {given!r})")
    return f"invalid {what}: " + "; ".join(lines)


def _known_fields() -> list[str]:
    return list(LedgerConfig.model_fields)
