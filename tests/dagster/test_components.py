"""The ledger declared in defs.yaml: what `IdempotencyLedgerComponent` builds, on a real instance."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster.components.testing import create_defs_folder_sandbox

from rocky_dagster import IdempotencyLedger, IdempotencyLedgerComponent, idempotent_op, ledger_job
from rocky_dagster.ledger import Ledger, State

TYPE = "rocky_dagster.IdempotencyLedgerComponent"


def _defs(attributes: dict) -> dg.Definitions:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            IdempotencyLedgerComponent,
            defs_yaml_contents={"type": TYPE, "attributes": attributes},
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (_component, defs):
            return defs


@idempotent_op
def counted(context) -> dict:
    return {"done": 1}


@ledger_job
def counted_job() -> None:
    counted()


def test_scaffolded_defs_yaml_declares_the_env_var_url(tmp_path: Path) -> None:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(IdempotencyLedgerComponent)
        text = (path / "defs.yaml").read_text()
    assert "IdempotencyLedgerComponent" in text
    assert "url_env: ROCKY_LEDGER_URL" in text


def test_the_component_brings_the_resource_and_the_run_status_sensors(
    instance: dg.DagsterInstance, ledger: Ledger, ledger_url: str
) -> None:
    defs = _defs(
        {
            "url": ledger_url,
            "lease_seconds": 30,
            "sensor_interval_seconds": 7,
            "replay_skips": True,
        }
    )
    resource = defs.resources["ledger"]
    assert isinstance(resource, IdempotencyLedger)
    assert resource.lease_seconds == 30
    assert resource.replay_skips is True
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {
        "rocky_ledger_on_failure",
        "rocky_ledger_on_canceled",
        "rocky_ledger_on_success",
    }
    assert {s.minimum_interval_seconds for s in sensors.values()} == {7}
    # a user's own guarded job runs on the declared ledger, once per key
    job = dg.Definitions.merge(defs, dg.Definitions(jobs=[counted_job])).get_job_def("counted_job")
    for _ in range(2):
        assert job.execute_in_process(
            instance=instance, tags={"rocky/idempotency_key": "k"}
        ).success
    entry = ledger.get("k/counted")
    assert entry is not None and entry.state == State.SUCCEEDED
    assert [e.kind.value for e in ledger.history("k/counted")] == [
        "claimed",
        "succeeded",
        "skipped_completed",
    ]


def test_url_env_is_read_where_the_ledger_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    defs = _defs({"url_env": "ROCKY_TEST_COMPONENT_URL"})
    resource = defs.resources["ledger"]
    monkeypatch.setenv("ROCKY_TEST_COMPONENT_URL", "sqlite:///from_env.db")
    assert isinstance(resource.url, dg.EnvVar)
    assert resource.url.get_value() == "sqlite:///from_env.db"


def test_equal_settings_in_two_components_share_one_resource() -> None:
    """Two defs.yaml files declaring the same ledger must merge (Dagster refuses two different
    resources under one key); only one of them adds the sensors."""
    first, second = _defs({"dedup_on": "any"}), _defs({"dedup_on": "any", "sensors": False})
    merged = dg.Definitions.merge(first, second)
    assert merged.resources["ledger"] is first.resources["ledger"]
    merged.get_repository_def()


@pytest.mark.parametrize(
    ("attributes", "field"),
    [
        ({"url": "sqlite://ledger.db"}, "url"),
        ({"dedup_on": "sometimes"}, "dedup_on"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_attributes_fail_at_load_naming_the_field(attributes: dict, field: str) -> None:
    with pytest.raises(Exception) as info:
        _defs(attributes)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert field in "\n".join(chain)
