"""The package installs beside whatever Dagster (1.12 or newer) a project already runs."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import rocky_dagster

ROOT = Path(__file__).resolve().parents[1]


def test_installing_keeps_the_dagster_already_installed(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    installs = {
        item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]
    }
    assert "rocky-dagster" in installs
    assert not {name for name in installs if name.startswith("dagster")}, installs


def test_version_comes_from_the_package_metadata() -> None:
    assert rocky_dagster.__version__ == version("rocky-dagster")
    assert (Path(rocky_dagster.__file__).parent / "py.typed").exists()
