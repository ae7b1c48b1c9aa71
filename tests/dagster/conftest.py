"""Fixtures for the Dagster-layer tests: a real instance in a temp DAGSTER_HOME, a real SQLite
ledger in tmp_path, and the environment a subprocess needs to find both (and the test jobs)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from rocky_dagster.ledger import Ledger, open_ledger

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # dagster_layer_jobs, importable by name (and by subprocesses)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    """Where test ops leave markers: one line per body that really ran, files to block on."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def dagster_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str, work_dir: Path
) -> Path:
    """A fresh DAGSTER_HOME; the default ledger (ROCKY_LEDGER_URL) lives beside it in tmp_path.

    Everything goes through the environment so spawned step processes and subprocess runs see
    the same instance, ledger and marker directory as the test.
    """
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ROCKY_LEDGER_URL", ledger_url)
    monkeypatch.setenv("ROCKY_TEST_WORK_DIR", str(work_dir))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    )
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def ledger(ledger_url: str, dagster_home: Path) -> Iterator[Ledger]:
    """The same SQLite ledger the jobs use (opened separately, as an operator would)."""
    with open_ledger(ledger_url) as opened:
        yield opened
