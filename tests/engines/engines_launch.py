"""Launch one run of an engines_jobs job, as `dagster job execute` would: a process of its own
(the run worker, which submits the steps to the Celery broker or the Dask scheduler and
waits for them), on the instance in $DAGSTER_HOME.

    python engines_launch.py <job name> '<tags json>' '<run config json>'

Prints ``{"run_id": ..., "success": ...}`` as its last line when the run ends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import engines_jobs
from dagster import DagsterInstance, execute_job, reconstructable


def main() -> None:
    name, tags, run_config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    job = engines_jobs.JOBS[name]
    with (
        DagsterInstance.get() as instance,
        execute_job(
            reconstructable(job), instance=instance, tags=tags, run_config=run_config
        ) as result,
    ):
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)


if __name__ == "__main__":
    main()
