"""A playground for failure behaviour: an op that holds its claim, an op that fails once."""

from __future__ import annotations

import time

from dagster import Config

from rocky_dagster import idempotent_op, ledger_job


class HoldConfig(Config):
    seconds: float = 30.0


@idempotent_op(description="Holds its claim for `seconds`: try duplicates, cancel and kill on it.")
def hold_claim(config: HoldConfig) -> dict[str, float]:
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    return {"held_seconds": config.seconds}


class FlakyConfig(Config):
    fail_times: int = 1


@idempotent_op(description="Fails until the run is Dagster's retry number `fail_times`.")
def flaky_step(context, config: FlakyConfig) -> dict[str, int]:
    attempt = int(context.run.tags.get("dagster/retry_number", "0"))
    if attempt < config.fail_times:
        raise RuntimeError(
            f"flaky_step fails on run attempt {attempt} (fail_times={config.fail_times})"
        )
    return {"attempt": attempt}


@ledger_job(description="One guarded op that holds its claim (see hold_claim).")
def slow_job() -> None:
    hold_claim()


@ledger_job(description="One guarded op that fails on the first run attempt (see flaky_step).")
def flaky_job() -> None:
    flaky_step()
