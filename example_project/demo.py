"""`./scripts/demo`: run warehouse_job twice with one idempotency key and say what happened.

The first run does the work; the second, with the same key, must skip every op and point at
the first. Runs go through a real Dagster instance ($DAGSTER_HOME, default
example_project/.data/dagster_home) and the default SQLite ledger beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
STEPS = ("load_payments", "replicate_shop", "build_models", "check_quality", "snapshot_customers")


def _prepare_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or PACKAGE_DIR / ".data" / "dagster_home")
    home = home.expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(PACKAGE_DIR / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _rows(result: dict | None) -> str:
    if not result:
        return "-"
    if result.get("checks", {}).get("total"):
        c = result["checks"]
        return f"{c['passed']}/{c['total']} checks passed"
    return f"{result.get('rows_changed', 0)} rows changed"


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")  # Dagster's beta/preview notices are not the demo's story
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", help="idempotency key (default: a new one per invocation)")
    args = parser.parse_args(argv)
    home = _prepare_home()
    key = args.key or f"demo-{datetime.now(UTC):%Y%m%dT%H%M%S}"

    from dagster import DagsterInstance

    from rocky_dagster.ledger import default_ledger_url, open_ledger
    from rocky_dagster.step.keys import KEY_TAG, OUTCOME_TAG
    from rocky_dagster.step.presentation import step_decisions

    from . import definitions
    from .defs import warehouse_jobs
    from .project import SOURCE_DB, WAREHOUSE_DB
    from .sample_data import advance_source

    if WAREHOUSE_DB.exists() and WAREHOUSE_DB.stat().st_size > 0:
        advance_source(SOURCE_DB, seed=int(datetime.now(UTC).timestamp()))
        print("the shop took 20 new orders and updated 10 since the last demo\n")

    instance = DagsterInstance.get()
    ledger = open_ledger(default_ledger_url())
    job = definitions.defs.get_job_def("warehouse_job")
    print(f"rocky_dagster demo: warehouse_job twice with idempotency key {key!r}\n")
    decisions = []
    for attempt in (1, 2):
        result = job.execute_in_process(
            instance=instance, tags={KEY_TAG: key}, run_config=QUIET, raise_on_error=False
        )
        outcome = instance.get_run_by_id(result.run_id).tags.get(OUTCOME_TAG, "-")
        decided = step_decisions(instance, result.run_id)
        decisions.append(decided)
        status = "SUCCESS" if result.success else "FAILURE"
        print(f"run {attempt}: {result.run_id}  {status}")
        print(f"  (run tag {OUTCOME_TAG} = {outcome})")
        for step in STEPS:
            entry = ledger.get(f"{key}/{step}")
            detail = _rows(entry.result if entry else None)
            by = (
                f" (done by run {entry.run_id[:8]})"
                if entry and entry.run_id != result.run_id
                else ""
            )
            print(f"  {step:<20} {decided.get(step, '-'):<18} {detail}{by}")
        print()
        if not result.success:
            return 1
    skipped = all(decisions[1].get(s) == "skipped_completed" for s in STEPS)
    print(
        "second run skipped every op: it did no work and replayed the first run's results"
        if skipped
        else "UNEXPECTED: the second run did not skip every op"
    )
    print(f"\nledger:     {ledger.url}")
    print(f"dagster:    DAGSTER_HOME={home}")
    print(f"warehouse:  {warehouse_jobs.WAREHOUSE}")
    print(
        f"\nsee it in the UI:   DAGSTER_HOME={home} .venv/bin/dagster dev -w workspace.yaml"
        f"\n                    then open http://127.0.0.1:3000/runs (tag {OUTCOME_TAG})"
    )
    print(f"inspect the ledger: .venv/bin/rocky-dagster ledger list --url {ledger.url}")
    return 0 if skipped else 1


if __name__ == "__main__":
    sys.exit(main())
