"""The YAML front door through the real `dg` CLI: list, scaffold, check yaml, check defs.

`dg` (dagster-dg-cli) pins one exact dagster, so this module runs where a matching release is
installed (scripts/test: the floor venv).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dagster_dg_cli", reason="dagster-dg-cli is not installed beside this dagster")

DG = str(Path(sys.executable).with_name("dg"))

PYPROJECT = """\
[project]
name = "{name}"
version = "0.0.1"
requires-python = ">=3.11"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "{name}"
"""

DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def _project(root: Path, name: str = "shop_project") -> Path:
    """A minimal dg project as `create-dagster project` lays it out, using this interpreter."""
    package = root / "src" / name
    (package / "defs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS)
    (root / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (root / ".env").write_text(f"DG_PROJECT_PYTHON_EXECUTABLE={sys.executable}\n")
    return package / "defs"


def _dg(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "ROCKY_LEDGER_URL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    # an installed project would not need its src; a checkout under test stays first on the path
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project / "src"), os.environ.get("PYTHONPATH", "")) if p
    )
    done = subprocess.run(
        [DG, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert done.returncode == 0, f"dg {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_dg_lists_the_components_with_their_summaries(tmp_path: Path) -> None:
    _project(tmp_path)
    items = json.loads(_dg(tmp_path, "list", "components", "--json").stdout)["items"]
    ours = {item["key"]: item["summary"] for item in items if item["key"].startswith("rocky_")}
    assert "rocky_dagster.IdempotencyLedgerComponent" in ours
    assert "ledger" in ours["rocky_dagster.IdempotencyLedgerComponent"]
    assert "pipelines" in ours["rocky_dagster.PipelinesComponent"]


def test_scaffolded_pipelines_pass_dg_check_and_show_their_assets(tmp_path: Path) -> None:
    defs_dir = _project(tmp_path)
    _dg(tmp_path, "scaffold", "defs", "rocky_dagster.PipelinesComponent", "my_pipelines")
    written = (defs_dir / "my_pipelines" / "defs.yaml").read_text()
    assert written.startswith("type: rocky_dagster.PipelinesComponent")
    _dg(tmp_path, "check", "yaml")
    _dg(tmp_path, "check", "defs")
    listed = _dg(tmp_path, "list", "defs", "--json").stdout
    assets = {item["asset_key"] for item in json.loads(listed)["assets"]}
    assert {"orders", "customer_totals"} <= assets


def test_scaffolded_ledger_passes_dg_check_yaml_and_defs(tmp_path: Path) -> None:
    defs_dir = _project(tmp_path)
    _dg(tmp_path, "scaffold", "defs", "rocky_dagster.IdempotencyLedgerComponent", "ledger")
    written = (defs_dir / "ledger" / "defs.yaml").read_text()
    assert written.startswith("type: rocky_dagster.IdempotencyLedgerComponent")
    assert "url_env: ROCKY_LEDGER_URL" in written
    _dg(tmp_path, "check", "yaml")
    _dg(tmp_path, "check", "defs")


@pytest.mark.parametrize(
    ("attribute", "command"),
    [
        ("unknown_field: 1", "yaml"),  # the schema: no such attribute
        ("lease_seconds: -1", "yaml"),  # the schema: must be > 0
        ("dedup_on: sometimes", "defs"),  # the model, when the definitions load
        ("url: sqlite://ledger.db", "defs"),  # a url naming no file
    ],
)
def test_dg_check_names_a_bad_attribute(tmp_path: Path, attribute: str, command: str) -> None:
    defs_dir = _project(tmp_path)
    (defs_dir / "ledger").mkdir()
    (defs_dir / "ledger" / "defs.yaml").write_text(
        f"type: rocky_dagster.IdempotencyLedgerComponent\nattributes:\n  {attribute}\n"
    )
    done = _dg(tmp_path, "check", command, check=False)
    assert done.returncode != 0
    assert attribute.split(":")[0] in done.stdout + done.stderr


ROOT = Path(__file__).resolve().parents[2]


def test_the_example_project_passes_dg_check(tmp_path: Path) -> None:
    """The repository root is a dg project too: its defs/ folder declares the warehouse."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "ROCKY_LEDGER_URL")}
    env.update(VIRTUAL_ENV=sys.prefix, NO_COLOR="1", ROCKY_EXAMPLE_DATA_DIR=str(tmp_path))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for command in (["yaml"], ["defs", "--use-active-venv"]):
        done = subprocess.run(
            [DG, "check", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"dg check {command}:\n{done.stdout}\n{done.stderr}"


RUN_ID = re.compile(r" - ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}) - ")


def _launch(project: Path) -> tuple[str, str]:
    """`dg launch --assets '*'` with no tags: (its run id, its event log as printed)."""
    done = _dg(project, "launch", "--assets", "*")
    output = done.stdout + done.stderr
    found = RUN_ID.search(output)
    assert found, output
    return found.group(1), output


def test_a_scaffolded_warehouse_launched_twice_with_no_tags_does_the_work_once(
    tmp_path: Path,
) -> None:
    """The first path a dg user takes: scaffold, launch, launch again, change a drop, launch."""
    defs_dir = _project(tmp_path)
    _dg(tmp_path, "scaffold", "defs", "rocky_dagster.PipelinesComponent", "my_pipelines")

    first, output = _launch(tmp_path)
    assert "Materialized value orders" in output and "Materialized value customer_totals" in output
    assert "UNGUARDED" not in output
    assert (tmp_path / "data" / "warehouse.db").exists()  # data beside the project, not in src
    assert not list(defs_dir.rglob("*.db"))

    second, output = _launch(tmp_path)
    assert second != first
    assert "ASSET_MATERIALIZATION" not in output, output
    skips = [line for line in output.splitlines() if "SKIPPED" in line and " - INFO - " in line]
    assert len(skips) == 1, output  # orders; Dagster does not start customer_totals' step
    assert f"already completed in run {first}" in skips[0]

    drop = tmp_path / "data" / "drops" / "orders_sample.csv"
    before = drop.stat().st_mtime_ns
    drop.write_text(drop.read_text() + "4,alan,1.50\n")
    os.utime(drop, ns=(before, before + 1_000_000_000))
    third, output = _launch(tmp_path)
    assert third not in (first, second)
    assert "Materialized value orders" in output and "Materialized value customer_totals" in output
    assert "SKIPPED" not in output
