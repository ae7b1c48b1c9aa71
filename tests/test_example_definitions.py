"""The example project's definitions load quietly: no Dagster warning printed on every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LOAD = """
import warnings
warnings.simplefilter("error")  # any warning raised while the definitions load fails the test
import example_project.definitions as example
repository = example.defs.get_repository_def()
for job in repository.get_all_jobs():
    job.get_subset  # resolved, resources bound
repository.asset_graph  # built in every step process
print(sorted(s.name for s in repository.sensor_defs))
print(sorted(k.to_user_string() for k in repository.asset_graph.get_all_asset_keys()))
"""


def test_example_definitions_load_without_any_warning(tmp_path: Path) -> None:
    env = {**os.environ, "ROCKY_EXAMPLE_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "payments_drop_sensor" in done.stdout
    assert "'customers_history'" in done.stdout  # the defs.yaml warehouse is loaded too
    assert "Warning" not in done.stderr
