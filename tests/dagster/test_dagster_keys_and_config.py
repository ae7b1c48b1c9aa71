"""Key resolution (pure), resource validation, and failure paths outside the op body."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from dagster import (
    DagsterInstance,
    DagsterResourceFunctionError,
    EnvVar,
    IOManager,
    in_process_executor,
    io_manager,
)
from pydantic import ValidationError

from rocky_dagster import IdempotencyLedger, idempotent_op, ledger_job
from rocky_dagster.ledger import EventKind, InvalidKeyError, Ledger, State
from rocky_dagster.step.keys import (
    FORCE_TAG,
    KEY_TAG,
    RUN_KEY_TAG,
    KeySource,
    attempt_run_key,
    resolve_key,
    schedule_key,
)
from rocky_dagster.step.presentation import step_decisions

# --- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "user_key", "expected_base", "source"),
    [
        ({}, "fn-key", "fn-key", KeySource.KEY_FN),
        ({KEY_TAG: "tagged", RUN_KEY_TAG: "rk"}, "fn-key", "fn-key", KeySource.KEY_FN),
        ({KEY_TAG: "tagged", RUN_KEY_TAG: "rk"}, None, "tagged", KeySource.TAG),
        ({RUN_KEY_TAG: "rk"}, None, "rk", KeySource.RUN_KEY),
        ({KEY_TAG: "  ", RUN_KEY_TAG: "rk"}, None, "rk", KeySource.RUN_KEY),
    ],
)
def test_base_key_precedence(tags, user_key, expected_base, source) -> None:
    resolved = resolve_key(tags, "load", user_key=user_key)
    assert (resolved.base, resolved.source) == (expected_base, source)
    assert resolved.ledger_key == f"{expected_base}/load"


def test_no_key_means_unguarded_and_a_partition_alone_keys_only_assets() -> None:
    assert not resolve_key({}, "load").guarded
    assert not resolve_key({}, "load", partition="2024-06-01").guarded
    asset = resolve_key({}, "orders", partition="2024-06-01", asset_key="shop/orders")
    assert (asset.base, asset.source) == ("shop/orders/2024-06-01", KeySource.ASSET_PARTITION)
    assert asset.ledger_key == "shop/orders/2024-06-01"  # the asset named once
    keyed = resolve_key(
        {KEY_TAG: "k"}, "shop__orders", partition="2024-06-01", asset_key="shop/orders"
    )
    assert keyed.ledger_key == "k/2024-06-01/shop/orders"  # <base>/<partition>/<asset key>


def test_two_partitions_of_one_keyed_run_never_share_a_key() -> None:
    a = resolve_key({RUN_KEY_TAG: "backfill"}, "load", partition="2024-06-01")
    b = resolve_key({RUN_KEY_TAG: "backfill"}, "load", partition="2024-06-02")
    assert a.ledger_key == "backfill/2024-06-01/load" and a.ledger_key != b.ledger_key
    assert a.base == b.base == "backfill"  # the run tag keeps the plain base


def test_bad_keys_name_their_source() -> None:
    with pytest.raises(InvalidKeyError, match="from key_fn"):
        resolve_key({}, "load", user_key="")
    with pytest.raises(InvalidKeyError, match="from tag"):
        resolve_key({KEY_TAG: "a\nb"}, "load")


def test_tag_names_and_derived_keys() -> None:
    assert attempt_run_key("k", 0) == "k" and attempt_run_key("k", 2) == "k#2"
    at = datetime(2024, 6, 1, 2, tzinfo=UTC)
    assert schedule_key("nightly", at) == "nightly@2024-06-01T02:00:00+00:00"


# --- resource configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dedup_on": "sometimes"}, "dedup_on"),
        ({"on_fingerprint_mismatch": "warn"}, "on_fingerprint_mismatch"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"retention_days": -1}, "retention_days"),
        ({"in_flight_ttl_hours": 0}, "in_flight_ttl_hours"),
        ({"url": "mysql://db/ledger"}, "url"),
    ],
)
def test_bad_resource_config_fails_at_definition_naming_the_field(kwargs, field) -> None:
    with pytest.raises(ValidationError) as info:
        IdempotencyLedger(**kwargs)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


@idempotent_op
def noop(context) -> dict:
    return {}


def _noop_graph() -> None:
    noop()


def test_bad_policy_from_an_env_var_fails_at_launch_before_any_work(
    instance: DagsterInstance, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROCKY_TEST_DEDUP_ON", "sometimes")
    resource = IdempotencyLedger(dedup_on=EnvVar("ROCKY_TEST_DEDUP_ON"))  # fine until resolved
    job = ledger_job(_noop_graph, name="env_policy", ledger=resource)
    with pytest.raises(DagsterResourceFunctionError) as info:
        job.execute_in_process(instance=instance, tags={KEY_TAG: "k"})
    assert "dedup_on" in str(info.value.__cause__)
    assert ledger.entries() == []


def test_zero_lease_from_run_config_fails_at_launch(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    job = ledger_job(
        _noop_graph, name="launch_config", ledger=IdempotencyLedger.configure_at_launch()
    )
    with pytest.raises(DagsterResourceFunctionError) as info:
        job.execute_in_process(
            instance=instance,
            tags={KEY_TAG: "k"},
            run_config={"resources": {"ledger": {"config": {"lease_seconds": 0}}}},
        )
    assert "lease_seconds" in str(info.value.__cause__)
    assert ledger.entries() == []


def test_env_var_url_is_resolved_when_the_run_starts(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROCKY_TEST_LEDGER_URL", ledger_url)
    monkeypatch.delenv("ROCKY_LEDGER_URL")
    job = ledger_job(
        _noop_graph, name="env_url", ledger=IdempotencyLedger(url=EnvVar("ROCKY_TEST_LEDGER_URL"))
    )
    assert job.execute_in_process(instance=instance, tags={KEY_TAG: "env"}).success
    assert ledger.get("env/noop").state == State.SUCCEEDED


# --- what happens around the body --------------------------------------------------------------


class _BrokenStore(IOManager):
    def handle_output(self, context, obj) -> None:
        raise OSError("disk full")

    def load_input(self, context):  # pragma: no cover - never reached
        raise NotImplementedError


def test_a_step_whose_output_cannot_be_stored_ends_failed_not_in_flight(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    job = ledger_job(
        _noop_graph,
        name="broken_store",
        ledger=IdempotencyLedger(),
        executor_def=in_process_executor,
        resource_defs={"io_manager": io_manager(lambda _: _BrokenStore())},
    )
    result = job.execute_in_process(instance=instance, tags={KEY_TAG: "io"}, raise_on_error=False)
    assert not result.success
    assert ledger.get("io/noop").state == State.FAILED


def test_unkeyed_run_is_unguarded_and_says_so(instance: DagsterInstance, ledger: Ledger) -> None:
    job = ledger_job(_noop_graph, name="unkeyed", ledger=IdempotencyLedger())
    result = job.execute_in_process(instance=instance)
    assert result.success
    assert ledger.entries() == []
    assert step_decisions(instance, result.run_id)["noop"] == "unguarded"
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("runs UNGUARDED" in m for m in messages)


def test_force_tag_reruns_a_succeeded_key_as_an_audited_override(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    job = ledger_job(_noop_graph, name="forced", ledger=IdempotencyLedger())
    first = job.execute_in_process(instance=instance, tags={KEY_TAG: "f"})
    forced = job.execute_in_process(instance=instance, tags={KEY_TAG: "f", FORCE_TAG: "force"})
    assert step_decisions(instance, forced.run_id)["noop"] == "proceed"
    entry = ledger.get("f/noop")
    assert entry.run_id == forced.run_id and entry.prior_run_id == first.run_id
    assert EventKind.FORCED in [e.kind for e in ledger.history("f/noop")]


def test_a_body_whose_claim_was_taken_over_fails_instead_of_finalizing(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    @idempotent_op
    def overtaken(context) -> dict:
        # meanwhile an operator frees the claim and another run takes the key
        ledger.release("lost-1/overtaken")
        ledger.claim("lost-1/overtaken", "another-run")
        return {"rows": 1}

    def graph() -> None:
        overtaken()

    job = ledger_job(graph, name="overtaken_job", ledger=IdempotencyLedger())
    result = job.execute_in_process(
        instance=instance, tags={KEY_TAG: "lost-1"}, raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    description = failure.event_specific_data.user_failure_data.description
    assert "lost its claim" in description
    assert "Run another-run holds the key now" in description  # says what became of it
    entry = ledger.get("lost-1/overtaken")
    assert (entry.state, entry.run_id) == (State.IN_FLIGHT, "another-run")


def test_a_job_key_fn_keys_every_guarded_step_and_tags_the_run(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    job = ledger_job(
        _noop_graph,
        name="job_key_fn",
        ledger=IdempotencyLedger(),
        key_fn=lambda context: f"invoice-{context.run.tags['invoice']}",
    )
    result = job.execute_in_process(instance=instance, tags={"invoice": "77"})
    assert ledger.get("invoice-77/noop").state == State.SUCCEEDED
    assert instance.get_run_by_id(result.run_id).tags[KEY_TAG] == "invoice-77"
