"""Fixtures shared by the pipeline tests: real SQLite files under tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def warehouse(tmp_path: Path) -> str:
    """Path of a warehouse file that does not exist yet (pipelines create it)."""
    return str(tmp_path / "warehouse.db")


@pytest.fixture
def source_db(tmp_path: Path) -> str:
    """Path of a separate source database for replication tests."""
    return str(tmp_path / "source.db")
