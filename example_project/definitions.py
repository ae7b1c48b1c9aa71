"""The example's Definitions: everything in `defs/`, one file or defs.yaml per concern.

- `defs/warehouse_jobs.py`: the five pipelines as guarded op jobs, and `warehouse_job`
- `defs/warehouse/defs.yaml`: the same warehouse as software-defined assets (`PipelinesComponent`)
- `defs/reports.py`: a guarded partitioned asset and multi-asset, and `reports_job`
- `defs/requests.py`: a drop-file sensor and a daily schedule asking the ledger first
- `defs/automation/assets.py`: an asset launched by declarative automation, keyed by its inputs
- `defs/playground.py`: ops that hold their claim or fail once, to try failures on
- `defs/ledger.py`: the `ledger` resource, the run-status sensors and the admin job

Open it with `dagster dev -w workspace.yaml` (or `dg dev`) from the repository root.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from dagster import BetaWarning, load_from_defs_folder

# Dagster's component loader copies asset checks with a beta parameter of its own, and tags what
# it loads with a beta metadata class (in every process that builds the asset graph); nothing here
# passes them, so the notices are not ours to act on.
warnings.filterwarnings("ignore", message="Parameter `execution_type`", category=BetaWarning)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)
    defs = load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
