"""`pipeline_assets`: one guarded, subsettable multi-asset per pipeline, keyed by the tables it
writes (see `pipeline_specs` for the map); quality pipelines become guarded asset checks.

A run claims ``<base key>/<asset key>`` (partition folded in) for each *selected* asset; assets
already done skip (an observation names the run that did them) and the pipeline runs narrowed to
the assets that proceed — replication copies only those tables, transformation builds only those
models — so a subset launch does only the subset's work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
    multi_asset_check,
)

from rocky_dagster.decorators.multi_asset import AssetKeyFn
from rocky_dagster.decorators.pipeline_specs import (
    PipelinePlan,
    TableAsset,
    TableCheck,
    plan_pipeline,
)
from rocky_dagster.ledger import Claim
from rocky_dagster.pipelines import (
    PipelineConfig,
    PipelineResult,
    QualityChecksFailed,
    QualityPipeline,
    ReplicationPipeline,
    TransformationPipeline,
)
from rocky_dagster.resource import RESOURCE_KEY
from rocky_dagster.step.guard import StepGuard
from rocky_dagster.step.input_versions import pipeline_input_state
from rocky_dagster.step.key_inheritance import CLAIMS_PER_ASSET, check_claim_asset
from rocky_dagster.step.keys import CLAIMS_TAG, GUARDED_OP_TAG


def pipeline_assets(
    pipeline: PipelineConfig,
    *,
    name: str | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    partitions_def: Any = None,
    automation_condition: Any = None,
    key_fn: AssetKeyFn | None = None,
    resource_key: str = RESOURCE_KEY,
    key_by_inputs: bool = True,
) -> list[AssetsDefinition]:
    """The pipeline's tables as one guarded, subsettable multi-asset, in a list; a quality
    pipeline gives one guarded asset-check op per table it checks (one op across tables that
    different pipelines write would make blocking checks a dependency cycle).

    Args:
        pipeline: a `LoadPipeline`, `ReplicationPipeline`, `TransformationPipeline`,
            `SnapshotPipeline` or `QualityPipeline`.
        name: the op's name (default: the pipeline type).
        key_prefix: asset key prefix of every table (and of the tables it reads).
        group_name: the assets' group.
        partitions_def: partitions of the assets; each partition is keyed on its own.
        automation_condition: a declarative automation condition for every asset.
        key_fn: ``key_fn(context, asset_key) -> str | None`` (or ``key_fn(context)``), e.g.
            `input_versions_key`; default: the run's tags, then the partition.
        resource_key: the resource key of the `IdempotencyLedger` (default ``"ledger"``).
        key_by_inputs: a launch with no key (a Materialize click, ``dg launch``) keys each
            asset by what it reads: its upstream assets' data versions and the pipeline's
            input files (drops, source database, models), so unchanged inputs skip. False: such
            a launch runs unguarded (one key per run, from its tags, or none).

    Examples:
        .. code-block:: python

            defs = Definitions(
                assets=pipeline_assets(
                    TransformationPipeline(warehouse="wh.db", models_dir="models"),
                    group_name="warehouse",
                    key_fn=input_versions_key,
                    automation_condition=AutomationCondition.eager(),
                ),
                resources={"ledger": IdempotencyLedger()},
            )
    """
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    plan = plan_pipeline(pipeline, key_prefix=prefix)
    op_name = name or pipeline.pipeline_type
    if isinstance(pipeline, QualityPipeline):
        if partitions_def is not None:
            raise ValueError(
                f"pipeline_assets {op_name!r}: Dagster's asset checks take no partitions_def; "
                "leave it off for a quality pipeline (its key still comes from the run's tags)"
            )
        if not plan.checks:
            raise ValueError(f"pipeline_assets {op_name!r}: no check names a table")
        tables = sorted({check.table for check in plan.checks})
        return [
            _quality_checks(
                plan,
                [c for c in plan.checks if c.table == table],
                op_name if len(tables) == 1 else f"{op_name}__{table}",
                key_fn,
                resource_key,
                key_by_inputs,
            )
            for table in tables
        ]
    if not plan.assets:
        raise ValueError(f"pipeline_assets {op_name!r}: the pipeline writes no table")
    tables = {asset.key: asset for asset in plan.assets}
    fingerprint = pipeline.fingerprint()

    @multi_asset(
        specs=plan.asset_specs(group_name=group_name, automation_condition=automation_condition),
        name=op_name,
        can_subset=True,
        partitions_def=partitions_def,
        op_tags={
            GUARDED_OP_TAG: "true",
            CLAIMS_TAG: CLAIMS_PER_ASSET,
            "rocky/pipeline": pipeline.pipeline_type,
        },
        description=f"{pipeline.pipeline_type} pipeline on {pipeline.warehouse}",
        required_resource_keys={resource_key},
    )
    def _assets(context) -> Iterator[Any]:
        guard = StepGuard(
            context,
            getattr(context.resources, resource_key),
            asset_keys=[a.key for a in plan.assets if a.key in context.selected_asset_keys],
            key_fn=key_fn,
            fingerprint=fingerprint,
            pipeline=pipeline.pipeline_type,
            resource_key=resource_key,
            input_state=lambda: pipeline_input_state(pipeline),
            key_by_inputs=key_by_inputs,
        )
        with guard.lifecycle():
            guard.observe_skips(context)
            yield from guard.replays(context)
            proceeding = [tables[key] for key in guard.proceeding_keys()]
            if not proceeding:
                return
            claims = [guard.claim_for(asset.key).claim for asset in proceeding]
            result = narrow(pipeline, proceeding, plan).run(claim=effect_claim(op_name, claims))
            for asset in proceeding:
                stats = result.table(asset.table)
                yield guard.emit(
                    MaterializeResult(asset_key=asset.key, metadata=table_metadata(asset, stats)),
                    table_summary(asset, stats),
                    guard.claim_for(asset.key),
                )

    return [_assets]


@dataclass(frozen=True)
class StepClaims:
    """The claims a multi-asset step works under, as the one claim its warehouse transaction
    is fenced by: the same assets of the same generation name the same marker, and the
    newest holder of any of them holds the highest fence."""

    key: str
    generation: int
    fence: int
    run_id: str
    should_run: bool = True


def effect_claim(op_name: str, claims: Sequence[Claim | None]) -> Claim | StepClaims | None:
    """What `run(claim=...)` gets: the one claim, or the step's claims combined; None when a
    claim carries no generation (nothing to fence the warehouse writes by)."""
    held = [c for c in claims if c is not None]
    if not held or any(getattr(c, "generation", None) is None or c.fence is None for c in held):
        return None
    if len(held) == 1:
        return held[0]
    return StepClaims(
        key=f"{op_name}:" + "+".join(sorted(c.key for c in held)),
        generation=min(int(c.generation) for c in held),  # type: ignore[arg-type]
        fence=max(int(c.fence) for c in held),  # type: ignore[arg-type]
        run_id=held[0].run_id,
    )


def narrow(
    pipeline: PipelineConfig, proceeding: list[TableAsset], plan: PipelinePlan
) -> PipelineConfig:
    """The pipeline doing only the proceeding assets' work (the whole of it when all proceed)."""
    if len(proceeding) == len(plan.assets):
        return pipeline
    if isinstance(pipeline, ReplicationPipeline):
        return pipeline.for_tables([str(asset.source) for asset in proceeding])
    if isinstance(pipeline, TransformationPipeline):
        return pipeline.model_copy(update={"select": [asset.table for asset in proceeding]})
    return pipeline  # load and snapshot write one table: all or nothing


def table_summary(asset: TableAsset, stats: Any) -> dict[str, Any]:
    """What the ledger keeps with one table's success (replayed when a later run skips)."""
    return {"table": asset.table, **stats.model_dump(mode="json")}


def table_metadata(asset: TableAsset, stats: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"table": MetadataValue.text(asset.table)}
    for field, value in stats.model_dump(mode="json").items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            meta[field] = MetadataValue.int(value)
        elif isinstance(value, float):
            meta[field] = MetadataValue.float(value)
    return meta


# --- quality: asset checks ------------------------------------------------------------------


def _quality_checks(
    plan: PipelinePlan,
    checks: list[TableCheck],
    op_name: str,
    key_fn: AssetKeyFn | None,
    resource_key: str,
    key_by_inputs: bool = True,
) -> AssetChecksDefinition:
    """Some of a quality pipeline's checks as guarded asset checks, one ledger key per check.

    A check whose key already succeeded replays its recorded outcome (its evaluation carries
    the decision and the run that evaluated it); the others run together. After every result is
    reported, a failed error-severity (blocking) check fails the step: its claim is finalized
    failed, the passed ones are stamped.
    """
    pipeline = plan.pipeline
    assert isinstance(pipeline, QualityPipeline)
    by_key = {AssetCheckKey(check.asset, check.name): check for check in checks}
    claim_keys = {key: check_claim_asset(key) for key in by_key}
    fingerprint = pipeline.fingerprint()

    @multi_asset_check(
        specs=[spec for spec in plan.check_specs() if spec.key in by_key],
        name=op_name,
        can_subset=True,
        op_tags={GUARDED_OP_TAG: "true", CLAIMS_TAG: CLAIMS_PER_ASSET, "rocky/pipeline": "quality"},
        description=f"quality checks on {pipeline.warehouse}",
        required_resource_keys={resource_key},
    )
    def _checks(context) -> Iterator[Any]:
        selected = [k for k in by_key if k in context.selected_asset_check_keys]
        guard = StepGuard(
            context,
            getattr(context.resources, resource_key),
            asset_keys=[claim_keys[k] for k in selected],
            key_fn=key_fn,
            fingerprint=fingerprint,
            pipeline="quality",
            key_fn_subjects={claim_keys[k]: k.asset_key for k in selected},
            resource_key=resource_key,
            key_by_inputs=key_by_inputs,
        )
        with guard.lifecycle():
            proceeding = set(guard.proceeding_keys())
            for key in selected:
                held = guard.claim_for(claim_keys[key])
                if claim_keys[key] not in proceeding and held.claim is not None:
                    replay = _replayed_check(by_key[key], held.claim, guard.metadata(held))
                    if replay is not None:
                        yield replay
            todo = [by_key[k] for k in selected if claim_keys[k] in proceeding]
            if not todo:
                return
            wanted = {(c.table, c.name) for c in todo}
            narrowed = pipeline.model_copy(
                update={"checks": [c for c in pipeline.checks if (c.target, c.name) in wanted]}
            )
            failed: QualityChecksFailed | None = None
            try:
                claims = [
                    guard.claim_for(claim_keys[AssetCheckKey(c.asset, c.name)]).claim for c in todo
                ]
                result: PipelineResult = narrowed.run(claim=effect_claim(op_name, claims))
            except QualityChecksFailed as exc:
                failed, result = exc, exc.result
            outcomes = {(c.table, c.name): c for c in result.checks}
            for check in todo:
                outcome = outcomes.get((check.table, check.name))
                if outcome is None:
                    continue
                claim_key = claim_keys[AssetCheckKey(check.asset, check.name)]
                yield guard.emit(
                    AssetCheckResult(
                        asset_key=check.asset,
                        check_name=check.name,
                        passed=outcome.passed,
                        severity=_severity(outcome.severity),
                        metadata=outcome.metadata(),
                        description=outcome.description,
                    ),
                    _check_summary(outcome),
                    guard.claim_for(claim_key),
                )
                if outcome.passed or outcome.severity != "error":
                    guard.stamp(claim_key)
            if failed is not None:
                raise Failure(description=str(failed), allow_retries=False)

    return _checks


def _severity(severity: str) -> AssetCheckSeverity:
    return AssetCheckSeverity.ERROR if severity == "error" else AssetCheckSeverity.WARN


def _check_summary(outcome: Any) -> dict[str, Any]:
    return {
        "table": outcome.table,
        "check": outcome.name,
        "passed": outcome.passed,
        "severity": outcome.severity,
        "failing_rows": outcome.failing_rows,
    }


def _replayed_check(check: TableCheck, claim: Any, meta: dict[str, Any]) -> AssetCheckResult | None:
    """The recorded outcome of a check another run evaluated under the same key."""
    recorded = claim.result or {}
    if "passed" not in recorded:
        return None  # in flight elsewhere: nothing to report yet
    return AssetCheckResult(
        asset_key=check.asset,
        check_name=check.name,
        passed=bool(recorded["passed"]),
        severity=_severity(str(recorded.get("severity", "error"))),
        metadata=meta,
        description=f"replayed from run {claim.prior_run_id}: {check.description}",
    )


# --- the graph's sources --------------------------------------------------------------------


def external_assets(definitions: Iterable[Any]) -> list[AssetSpec]:
    """External assets for the tables the given pipeline assets read but none writes, so the
    graph shows each source as the root of its lineage."""
    definitions = list(definitions)
    written: set[AssetKey] = set()
    read: set[AssetKey] = set()
    for definition in definitions:
        if isinstance(definition, AssetsDefinition) and not isinstance(
            definition, AssetChecksDefinition
        ):
            written.update(definition.keys)
            for deps in definition.asset_deps.values():
                read.update(deps)
        if isinstance(definition, AssetsDefinition):
            read.update(key.asset_key for key in definition.check_keys)
    return [
        AssetSpec(key=key, description="Read by the pipelines, written elsewhere")
        for key in sorted(read - written, key=lambda k: k.to_user_string())
    ]
