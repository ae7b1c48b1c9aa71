"""Run one job of dagster_layer_jobs in this process: ``dagster_layer_run.py JOB TAGS_JSON``.

Exit status 0 on success, 1 on failure; the run id is the last line of stdout.
"""

from __future__ import annotations

import json
import sys

import dagster_layer_jobs
from dagster import DagsterInstance, execute_job, reconstructable


def main() -> int:
    job_name, tags = sys.argv[1], json.loads(sys.argv[2])
    job = getattr(dagster_layer_jobs, job_name)
    with DagsterInstance.get() as instance:
        result = execute_job(reconstructable(job), instance=instance, tags=tags)
        print(result.run_id, flush=True)
        return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
