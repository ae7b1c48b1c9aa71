"""How long a sensor waits before asking again for a key whose runs keep failing."""

from __future__ import annotations

import math
import warnings
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rocky_dagster.ledger.config import MAX_DURATION, describe_validation_error
from rocky_dagster.ledger.errors import LedgerConfigError

_MAX_SECONDS = MAX_DURATION.total_seconds()


class RequestBackoff(BaseModel):
    """Exponential backoff for re-requesting a key whose runs failed (`guard_run_requests`).

    It paces the *sensor's requests* for a key; it is not Dagster's ``RetryPolicy`` /
    ``Backoff``, which retry a failed step inside one run. (Formerly ``RetryBackoff``.)

    After ``n`` failed runs of a key in a row (since its last success), the key is requested
    again only once ``min(base_seconds * factor ** (n - 1), max_seconds)`` has passed since the
    last of them ended. The default waits 1, 2, 4, 8, 16, 32 minutes, then once an hour.

    Every field is a finite number (no strings, no booleans): ``base_seconds`` and
    ``max_seconds`` are positive and at most 100 years, ``base_seconds <= max_seconds``, and
    ``factor >= 1`` (1 waits ``base_seconds`` every time). A bad value raises
    `LedgerConfigError` naming the field; unknown fields are errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_seconds: float = Field(
        60,
        strict=True,
        allow_inf_nan=False,
        description="Wait after the first failure (seconds).",
    )
    factor: float = Field(
        2.0,
        strict=True,
        allow_inf_nan=False,
        description="Each further failure in a row multiplies the wait by this (>= 1).",
    )
    max_seconds: float = Field(
        3600,
        strict=True,
        allow_inf_nan=False,
        description="The wait never grows past this (seconds).",
    )

    def __init__(self, **data: Any) -> None:
        """As pydantic's, but a bad field is a `LedgerConfigError` naming it and the fix."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise LedgerConfigError(
                describe_validation_error(exc, "retry backoff", list(RequestBackoff.model_fields))
            ) from None

    @field_validator("base_seconds", "max_seconds")
    @classmethod
    def _a_positive_duration(cls, value: float, info: Any) -> float:
        if value <= 0:
            hint = (
                "; to re-request a failed key on every tick, pass backoff=None"
                if info.field_name == "base_seconds"
                else ""
            )
            raise ValueError(f"must be a positive number of seconds{hint}")
        if value > _MAX_SECONDS:
            raise ValueError(f"must be at most {_MAX_SECONDS:g} seconds (100 years)")
        return value

    @field_validator("factor")
    @classmethod
    def _at_least_one(cls, value: float) -> float:
        if value < 1:
            raise ValueError(
                "must be at least 1 (1 waits base_seconds after every failure; a smaller "
                "factor would shrink the wait as failures pile up)"
            )
        return value

    @field_validator("max_seconds")
    @classmethod
    def _not_below_base(cls, value: float, info: Any) -> float:
        base = info.data.get("base_seconds")  # absent when base_seconds itself was invalid
        if base is not None and value < base:
            raise ValueError(
                f"must be at least base_seconds ({base:g}); raise max_seconds or lower base_seconds"
            )
        return value

    def delay(self, failures: int) -> timedelta:
        """The wait after `failures` (>= 1) failed runs in a row."""
        if failures < 1:
            return timedelta(0)
        # in log space: base * factor ** (n - 1) overflows a float long before n is large
        if (failures - 1) * math.log(self.factor) >= math.log(self.max_seconds / self.base_seconds):
            return timedelta(seconds=self.max_seconds)
        return timedelta(seconds=self.base_seconds * self.factor ** (failures - 1))

    @property
    def failures_that_matter(self) -> int:
        """From this many failures in a row on, the wait no longer grows: no need to count more."""
        if self.factor == 1:
            return 1
        return max(1, math.ceil(math.log(self.max_seconds / self.base_seconds, self.factor)) + 1)


def __getattr__(name: str) -> Any:
    if name == "RetryBackoff":  # the 0.2 name, easily confused with Dagster's RetryPolicy/Backoff
        warnings.warn(
            "rocky_dagster.sensors.backoff.RetryBackoff is now RequestBackoff (from rocky_dagster import "
            "RequestBackoff): it paces a sensor's re-requests, not step retries",
            DeprecationWarning,
            stacklevel=2,
        )
        return RequestBackoff
    raise AttributeError(f"module 'rocky_dagster.sensors.backoff' has no attribute {name!r}")
