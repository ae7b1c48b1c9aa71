"""`pipeline_op`: one guarded op for any of the five pipelines, built from its config object.

The op runs ``config.run(claim=...)`` under `idempotent_op`, with ``config.fingerprint()`` as the claim's
fingerprint (the same key must keep naming the same work), and returns ``result.summary()``: the
small JSON dict the ledger keeps and later runs replay. Every pipeline op has an optional
``after`` input of type Nothing, so ops can be ordered without passing data:

.. code-block:: python

    @ledger_job
    def nightly():
        loaded = pipeline_op(REPLICATION, name="replicate")()
        pipeline_op(QUALITY, name="check")(after=pipeline_op(MODELS, name="build")(after=loaded))

`replication_op`, `transformation_op`, `quality_op`, `snapshot_op` and `load_op` are the same
op, each also checking that it was given its own pipeline type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    Failure,
    In,
    MetadataValue,
    Nothing,
    OpDefinition,
    Output,
    RetryPolicy,
    multi_asset_check,
)

from rocky_dagster.decorators.ops import idempotent_op
from rocky_dagster.resource import RESOURCE_KEY
from rocky_dagster.step.guard import KeyFn, StepGuard, running_claim
from rocky_dagster.step.keys import GUARDED_OP_TAG

if TYPE_CHECKING:
    from rocky_dagster.pipelines import (
        LoadPipeline,
        PipelineResult,
        QualityPipeline,
        ReplicationPipeline,
        SnapshotPipeline,
        TransformationPipeline,
    )

AFTER = "after"


class PipelineOpOptions(TypedDict, total=False):
    """The keyword arguments of `pipeline_op` (see there), taken by the typed forms too."""

    name: str | None
    key_fn: KeyFn | None
    retry_policy: RetryPolicy | None
    tags: Mapping[str, str] | None
    description: str | None
    resource_key: str


def replication_op(
    config: ReplicationPipeline, **options: Unpack[PipelineOpOptions]
) -> OpDefinition:
    """`pipeline_op` for a replication pipeline: a guarded op copying source tables into the warehouse (`ReplicationPipeline`).

    Kept for readability and a type check: same arguments, same op as `pipeline_op`.
    """
    return _typed("replication", config, options)


def transformation_op(
    config: TransformationPipeline, **options: Unpack[PipelineOpOptions]
) -> OpDefinition:
    """`pipeline_op` for a transformation pipeline: a guarded op building SQL models in dependency order (`TransformationPipeline`).

    Kept for readability and a type check: same arguments, same op as `pipeline_op`.
    """
    return _typed("transformation", config, options)


def quality_op(config: QualityPipeline, **options: Unpack[PipelineOpOptions]) -> OpDefinition:
    """`pipeline_op` for a quality pipeline: a guarded op evaluating data checks.

    Every check is reported (output metadata, one log line per failed check); a failed
    error-severity check then fails the op, so its claim is finalized failed. For assets, use
    `quality_checks`, which reports each check as an `AssetCheckResult`.
    """
    return _typed("quality", config, options)


def quality_checks(
    config: QualityPipeline,
    *,
    name: str = "quality_checks",
    asset_key_for_table: Callable[[str], AssetKey] | None = None,
    blocking: bool = False,
    key_fn: KeyFn | None = None,
    description: str | None = None,
    resource_key: str = RESOURCE_KEY,
) -> AssetChecksDefinition:
    """The checks of a `QualityPipeline` as Dagster asset checks, guarded by the ledger.

    One ``@multi_asset_check`` op with a spec per check that names a table (the asset is
    ``asset_key_for_table(table)``, default ``AssetKey(table)``); each evaluation is reported
    as an `AssetCheckResult` (error / warn severity kept). After reporting, a failed
    error-severity check fails the step, so its claim is finalized failed. A run whose key
    already passed (or is being checked elsewhere) evaluates nothing and says so in its log.
    `resource_key` names the `IdempotencyLedger` resource (default ``"ledger"``).
    """
    to_key = asset_key_for_table or (lambda table: AssetKey(table))
    specs = [
        AssetCheckSpec(
            name=check.name,
            asset=to_key(check.target),
            description=check.description or check.rule(),
            blocking=blocking,
        )
        for check in config.checks
        if check.target
    ]
    if not specs:
        raise ValueError("quality_checks: no check names a table, so none can be an asset check")
    fingerprint = config.fingerprint()

    @multi_asset_check(
        specs=specs,
        name=name,
        description=description or f"quality checks on {config.warehouse}",
        can_subset=True,  # a skipped run yields no evaluations
        op_tags={GUARDED_OP_TAG: "true", "rocky/pipeline": "quality"},
        required_resource_keys={resource_key},
    )
    def _checks(context) -> Iterator[Any]:
        from rocky_dagster.pipelines import QualityChecksFailed

        guard = StepGuard(
            context,
            getattr(context.resources, resource_key),
            key_fn=key_fn,
            fingerprint=fingerprint,
            pipeline="quality",
            skip_event=True,
            resource_key=resource_key,
        )
        with guard.lifecycle() as step:
            if not step.should_run:
                return  # its decision and replayed summary are on the step's engine event
            failed = None
            try:
                result = config.run(claim=running_claim(context))
            except QualityChecksFailed as exc:
                failed, result = exc, exc.result
            targets = {(spec.asset_key, spec.name) for spec in specs}
            summary = result.summary()
            for check in result.checks:
                if check.table and (to_key(check.table), check.name) in targets:
                    yield step.emit(_check_result(check, to_key(check.table)), summary)
            step.check_not_lost()
            step.record_summary(summary)
            if failed is not None:
                raise Failure(description=str(failed), allow_retries=False)

    return _checks


def _check_result(check: Any, asset_key: AssetKey) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=asset_key,
        check_name=check.name,
        passed=check.passed,
        severity=AssetCheckSeverity.ERROR if check.severity == "error" else AssetCheckSeverity.WARN,
        metadata=check.metadata(),
        description=check.description,
    )


def snapshot_op(config: SnapshotPipeline, **options: Unpack[PipelineOpOptions]) -> OpDefinition:
    """`pipeline_op` for a snapshot pipeline: a guarded op recording SCD-2 history of a table (`SnapshotPipeline`).

    Kept for readability and a type check: same arguments, same op as `pipeline_op`.
    """
    return _typed("snapshot", config, options)


def load_op(config: LoadPipeline, **options: Unpack[PipelineOpOptions]) -> OpDefinition:
    """`pipeline_op` for a load pipeline: a guarded op loading CSV / JSON-lines files into tables (`LoadPipeline`).

    Kept for readability and a type check: same arguments, same op as `pipeline_op`.
    """
    return _typed("load", config, options)


def pipeline_op(
    pipeline: Any,
    *,
    name: str | None = None,
    key_fn: KeyFn | None = None,
    retry_policy: RetryPolicy | None = None,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    resource_key: str = RESOURCE_KEY,
) -> OpDefinition:
    """A guarded op running `pipeline` (any of the five pipeline configs) once per key.

    The op's fingerprint is ``pipeline.fingerprint()`` (the same key must keep naming the same
    work), it returns ``result.summary()`` (what the ledger keeps and a skip replays) with the
    pipeline's figures as output metadata, and it has an optional ``after`` input of type
    Nothing for ordering. A quality pipeline reports every check, then fails the op when an
    error-severity check failed.

    Args:
        pipeline: a `ReplicationPipeline`, `TransformationPipeline`, `QualityPipeline`,
            `SnapshotPipeline` or `LoadPipeline`.
        name: the op name (default: the pipeline type).
        key_fn: ``key_fn(context) -> str | None``, this op's own base key (see `idempotent_op`).
        retry_policy: an op retry policy; a retry of the same run re-enters its claim.
        tags: extra op tags.
        description: the op description (default: the pipeline type and warehouse).
        resource_key: the resource key of the `IdempotencyLedger` (default ``"ledger"``).

    Examples:
        .. code-block:: python

            load = pipeline_op(LoadPipeline(warehouse="wh.db", directory="drop", table="t"))

            @ledger_job
            def nightly():
                pipeline_op(TransformationPipeline(warehouse="wh.db", models_dir="models"))(
                    after=load()
                )
    """
    pipeline_type = getattr(type(pipeline), "pipeline_type", None)
    if pipeline_type not in PIPELINE_TYPES or not callable(getattr(pipeline, "run", None)):
        raise TypeError(
            "pipeline_op needs a pipeline config object (ReplicationPipeline, "
            "TransformationPipeline, QualityPipeline, SnapshotPipeline or LoadPipeline), got "
            f"{type(pipeline).__name__}"
        )
    fingerprint = pipeline.fingerprint()
    quality = pipeline_type == "quality"

    def run_pipeline(context: Any) -> Iterator[Any]:
        """Run the pipeline under the step's claim and return its summary (replayed on a
        skip). The warehouse writes commit with the claim's effect marker: a zombie of this
        key's generation cannot apply them, and an adopter that finds them applied returns
        the recorded summary instead of doing the work again."""
        if quality:
            yield from _run_quality(context, pipeline)
            return
        result = pipeline.run(claim=running_claim(context))
        if result.already_applied:
            context.log.info(_already_applied_message(result))
        yield Output(result.summary(), metadata=_result_metadata(result))

    run_pipeline.__name__ = name or pipeline_type
    return idempotent_op(
        name=name or pipeline_type,
        description=description or f"{pipeline_type} pipeline on {pipeline.warehouse}",
        ins={AFTER: In(Nothing, description="Run after these steps (ordering only).")},
        tags={"rocky/pipeline": pipeline_type, **(tags or {})},
        retry_policy=retry_policy,
        key_fn=key_fn,
        fingerprint_fn=lambda _context: fingerprint,
        pipeline=pipeline_type,
        resource_key=resource_key,
    )(run_pipeline)


PIPELINE_TYPES = ("replication", "transformation", "quality", "snapshot", "load")


def _typed(pipeline_type: str, config: Any, options: PipelineOpOptions) -> OpDefinition:
    actual = getattr(type(config), "pipeline_type", None)
    if actual != pipeline_type or not callable(getattr(config, "run", None)):
        raise TypeError(
            f"{pipeline_type}_op needs a {pipeline_type.title()}Pipeline config object, got "
            f"{type(config).__name__}"
            + (f" (a {actual} pipeline: use {actual}_op or pipeline_op)" if actual else "")
        )
    return pipeline_op(config, **options)


def _run_quality(context: Any, config: Any) -> Iterator[Any]:
    from rocky_dagster.pipelines import QualityChecksFailed

    failed: QualityChecksFailed | None = None
    try:
        result = config.run(claim=running_claim(context))
    except QualityChecksFailed as exc:
        failed, result = exc, exc.result
    for check in result.checks:
        if not check.passed:
            level = context.log.error if check.severity == "error" else context.log.warning
            level(
                f"quality check {check.table or '-'}.{check.name} ({check.severity}) failed: "
                f"{check.failing_rows} failing row(s); {check.description}"
                + (f"; {check.error}" if check.error else "")
            )
    meta = {**_result_metadata(result), **_checks_metadata(result)}
    if failed is not None:
        raise Failure(description=str(failed), metadata=meta, allow_retries=False)
    yield Output(result.summary(), metadata=meta)


def _already_applied_message(result: PipelineResult) -> str:
    return (
        "rocky_dagster: an earlier holder of this claim already committed the work to the "
        "warehouse (its effect marker is there); nothing was applied again and its recorded "
        "result is stamped"
    )


def _result_metadata(result: PipelineResult) -> dict[str, Any]:
    return {
        "rocky/already_applied": MetadataValue.bool(bool(result.already_applied)),
        "rows_read": MetadataValue.int(result.rows_read),
        "rows_changed": MetadataValue.int(result.rows_changed),
        "tables_touched": MetadataValue.json(list(result.tables_touched)),
        "duration_seconds": MetadataValue.float(float(result.duration_seconds)),
    }


def _checks_metadata(result: PipelineResult) -> dict[str, Any]:
    checks = [
        {
            "name": c.name,
            "table": c.table,
            "kind": c.kind,
            "column": c.column,
            "severity": c.severity,
            "passed": c.passed,
            "failing_rows": c.failing_rows,
            "description": c.description,
        }
        for c in result.checks
    ]
    return {
        "checks": MetadataValue.json(checks),
        "checks_failed": MetadataValue.int(sum(not c.passed for c in result.checks)),
    }
