"""A sensor and a schedule that ask the ledger before asking Dagster for a run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dagster import RunRequest, ScheduleEvaluationContext, SensorEvaluationContext, schedule, sensor

from example_project.defs import warehouse_jobs
from example_project.project import DROPS_DIR
from rocky_dagster import IdempotencyLedger, guard_run_requests


def _file_key(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"drop:{path.name}:{digest}"


# job_name, not job=: a sensor holding the job object makes Dagster re-create the sensor to bind
# the Definitions' resources to it, and that copy warns (BetaWarning) in every process.
@sensor(job_name="load_job", minimum_interval_seconds=10)
def payments_drop_sensor(context: SensorEvaluationContext, ledger: IdempotencyLedger):
    """One load run per dropped file content; a file that was loaded is never requested again."""
    files = sorted(p for p in DROPS_DIR.glob("payments_*") if p.is_file())
    if not files:
        return None
    requests = [RunRequest(run_key=_file_key(p), tags={"rocky/drop_file": p.name}) for p in files]
    return guard_run_requests(context, requests, ledger=ledger, job=warehouse_jobs.load_job)


@schedule(cron_schedule="0 6 * * *", job_name="warehouse_job", execution_timezone="UTC")
def daily_warehouse_schedule(context: ScheduleEvaluationContext, ledger: IdempotencyLedger):
    """The warehouse once a day; a tick fired twice runs once (key: schedule + tick time)."""
    tick = context.scheduled_execution_time
    request = RunRequest(run_key=f"daily_warehouse@{tick.isoformat()}")
    return guard_run_requests(context, request, ledger=ledger, job=warehouse_jobs.warehouse_job)
