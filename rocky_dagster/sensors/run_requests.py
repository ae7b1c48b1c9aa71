"""Sensors: reconcile finished runs, and ask the ledger before requesting a run.

`ledger_run_status_sensors` settles what hooks cannot see (a cancel, a killed process, a lost
stamp); `guard_run_requests` keeps a sensor or schedule from launching runs whose work is done
or under way. It asks the ledger (`Ledger.peek`: the claim decision, with no write) about the
keys the target job's steps would claim, derived as the steps derive them
(`key_inheritance.planned_ledger_keys`), so it restates no rule of its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    JobDefinition,
    RunRequest,
    RunsFilter,
    RunStatusSensorContext,
    RunStatusSensorDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    run_status_sensor,
)

from rocky_dagster.ledger import Claim, Decision, EventKind, Ledger, LedgerError
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.sensors.backoff import RequestBackoff
from rocky_dagster.step.key_inheritance import planned_ledger_keys
from rocky_dagster.step.keys import KEY_TAG, PARTITION_TAG, attempt_run_key, schedule_key
from rocky_dagster.step.presentation import settle_outcome_tag
from rocky_dagster.step.reconcile import FINISHED_STATUSES, reconcile_run

# --- run-status sensors --------------------------------------------------------------------------


def ledger_run_status_sensors(
    *,
    name_prefix: str = "rocky_ledger",
    minimum_interval_seconds: int = 10,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
    monitor_all_code_locations: bool = True,
    resource_key: str = RESOURCE_KEY,
) -> list[RunStatusSensorDefinition]:
    """Three sensors settling the claims of finished runs (docs/contract.md, "Dead holders").

    FAILURE → the run's claims are finalized failed; CANCELED → released; SUCCESS → claims still
    in flight are stamped succeeded. Each also settles the run's ``rocky/outcome`` tag from its
    own steps' decisions, so a re-execution never keeps the summary it copied from its parent.
    They take the ledger resource from Definitions (under `resource_key`, default
    ``"ledger"``), start
    RUNNING and watch every code location (CLI and in-process runs have none, and would be
    invisible otherwise). A ledger outage is logged, never raised: Dagster would move the cursor
    past the run anyway (run-status sensors are at-most-once), and the lease then settles it.
    They always return None, because a returned value ends the tick's batch of runs.
    """
    sensors = []
    for status, suffix, verb in (
        (DagsterRunStatus.FAILURE, "failure", "finalize as failed"),
        (DagsterRunStatus.CANCELED, "canceled", "release"),
        (DagsterRunStatus.SUCCESS, "success", "stamp as succeeded"),
    ):
        sensors.append(
            _status_sensor(
                status,
                name=f"{name_prefix}_on_{suffix}",
                description=(
                    f"rocky_dagster: {verb} the in-flight ledger claims of {status.value} runs"
                ),
                minimum_interval_seconds=minimum_interval_seconds,
                default_status=default_status,
                monitor_all_code_locations=monitor_all_code_locations,
                resource_key=resource_key,
            )
        )
    return sensors


def _status_sensor(
    status: DagsterRunStatus,
    *,
    name: str,
    description: str,
    minimum_interval_seconds: int,
    default_status: DefaultSensorStatus,
    monitor_all_code_locations: bool,
    resource_key: str,
) -> RunStatusSensorDefinition:
    def _sensor(context: RunStatusSensorContext, **resources: Any) -> None:
        ledger: IdempotencyLedger = resources[resource_key]
        run_id = context.dagster_run.run_id
        try:
            done = reconcile_run(
                ledger.open(),
                run_id,
                status,
                reason=f"run {run_id} is {status.value} (sensor {name})",
            )
        except Exception as exc:  # never raise: the cursor moves on regardless
            context.log.error(
                f"rocky_dagster: could not reconcile the ledger claims of run {run_id} "
                f"({status.value}): {exc}; their leases will expire and free them"
            )
            return None
        if done.settled or done.untouched:
            context.log.info(f"rocky_dagster: {done.describe()}")
        try:
            settle_outcome_tag(context.instance, run_id)
        except Exception as exc:  # a tag is for people: log it, never fail the tick
            context.log.warning(f"rocky_dagster: could not settle run {run_id}'s tags: {exc}")
        return None

    # Dagster hands a sensor the resources its parameters name: one named `resource_key`
    # (1.13 reads the signature, 1.12 the annotations)
    _sensor.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "context",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=RunStatusSensorContext,
            ),
            inspect.Parameter(
                resource_key, inspect.Parameter.KEYWORD_ONLY, annotation=IdempotencyLedger
            ),
        ]
    )
    _sensor.__annotations__ = {
        "context": RunStatusSensorContext,
        resource_key: IdempotencyLedger,
    }
    return run_status_sensor(
        run_status=status,
        name=name,
        description=description,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        monitor_all_code_locations=monitor_all_code_locations,
    )(_sensor)


# --- guarding run requests -----------------------------------------------------------------------

RequestKeyFn = Callable[[RunRequest], "str | None"]

DEFAULT_BACKOFF = RequestBackoff()
"""`guard_run_requests`' default: 1, 2, 4 … 32 minutes after a key's failures, then hourly."""


@dataclass(frozen=True)
class _Verdict:
    request: RunRequest
    key: str | None
    ledger_keys: tuple[str, ...] = ()
    reason: str | None = None  # set when the request is dropped


def guard_run_requests(
    context: Any,
    requests: RunRequest | Sequence[RunRequest],
    *,
    ledger: IdempotencyLedger | Ledger | None = None,
    job: Any = None,
    key_fn: RequestKeyFn | None = None,
    schedule_name: str | None = None,
    backoff: RequestBackoff | None = DEFAULT_BACKOFF,
    resource_key: str = RESOURCE_KEY,
) -> list[RunRequest] | SkipReason:
    """Drop the requests whose work is done or under way; key and re-key the rest.

    Call it at the end of a sensor or schedule and return what it returns: the requests to
    launch, or a `SkipReason` naming each key and the run that holds (or completed) it.

    A request's key is ``key_fn(request)``, else its ``rocky/idempotency_key`` tag, else its
    ``run_key``, else (in a schedule) ``<schedule name>@<scheduled execution time>``; a request
    with no key passes unchanged. The ledger is asked (with no write) what each guarded step of
    the target `job` would decide under that key: ops claim ``<key>/<step key>``, asset steps
    ``<key>/<asset key>`` for each asset (or check) the request selects, with the request's
    partition folded in, exactly as the steps derive them. A request is dropped when any of
    those keys is in flight in a live run, or when all of them are already done.

    A request let through gets the ``rocky/idempotency_key`` tag (the ledger key stays fixed)
    and, when the key has run before, the run_key ``<key>#<n>`` (n = that key's finished runs).
    Dagster never launches a sensor's run_key twice, even after a failure, so this is how a
    failed key is re-requested; a key that never ran keeps run_key ``<key>``.

    A key whose runs keep failing is re-requested with exponential backoff, not on every tick:
    after ``n`` failed (or canceled) runs of the key in a row since its last success, the
    request is dropped until ``min(base_seconds * factor ** (n - 1), max_seconds)`` has passed
    since the last of them ended, and the `SkipReason` says when the next retry is due. The
    runs are counted on the instance (runs tagged ``rocky/idempotency_key=<key>``, and the
    request's partition); without an instance, from the ledger's history of the key's guarded
    steps (``failed`` and ``released`` events). Time is the ledger's clock (``ledger.now()``).
    A success resets the count.

    Args:
        ledger: the `IdempotencyLedger` (or an open `Ledger`); default: the sensor's resource
            named `resource_key`.
        job: the job(s) the requests target, to know their guarded steps: a JobDefinition, or
            an asset job from ``define_asset_job`` (resolved through the sensor's repository).
        key_fn: ``key_fn(request) -> str | None``, overriding the tag / run_key rule.
        schedule_name: the schedule's name in its natural key (default: the one Dagster gives
            the context, else the job's name).
        backoff: a `RequestBackoff`, or None to re-request a failed key on every tick. The
            default, ``RequestBackoff(base_seconds=60, factor=2.0, max_seconds=3600)``, retries a
            transient fault within a minute, then waits 2, 4 … 32 minutes, then hourly: a key
            that fails for good costs one run an hour instead of one per tick (120 an hour at
            Dagster's 30-second default interval), and a fix is picked up within the hour. Pass
            a smaller policy for inputs that must catch up faster.
        resource_key: the resource key of the `IdempotencyLedger` when `ledger` is not given
            (default ``"ledger"``; the sensor must require it, e.g.
            ``@sensor(required_resource_keys={"warehouse_ledger"})``).
    """
    if backoff is not None and not isinstance(backoff, RequestBackoff):
        raise TypeError(
            "guard_run_requests: backoff must be a RequestBackoff or None, got "
            f"{type(backoff).__name__}; e.g. backoff=RequestBackoff(base_seconds=60)"
        )
    batch = [requests] if isinstance(requests, RunRequest) else list(requests)
    if not batch:
        return SkipReason("no run requests")
    store = _store(context, ledger, resource_key)
    # `type(...) in`: Dagster's asset job definitions are tuples (records) themselves
    jobs = list(job) if type(job) in (list, tuple) else [job] if job is not None else []
    scheduled = isinstance(context, ScheduleEvaluationContext)
    verdicts: list[_Verdict] = []
    try:
        for request in batch:
            target = _target_job(context, request, jobs)
            name = schedule_name or getattr(context, "_schedule_name", None) or target.name
            key = _request_key(context, request, key_fn, scheduled, name)
            if key is None:
                verdicts.append(_Verdict(request, None))
                continue
            planned = planned_ledger_keys(
                target,
                key,
                partition=_request_partition(request),
                asset_selection=request.asset_selection,
                asset_check_selection=request.asset_check_keys,
            )
            reason = _blocked(context, store, key, planned)
            if reason is None and backoff is not None:
                reason = _backing_off(context, store, key, planned, request, backoff)
            verdicts.append(_Verdict(request, key, tuple(planned), reason))
    except LedgerError as exc:
        return SkipReason(f"rocky_dagster: the ledger is unavailable, no run requested: {exc}")

    allowed = []
    for verdict in verdicts:
        if verdict.reason is not None:
            _log(context, f"rocky_dagster: not requesting a run: {verdict.reason}")
            continue
        if verdict.key is None:
            allowed.append(verdict.request)
            continue
        request = verdict.request.with_replaced_attrs(
            tags={**verdict.request.tags, KEY_TAG: verdict.key},
        )
        if not scheduled or request.run_key is not None:
            attempt = _generation(context, store, verdict.key, verdict.ledger_keys)
            request = request.with_replaced_attrs(run_key=attempt_run_key(verdict.key, attempt))
        allowed.append(request)
    if not allowed:
        return SkipReason("; ".join(str(v.reason) for v in verdicts))
    return allowed


def _store(context: Any, ledger: IdempotencyLedger | Ledger | None, resource_key: str) -> Ledger:
    if ledger is None:
        resources = getattr(context, "resources", None)
        ledger = getattr(resources, resource_key, None) if resources is not None else None
        if ledger is None:
            raise TypeError(
                f"guard_run_requests: no ledger given and the context has no resource "
                f"'{resource_key}'; pass ledger=<the IdempotencyLedger resource> or require it "
                f"on the sensor (required_resource_keys={{'{resource_key}'}})"
            )
    return ledger.open() if isinstance(ledger, IdempotencyLedger) else ledger


def _request_partition(request: RunRequest) -> str | None:
    """The partition the request's run works on, as its steps fold it into their keys."""
    if request.partition_key:
        return request.partition_key
    start = request.tags.get("dagster/asset_partition_range_start")
    end = request.tags.get("dagster/asset_partition_range_end")
    return f"{start}...{end}" if start and end else None


def _request_key(
    context: Any,
    request: RunRequest,
    key_fn: RequestKeyFn | None,
    scheduled: bool,
    schedule_name: str,
) -> str | None:
    if key_fn is not None:
        key = key_fn(request)
        if key is not None:
            return key
    if request.tags.get(KEY_TAG):
        return request.tags[KEY_TAG]
    if request.run_key:
        return request.run_key
    if scheduled and context.scheduled_execution_time is not None:
        return schedule_key(schedule_name, context.scheduled_execution_time)
    return None


def _target_job(context: Any, request: RunRequest, jobs: list[Any]) -> JobDefinition:
    name = request.job_name or (jobs[0].name if len(jobs) == 1 else None)
    for candidate in jobs:
        if candidate.name == name and isinstance(candidate, JobDefinition):
            return candidate
    # an asset job (define_asset_job) is only a JobDefinition once Definitions resolve it
    repo = getattr(context, "repository_def", None)
    if name and repo is not None and repo.has_job(name):
        return repo.get_job(name)
    raise ValueError(
        "guard_run_requests: cannot tell which job "
        + (f"{request.job_name!r} " if request.job_name else "")
        + "the request targets; pass job=<the JobDefinition> (or a list of them)"
    )


def _blocked(context: Any, store: Ledger, key: str, planned: dict[str, str]) -> str | None:
    """Why a request for `key` must not launch, or None: what a claim of each planned ledger
    key would decide now (`Ledger.peek`)."""
    done: list[Claim] = []
    for ledger_key, step in planned.items():
        claim = store.peek(ledger_key)
        if claim.decision == Decision.SKIPPED_IN_FLIGHT:
            holder = str(claim.held_by_run_id)
            if _holder_finished(context, holder):
                continue  # a dead holder: the new run reaps it on the spot
            lease = claim.lease_expires_at.isoformat() if claim.lease_expires_at else "?"
            return f"key {key!r} is in flight in run {holder} (step {step}, lease until {lease})"
        if claim.decision == Decision.SKIPPED_COMPLETED:
            done.append(claim)
    if planned and len(done) == len(planned):
        runs = sorted({str(c.prior_run_id) for c in done})
        return f"key {key!r} already completed in run {', '.join(runs)}"
    return None


def _backing_off(
    context: Any,
    store: Ledger,
    key: str,
    planned: dict[str, str],
    request: RunRequest,
    policy: RequestBackoff,
) -> str | None:
    """Why a request for `key` must wait for its backoff to pass, or None."""
    instance = _instance(context)
    limit = policy.failures_that_matter + 1  # enough to know the wait, and to say "at least"
    if instance is not None:
        failures, last_end = _failed_runs_in_a_row(instance, key, request.partition_key, limit)
    else:
        failures, last_end = _failed_claims_in_a_row(store, planned)
    if not failures or last_end is None:
        return None
    wait = policy.delay(failures)
    retry_at = last_end + wait
    if store.now() >= retry_at:
        return None
    if failures == 1:
        times = "once"
    else:
        times = f"{'at least ' if failures >= limit else ''}{failures} times in a row"
    return (
        f"key {key!r} failed {times}; next retry after {retry_at.isoformat()} "
        f"(backoff {_seconds(wait.total_seconds())} s)"
    )


def _seconds(value: float) -> str:
    """240, 0.5, 3155760000: never '3.15576e+09'."""
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0")


def _failed_runs_in_a_row(
    instance: Any, key: str, partition: str | None, limit: int
) -> tuple[int, datetime | None]:
    """The key's FAILURE / CANCELED runs since its last SUCCESS (newest first), and when the
    last of them ended."""
    tags = {KEY_TAG: key} | ({PARTITION_TAG: partition} if partition else {})
    records = instance.get_run_records(
        RunsFilter(
            tags=tags,
            statuses=[
                DagsterRunStatus.FAILURE,
                DagsterRunStatus.CANCELED,
                DagsterRunStatus.SUCCESS,
            ],
        ),
        limit=limit,
    )
    failures = 0
    last_end: datetime | None = None
    for record in records:
        if record.dagster_run.status == DagsterRunStatus.SUCCESS:
            break
        failures += 1
        ended = _ended_at(record)
        last_end = ended if last_end is None else max(last_end, ended)
    return failures, last_end


def _ended_at(record: Any) -> datetime:
    if record.end_time is not None:
        return datetime.fromtimestamp(record.end_time, UTC)
    stamp = record.update_timestamp  # a run canceled before it started has no end time
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _failed_claims_in_a_row(
    store: Ledger, ledger_keys: Sequence[str]
) -> tuple[int, datetime | None]:
    """Without an instance: the runs whose claims of the key's steps ended ``failed`` or
    ``released`` since the last run that only succeeded, and when the last of those ended."""
    failed: dict[str, datetime] = {}  # run id -> its last failure
    succeeded: dict[str, datetime] = {}
    for ledger_key in ledger_keys:
        for event in store.history(ledger_key):
            if event.run_id is None:
                continue
            if event.kind in (EventKind.FAILED, EventKind.RELEASED):
                failed[event.run_id] = max(event.at, failed.get(event.run_id, event.at))
            elif event.kind == EventKind.SUCCEEDED:
                succeeded[event.run_id] = max(event.at, succeeded.get(event.run_id, event.at))
    last_success = max(
        (at for run, at in succeeded.items() if run not in failed),
        default=None,
    )
    since = [at for at in failed.values() if last_success is None or at > last_success]
    return len(since), max(since, default=None)


def _instance(context: Any) -> Any:
    try:
        return context.instance
    except Exception:  # a context built without one raises
        return None


def _holder_finished(context: Any, run_id: str) -> bool:
    instance = _instance(context)
    if instance is None:
        return False
    run = instance.get_run_by_id(run_id)
    return run is not None and run.status in FINISHED_STATUSES


def _generation(context: Any, store: Ledger, key: str, ledger_keys: Sequence[str]) -> int:
    """How many runs of `key` have finished: the generation number of the next request.

    Counted on the instance (runs tagged with the key), which also sees runs that failed before
    claiming anything; without an instance, counted from the ledger's claim history.
    """
    instance = _instance(context)
    if instance is not None:
        return instance.get_runs_count(
            RunsFilter(tags={KEY_TAG: key}, statuses=list(FINISHED_STATUSES))
        )
    runs: set[str] = set()
    for ledger_key in ledger_keys:
        for event in store.history(ledger_key):
            if event.kind in (EventKind.CLAIMED, EventKind.ADOPTED, EventKind.FORCED):
                runs.add(str(event.run_id))
    return len(runs)


def _log(context: Any, message: str) -> None:
    log = getattr(context, "log", None)
    if log is not None:
        log.info(message)
