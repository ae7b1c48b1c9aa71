"""`PipelinesComponent`: the warehouse's pipelines declared in ``defs.yaml``, as guarded assets.

Each entry of ``pipelines:`` is what `pipeline_from_dict` reads (``type:`` plus that pipeline's
fields) plus the Dagster options below; the component builds one guarded multi-asset per
pipeline (`pipeline_assets`), a job per pipeline, its schedule and sensor when asked, the
ledger resource and the run-status sensors. Relative paths in the pipeline fields are read from
the folder of the ``defs.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rocky_dagster.components.ledger import LedgerSettings, shared_ledger_defs
from rocky_dagster.pipelines import (
    PipelineConfig,
    PipelineConfigError,
    PipelineError,
    pipeline_from_dict,
)
from rocky_dagster.pipelines.registry import PIPELINE_TYPES
from rocky_dagster.resource import RESOURCE_KEY
from rocky_dagster.step.keys import KEY_TAG

PATH_FIELDS = ("warehouse", "source", "models_dir", "directory")
"""Pipeline fields naming files or folders: relative ones are read from the defs.yaml folder."""

DAGSTER_OPTIONS = (
    "name",
    "key_prefix",
    "group_name",
    "partitions",
    "automation_condition",
    "schedule",
    "sensor",
)


class PartitionsOptions(BaseModel):
    """How a pipeline's assets are partitioned (a partition is part of every ledger key)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["daily", "hourly", "weekly", "monthly", "static"] = Field(
        description="Time partitions from start_date, or static partitions named by values."
    )
    start_date: str | None = Field(default=None, description="First partition (time types).")
    end_date: str | None = Field(default=None, description="Last partition, exclusive.")
    timezone: str | None = Field(default=None, description="Time zone of the partitions.")
    values: list[str] | None = Field(default=None, description="The partitions (static type).")

    def build(self) -> dg.PartitionsDefinition:
        if self.type == "static":
            if not self.values:
                raise ValueError("partitions.values: a static partitioning needs its values")
            return dg.StaticPartitionsDefinition(self.values)
        if not self.start_date:
            raise ValueError(f"partitions.start_date: {self.type} partitions need a start_date")
        cls = {
            "daily": dg.DailyPartitionsDefinition,
            "hourly": dg.HourlyPartitionsDefinition,
            "weekly": dg.WeeklyPartitionsDefinition,
            "monthly": dg.MonthlyPartitionsDefinition,
        }[self.type]
        kwargs: dict[str, Any] = {"start_date": self.start_date}
        if self.end_date:
            kwargs["end_date"] = self.end_date
        if self.timezone:
            kwargs["timezone"] = self.timezone
        return cls(**kwargs)


class SensorOptions(BaseModel):
    """A sensor that requests a run when the pipeline's inputs changed, keyed by their state."""

    model_config = ConfigDict(extra="forbid")

    minimum_interval_seconds: int = Field(default=30, gt=0, description="Seconds between ticks.")
    running: bool = Field(default=False, description="Start the sensor running (default: off).")


class PipelineOptions(BaseModel):
    """The Dagster side of one pipeline entry (the rest of the entry is the pipeline's own)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str | None = Field(default=None, description="Name of the multi-asset op and job.")
    key_prefix: list[str] = Field(default_factory=list, description="Asset key prefix.")
    group_name: str | None = Field(default=None, description="Asset group in the UI.")
    partitions: PartitionsOptions | None = None
    automation_condition: Any = Field(
        default=None,
        description="A declarative automation condition, e.g. "
        "'{{ dg.AutomationCondition.eager() }}'.",
    )
    schedule: str | None = Field(default=None, description="Cron schedule of the pipeline's job.")
    sensor: SensorOptions | None = None

    @field_validator("key_prefix", mode="before")
    @classmethod
    def _prefix_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("automation_condition")
    @classmethod
    def _condition(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dg.AutomationCondition):
            raise ValueError(
                "must be an automation condition, e.g. '{{ dg.AutomationCondition.eager() }}' "
                f"or '{{{{ dg.AutomationCondition.on_cron(\"0 6 * * *\") }}}}', got {value!r}"
            )
        return value


class PipelinesScaffolder(dg.Scaffolder):
    """``dg scaffold defs rocky_dagster.PipelinesComponent NAME``: a working warehouse.

    Writes a defs.yaml with a load pipeline and a transformation over it, the model it builds
    (code, beside the defs.yaml) and a sample drop file in the project's ``data/`` folder, where
    the warehouse is written too: data stays out of the package's source tree.
    """

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        folder = request.target_path
        data = (request.project_root or folder) / "data"
        (data / "drops").mkdir(parents=True, exist_ok=True)
        (folder / "models").mkdir(parents=True, exist_ok=True)
        sample = data / "drops" / "orders_sample.csv"
        if not sample.exists():
            sample.write_text("order_id,customer,amount\n1,ada,12.50\n2,grace,7.00\n3,ada,3.25\n")
        (folder / "models" / "customer_totals.sql").write_text(
            "-- description: Order count and amount per customer\n"
            "SELECT customer, count(*) AS orders, sum(amount) AS amount\n"
            "FROM orders GROUP BY customer\n"
        )
        warehouse = SCAFFOLD_DATA + "/warehouse.db"
        dg.scaffold_component(
            request,
            {
                "pipelines": [
                    {
                        "type": "load",
                        "name": "load_orders",
                        "warehouse": warehouse,
                        "directory": SCAFFOLD_DATA + "/drops",
                        "pattern": "*.csv",
                        "table": "orders",
                        "group_name": "warehouse",
                    },
                    {
                        "type": "transformation",
                        "name": "build_models",
                        "warehouse": warehouse,
                        "models_dir": "models",
                        "group_name": "warehouse",
                    },
                ]
            },
        )


SCAFFOLD_DATA = "{{ context.project_root }}/data"
"""Where a scaffolded component keeps its data: the project's ``data/`` folder, not the package."""


@dg.scaffold_with(PipelinesScaffolder)
class PipelinesComponent(dg.Component, dg.Resolvable, dg.Model):
    """The warehouse's pipelines as guarded, subsettable assets, declared in YAML.

    One multi-asset per pipeline whose assets are the tables it writes (quality checks become
    asset checks on the tables they check), exactly once per key and asset: a run launched
    again with the same key, or by automation over unchanged inputs, materializes nothing and
    records an observation naming the run that did the work.

    Examples:
        .. code-block:: yaml

            # defs/warehouse/defs.yaml
            type: rocky_dagster.PipelinesComponent
            attributes:
              pipelines:
                - type: load
                  name: load_orders
                  warehouse: warehouse.db
                  directory: drops
                  table: orders
                  sensor: {minimum_interval_seconds: 30}
                - type: transformation
                  name: build_models
                  warehouse: warehouse.db
                  models_dir: models
                  automation_condition: "{{ dg.AutomationCondition.eager() }}"
                - type: quality
                  name: check_orders
                  warehouse: warehouse.db
                  checks:
                    - {kind: not_null, table: orders, column: order_id}
    """

    pipelines: Annotated[
        Sequence[Mapping[str, Any]],
        dg.Resolver.default(
            description=(
                "The pipelines: each a mapping with `type:` (load, replication, transformation, "
                "quality, snapshot) and that pipeline's fields, plus the optional Dagster "
                "options name, key_prefix, group_name, partitions, automation_condition, "
                "schedule (cron) and sensor."
            ),
            examples=[
                [
                    {
                        "type": "load",
                        "warehouse": "warehouse.db",
                        "directory": "drops",
                        "table": "orders",
                    }
                ]
            ],
        ),
    ] = Field(min_length=1)
    ledger: LedgerSettings | None = Field(
        default_factory=LedgerSettings,
        description=(
            "The ledger resource the pipelines ask (IdempotencyLedger fields), bound under "
            "resource_key. null: the project binds its own (e.g. an IdempotencyLedgerComponent)."
        ),
    )
    ledger_sensors: bool = Field(
        default=True,
        description=(
            "Add the run-status sensors that settle claims of failed, canceled and crashed "
            "runs; one set per project, so turn it off where another component adds them."
        ),
    )
    resource_key: str = Field(
        default=RESOURCE_KEY,
        description=(
            "Resource key of the ledger the pipelines ask (and `ledger:` is bound to); name "
            "the IdempotencyLedgerComponent's resource_key here when it brings the ledger."
        ),
        examples=["ledger", "warehouse_ledger"],
    )
    key_fn: Literal["inputs", "run", "input_versions"] = Field(
        default="inputs",
        description=(
            "How an asset is keyed. 'inputs' (default): the run's rocky/idempotency_key tag, "
            "run_key or partition, else what the asset reads (its upstream data versions and "
            "the pipeline's drop files, source database or models), so a launch with no tags "
            "over unchanged inputs skips. 'run': one key per run (the run's tag, run_key or "
            "partition), else unguarded. 'input_versions': always its code version and "
            "upstream data versions, even when the run carries a key."
        ),
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from rocky_dagster.decorators.pipeline_assets import pipeline_assets
        from rocky_dagster.step.input_versions import input_versions_key

        folder = Path(context.path)
        key_fn = input_versions_key if self.key_fn == "input_versions" else None
        assets: list[Any] = []
        jobs: list[Any] = []
        schedules: list[Any] = []
        sensors: list[Any] = []
        for index, entry in enumerate(self.pipelines):
            pipeline, options = _parse_entry(entry, folder, index)
            name = options.name or f"{pipeline.pipeline_type}_{index}"
            try:
                built = pipeline_assets(
                    pipeline,
                    name=name,
                    key_prefix=options.key_prefix or None,
                    group_name=options.group_name,
                    partitions_def=options.partitions.build() if options.partitions else None,
                    automation_condition=options.automation_condition,
                    key_fn=key_fn,
                    key_by_inputs=self.key_fn != "run",
                    resource_key=self.resource_key,
                )
            except (ValueError, PipelineError) as exc:
                raise PipelineConfigError(
                    f"pipelines[{index}] ({pipeline.pipeline_type}): {exc}"
                ) from None
            assets.extend(built)
            job = dg.define_asset_job(f"{name}_job", selection=_selection(built))
            jobs.append(job)
            if options.schedule:
                schedules.append(_keyed_schedule(name, job, options.schedule))
            if options.sensor:
                sensors.append(_input_sensor(name, job, pipeline, options.sensor))
        from rocky_dagster.decorators.pipeline_assets import external_assets

        checks = [a for a in assets if isinstance(a, dg.AssetChecksDefinition)]
        tables = [a for a in assets if not isinstance(a, dg.AssetChecksDefinition)]
        parts = [
            dg.Definitions(
                assets=[*tables, *external_assets(assets)], asset_checks=checks, jobs=jobs
            )
        ]
        parts.append(dg.Definitions(schedules=schedules or None, sensors=sensors or None))
        if self.ledger is not None:
            parts.append(
                shared_ledger_defs(
                    self.ledger, resource_key=self.resource_key, sensors=self.ledger_sensors
                )
            )
        elif self.ledger_sensors:
            from rocky_dagster.sensors.run_requests import ledger_run_status_sensors

            parts.append(
                dg.Definitions(sensors=ledger_run_status_sensors(resource_key=self.resource_key))
            )
        return dg.Definitions.merge(*parts)


def _parse_entry(
    entry: Mapping[str, Any], folder: Path, index: int
) -> tuple[PipelineConfig, PipelineOptions]:
    """Split one `pipelines:` entry into the pipeline config and its Dagster options, with
    errors naming the entry and the field."""
    where = f"pipelines[{index}]"
    if not isinstance(entry, Mapping):
        raise PipelineConfigError(f"{where}: must be a mapping with a 'type:', got {entry!r}")
    fields = dict(entry)
    options = {k: fields.pop(k) for k in DAGSTER_OPTIONS if k in fields}
    for name in PATH_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value and not os.path.isabs(value):
            fields[name] = str(folder / value)
    try:
        parsed_options = PipelineOptions.model_validate(options)
        pipeline = pipeline_from_dict(fields)
    except (ValidationError, PipelineConfigError, ValueError) as exc:
        kind = fields.get("type")
        label = f"{where} ({kind})" if kind in PIPELINE_TYPES else where
        raise PipelineConfigError(f"{label}: {exc}") from None
    return pipeline, parsed_options


def _selection(built: list[Any]) -> dg.AssetSelection:
    selection: dg.AssetSelection | None = None
    for definition in built:
        part = (
            dg.AssetSelection.checks(definition)
            if isinstance(definition, dg.AssetChecksDefinition)
            else dg.AssetSelection.assets(definition)
        )
        selection = part if selection is None else selection | part
    assert selection is not None
    return selection


def _keyed_schedule(name: str, job: Any, cron: str) -> dg.ScheduleDefinition:
    """One run per tick, keyed by the tick: a tick fired twice does the work once."""

    @dg.schedule(name=f"{name}_schedule", cron_schedule=cron, job=job)
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tick = context.scheduled_execution_time
        key = f"{name}@{tick.isoformat()}"
        return dg.RunRequest(run_key=key, tags={KEY_TAG: key})

    return _schedule


def _input_sensor(
    name: str, job: Any, pipeline: PipelineConfig, options: SensorOptions
) -> dg.SensorDefinition:
    """A run whenever the pipeline's inputs changed, keyed by their state: the same inputs are
    never worked on twice, however often the sensor ticks."""

    @dg.sensor(
        name=f"{name}_sensor",
        job=job,
        minimum_interval_seconds=options.minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING
        if options.running
        else dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> Any:
        state = _input_state(pipeline)
        if state is None:
            return dg.SkipReason(f"{name}: no input yet")
        key = f"{name}:inputs:{state}"
        return dg.RunRequest(run_key=key, tags={KEY_TAG: key})

    return _sensor


def _input_state(pipeline: PipelineConfig) -> str | None:
    """A digest of what the pipeline reads (file names, sizes and modification times)."""
    from rocky_dagster.step.input_versions import files_state, pipeline_input_paths

    paths = pipeline_input_paths(pipeline)
    if paths is None:  # snapshot, quality: the warehouse itself
        paths = [Path(pipeline.warehouse)]
    present = [p for p in paths if p.exists()]
    return files_state(present) if present else None
