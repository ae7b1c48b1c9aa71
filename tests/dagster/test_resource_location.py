"""Where the resource's ledger lives, and the mistakes about it that must surface early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from rocky_dagster import IdempotencyLedger

_RESOLVE_TWICE = """
import logging
logging.basicConfig(format="%(levelname)s %(message)s")
from rocky_dagster import IdempotencyLedger
ledger = IdempotencyLedger()
print(ledger.resolved_url())
IdempotencyLedger().resolved_url()
"""


@pytest.mark.parametrize("url", ["sqlite://ledger.db", "sqlite:///:memory:", "sqlite://"])
def test_a_sqlite_url_naming_no_file_is_refused_when_definitions_load(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        IdempotencyLedger(url=url)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("url",)]
    assert "sqlite:///relative/ledger.db" in errors[0]["msg"]


def _resolve_in_a_fresh_process(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "ROCKY_LEDGER_URL")}
    return subprocess.run(
        [sys.executable, "-c", _RESOLVE_TWICE],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )


def test_falling_back_to_the_working_directory_warns_once(tmp_path: Path) -> None:
    done = _resolve_in_a_fresh_process(tmp_path)
    assert done.stdout.strip() == f"sqlite:///{tmp_path / '.rocky' / 'ledger.db'}"
    output = done.stdout + done.stderr
    assert output.count("neither $ROCKY_LEDGER_URL nor $DAGSTER_HOME is set") == 1
    assert "WARNING rocky_dagster: neither" in done.stderr


def test_no_warning_when_dagster_home_places_the_ledger(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = _resolve_in_a_fresh_process(tmp_path, DAGSTER_HOME=str(home))
    assert done.stdout.strip() == f"sqlite:///{home / 'rocky_ledger.db'}"
    assert "is set" not in done.stderr
