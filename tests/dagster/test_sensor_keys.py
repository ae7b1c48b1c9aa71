"""The sensor guard asks the ledger about the very keys the target job's steps claim.

For each shape of guarded step (an op, an asset, a prefixed asset, a multi-asset in full and as
a subset, a partitioned asset) a real run does the work under key K, then the guard is asked
about the same request: done -> a SkipReason naming the run; failed -> re-requested under the
next run_key; in flight in a live run -> skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetSpec,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    RunRequest,
    SkipReason,
    StaticPartitionsDefinition,
    build_sensor_context,
    define_asset_job,
)

from rocky_dagster import (
    IdempotencyLedger,
    guard_run_requests,
    idempotent_asset,
    idempotent_multi_asset,
    idempotent_op,
    ledger_job,
)
from rocky_dagster.ledger import Ledger, State
from rocky_dagster.step.keys import KEY_TAG, RUN_KEY_TAG

FAIL = {"on": False}


def _maybe_fail() -> None:
    if FAIL["on"]:
        raise ValueError("failed on purpose")


@idempotent_op
def op_step(context) -> dict[str, Any]:
    _maybe_fail()
    return {"rows": 1}


@ledger_job
def op_job() -> None:
    op_step()


@idempotent_asset
def single(context) -> None:
    _maybe_fail()


@idempotent_asset(key_prefix=["pre", "fix"], name="x")
def prefixed(context) -> None:
    _maybe_fail()


@idempotent_multi_asset(specs=[AssetSpec("m1"), AssetSpec("m2")], can_subset=True)
def multi(context) -> Iterator[MaterializeResult]:
    _maybe_fail()
    for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
        yield MaterializeResult(asset_key=key)


@idempotent_asset(check_specs=[AssetCheckSpec("positive", asset="checked")])
def checked(context) -> MaterializeResult:
    """An asset step with a check of its own: it claims the asset, not the check."""
    _maybe_fail()
    return MaterializeResult(check_results=[AssetCheckResult(passed=True)])


PARTS = StaticPartitionsDefinition(["a", "b"])


@idempotent_asset(partitions_def=PARTS)
def parted(context) -> None:
    _maybe_fail()


DEFS = Definitions(
    assets=[single, prefixed, multi, parted, checked],
    jobs=[
        op_job,
        define_asset_job("single_job", [single]),
        define_asset_job("prefixed_job", [AssetKey(["pre", "fix", "x"])]),
        define_asset_job("multi_job", [multi]),
        define_asset_job("parted_job", [parted], partitions_def=PARTS),
        define_asset_job("checked_job", [checked]),
    ],
    resources={"ledger": IdempotencyLedger()},
)


@dataclass(frozen=True)
class Case:
    job: str
    claimed: list[str]  # the ledger keys its steps claim under key K (K left out)
    request: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


CASES = {
    "op": Case("op_job", ["op_step"]),
    "asset": Case("single_job", ["single"]),
    "prefixed_asset": Case("prefixed_job", ["pre/fix/x"]),
    "multi_asset": Case("multi_job", ["m1", "m2"]),
    "multi_asset_subset": Case(
        "multi_job",
        ["m1"],
        request={"asset_selection": [AssetKey("m1")]},
        run={"asset_selection": [AssetKey("m1")]},
    ),
    "asset_with_a_check": Case("checked_job", ["checked"]),
    "partitioned_asset": Case(
        "parted_job", ["a/parted"], request={"partition_key": "a"}, run={"partition_key": "a"}
    ),
}
KEY = "k1"


def _ask(instance: DagsterInstance, case: Case, **request: Any) -> Any:
    context = build_sensor_context(instance=instance, resources={"ledger": IdempotencyLedger()})
    return guard_run_requests(
        context,
        RunRequest(run_key=KEY, **{**case.request, **request}),
        job=DEFS.resolve_job_def(case.job),
        backoff=None,
    )


def _run(instance: DagsterInstance, case: Case, *, fail: bool) -> str:
    FAIL["on"] = fail
    try:
        result = DEFS.resolve_job_def(case.job).execute_in_process(
            instance=instance,
            tags={KEY_TAG: KEY, RUN_KEY_TAG: KEY},
            raise_on_error=False,
            **case.run,
        )
    finally:
        FAIL["on"] = False
    assert result.success is not fail
    return result.run_id


@pytest.mark.parametrize("name", list(CASES))
def test_done_skips_naming_the_run(instance: DagsterInstance, ledger: Ledger, name: str) -> None:
    case = CASES[name]
    [first] = _ask(instance, case)
    assert (first.run_key, first.tags[KEY_TAG]) == (KEY, KEY)
    run_id = _run(instance, case, fail=False)
    for claimed in case.claimed:  # the steps claimed the keys the guard asks about
        entry = ledger.get(f"{KEY}/{claimed}")
        assert (entry.state, entry.run_id) == (State.SUCCEEDED, run_id)

    skip = _ask(instance, case)
    assert isinstance(skip, SkipReason), skip
    assert f"key '{KEY}' already completed in run {run_id}" == skip.skip_message


@pytest.mark.parametrize("name", list(CASES))
def test_failed_is_re_requested_under_the_next_run_key(
    instance: DagsterInstance, ledger: Ledger, name: str
) -> None:
    case = CASES[name]
    _run(instance, case, fail=True)
    [again] = _ask(instance, case)
    assert (again.run_key, again.tags[KEY_TAG]) == (f"{KEY}#1", KEY)


@pytest.mark.parametrize("name", list(CASES))
def test_in_flight_in_a_live_run_is_skipped(
    instance: DagsterInstance, ledger: Ledger, name: str
) -> None:
    case = CASES[name]
    live = instance.create_run_for_job(job_def=op_job, tags={KEY_TAG: KEY})
    ledger.claim(f"{KEY}/{case.claimed[-1]}", live.run_id)  # as that step would

    skip = _ask(instance, case)
    assert isinstance(skip, SkipReason), skip
    assert f"key '{KEY}' is in flight in run {live.run_id}" in skip.skip_message


def test_a_subset_or_a_partition_is_asked_about_its_own_keys(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    _run(instance, CASES["multi_asset_subset"], fail=False)  # m1 done, m2 not
    [whole] = _ask(instance, CASES["multi_asset"])
    assert whole.run_key == f"{KEY}#1"
    assert isinstance(_ask(instance, CASES["multi_asset_subset"]), SkipReason)

    _run(instance, CASES["partitioned_asset"], fail=False)  # partition a done, b not
    [other] = _ask(instance, CASES["partitioned_asset"], partition_key="b")
    assert other.partition_key == "b"
    assert isinstance(_ask(instance, CASES["partitioned_asset"]), SkipReason)
