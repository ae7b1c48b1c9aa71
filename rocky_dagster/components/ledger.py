"""`IdempotencyLedgerComponent`: the ledger declared in ``defs.yaml``.

Several components of one project may each bring the ledger (this one, every
`PipelinesComponent`); Dagster refuses to merge two *different* resources under one key, so
equal settings always yield the very same resource and sensor objects (`shared_ledger_defs`).
"""

from __future__ import annotations

import threading
from typing import Literal

import dagster as dg
from dagster import EnvVar
from pydantic import Field, field_validator

from rocky_dagster.ledger import LedgerConfigError, check_url
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.sensors.run_requests import ledger_run_status_sensors

_FIELDS = IdempotencyLedger.model_fields
_RESOURCES: dict[str, IdempotencyLedger] = {}
_SHARED_LOCK = threading.Lock()


class LedgerSettings(dg.Resolvable, dg.Model):
    """Where the ledger lives and its policy: the fields of the `IdempotencyLedger` resource."""

    url: str | None = Field(
        default=None,
        description=(
            "Ledger location (sqlite:///relative.db, sqlite:////absolute.db, "
            "postgresql://user@host:5432/db). Prefer url_env for anything with a password: a url "
            "given here is shown in the Dagster UI. Default: $ROCKY_LEDGER_URL, else "
            "$DAGSTER_HOME/rocky_ledger.db."
        ),
        examples=["sqlite:///ledger.db"],
    )
    url_env: str | None = Field(
        default=None,
        description=(
            "Name of an environment variable holding the ledger url, read in each process that "
            "uses the ledger (the UI shows only the variable's name)."
        ),
        examples=["ROCKY_LEDGER_URL"],
    )
    dedup_on: Literal["success", "any"] = Field(
        default="success", description=_FIELDS["dedup_on"].description
    )
    retention_days: float = Field(
        default=30.0, gt=0, description=_FIELDS["retention_days"].description
    )
    in_flight_ttl_hours: float = Field(
        default=24.0, gt=0, description=_FIELDS["in_flight_ttl_hours"].description
    )
    lease_seconds: float = Field(
        default=120.0, gt=0, description=_FIELDS["lease_seconds"].description
    )
    on_fingerprint_mismatch: Literal["error", "ignore"] = Field(
        default="error", description=_FIELDS["on_fingerprint_mismatch"].description
    )
    replay_skips: bool = Field(default=False, description=_FIELDS["replay_skips"].description)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        """A url naming no file or an unknown scheme fails `dg check yaml`, not the first step."""
        if value is not None and value.strip():
            try:
                check_url(value.strip())
            except LedgerConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    def resource(self) -> IdempotencyLedger:
        """The resource these settings describe (url_env wins over url)."""
        return IdempotencyLedger(
            url=EnvVar(self.url_env) if self.url_env else self.url,
            dedup_on=self.dedup_on,
            retention_days=self.retention_days,
            in_flight_ttl_hours=self.in_flight_ttl_hours,
            lease_seconds=self.lease_seconds,
            on_fingerprint_mismatch=self.on_fingerprint_mismatch,
            replay_skips=self.replay_skips,
        )


def shared_ledger_defs(
    settings: LedgerSettings,
    *,
    resource_key: str = RESOURCE_KEY,
    sensors: bool = True,
    sensor_interval_seconds: int = 10,
) -> dg.Definitions:
    """The ledger resource (one object per distinct setting, so components merge) and, when
    `sensors`, the run-status sensors. Two components adding the sensors collide on their names
    at load ("Duplicate definition found for rocky_ledger_on_failure"): one set per project."""
    identity = settings.model_dump_json(include=set(LedgerSettings.model_fields))
    with _SHARED_LOCK:
        resource = _RESOURCES.get(identity)
        if resource is None:
            resource = _RESOURCES[identity] = settings.resource()
    return dg.Definitions(
        resources={resource_key: resource},
        sensors=ledger_run_status_sensors(
            minimum_interval_seconds=sensor_interval_seconds, resource_key=resource_key
        )
        if sensors
        else None,
    )


class IdempotencyLedgerScaffolder(dg.Scaffolder):
    """``dg scaffold defs rocky_dagster.IdempotencyLedgerComponent NAME``: a working defs.yaml."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        dg.scaffold_component(
            request, {"url_env": "ROCKY_LEDGER_URL", "dedup_on": "success", "lease_seconds": 120}
        )


@dg.scaffold_with(IdempotencyLedgerScaffolder)
class IdempotencyLedgerComponent(dg.Component, LedgerSettings):
    """The idempotency ledger for assets and ops you guard yourself.

    Brings the ``ledger`` resource that `idempotent_asset`, `idempotent_op` and the pipeline ops
    ask before they work, and the run-status sensors that settle the claims of runs that
    failed, were canceled or crashed. Equal settings in several components share one resource.

    Examples:
        .. code-block:: yaml

            # defs/ledger/defs.yaml
            type: rocky_dagster.IdempotencyLedgerComponent
            attributes:
              url_env: ROCKY_LEDGER_URL   # unset: $DAGSTER_HOME/rocky_ledger.db
              dedup_on: success
              lease_seconds: 120
    """

    resource_key: str = Field(
        default=RESOURCE_KEY,
        description=(
            "Resource key the ledger is bound to (and the run-status sensors read). Guarded "
            "steps must name the same key: resource_key= on the decorators, or the "
            "PipelinesComponent's resource_key."
        ),
        examples=["ledger", "warehouse_ledger"],
    )
    sensors: bool = Field(
        default=True,
        description=(
            "Add the run-status sensors (running by default) that settle claims of failed, "
            "canceled and crashed runs. One set per project: turn it off where another "
            "component (or the project's own Definitions) already adds them."
        ),
    )
    sensor_interval_seconds: int = Field(
        default=10, gt=0, description="Minimum interval of the run-status sensors, in seconds."
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return shared_ledger_defs(
            self,
            resource_key=self.resource_key,
            sensors=self.sensors,
            sensor_interval_seconds=self.sensor_interval_seconds,
        )
