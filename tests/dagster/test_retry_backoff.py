"""RequestBackoff: the waits it gives, and the values it refuses (naming the field and the fix)."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from rocky_dagster import RequestBackoff
from rocky_dagster.errors import LedgerConfigError


def test_the_default_waits_one_minute_then_doubles_up_to_an_hour() -> None:
    backoff = RequestBackoff()
    assert (backoff.base_seconds, backoff.factor, backoff.max_seconds) == (60, 2.0, 3600)
    waits = [backoff.delay(n) / timedelta(seconds=1) for n in range(1, 10)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert backoff.delay(10**9) == timedelta(hours=1)  # no float overflow on a long streak


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"factor": 1}, [30, 30, 30]),
        ({"factor": 3, "max_seconds": 100}, [30, 90, 100]),
        ({"max_seconds": 30}, [30, 30, 30]),
    ],
)
def test_custom_waits(kwargs: dict, expected: list[float]) -> None:
    backoff = RequestBackoff(base_seconds=30, **kwargs)
    assert [backoff.delay(n).total_seconds() for n in (1, 2, 3)] == expected
    # the failures worth counting: from there on the wait no longer grows
    n = backoff.failures_that_matter
    assert backoff.delay(n) == backoff.delay(n + 1) == backoff.delay(n + 100)
    assert n == 1 or backoff.delay(n - 1) < backoff.delay(n)


@pytest.mark.parametrize(
    ("kwargs", "field", "fix"),
    [
        ({"base_seconds": -1}, "base_seconds", "pass backoff=None"),
        ({"base_seconds": 0}, "base_seconds", "pass backoff=None"),
        ({"max_seconds": 0}, "max_seconds", "positive number of seconds"),
        ({"factor": 0}, "factor", "must be at least 1"),
        ({"factor": 0.5}, "factor", "must be at least 1"),
        ({"base_seconds": math.inf}, "base_seconds", "finite number"),
        ({"max_seconds": math.nan}, "max_seconds", "finite number"),
        ({"factor": math.inf}, "factor", "finite number"),
        ({"base_seconds": "60"}, "base_seconds", "valid number"),
        ({"factor": True}, "factor", "valid number"),
        ({"max_seconds": None}, "max_seconds", "valid number"),
        ({"max_seconds": 4e9}, "max_seconds", "at most"),
        ({"base_seconds": 120, "max_seconds": 60}, "max_seconds", "lower base_seconds"),
        ({"max_attempts": 3}, "max_attempts", "unknown field; remove it"),
    ],
)
def test_bad_values_raise_naming_the_field_and_the_fix(kwargs: dict, field: str, fix: str) -> None:
    with pytest.raises(LedgerConfigError, match=r"^invalid retry backoff: ") as raised:
        RequestBackoff(**kwargs)
    assert f"{field}: " in str(raised.value)
    assert fix in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_a_policy_is_frozen() -> None:
    backoff = RequestBackoff()
    with pytest.raises(Exception, match="frozen"):
        backoff.base_seconds = 1  # type: ignore[misc]
