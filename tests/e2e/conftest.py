"""End-to-end tests: the helper module importable by name, and a loud line when the browser
test was skipped (no Chromium here; with ROCKY_REQUIRE_BROWSER=1 it fails instead)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # dagster_server, importable by name

from dagster_server import BROWSER_SKIP_MARK  # noqa: E402 (importable once HERE is on the path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reasons = {
        str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for report in terminalreporter.stats.get("skipped", [])
        if BROWSER_SKIP_MARK in str(report.longrepr)
    }
    if reasons:
        terminalreporter.write_sep("!", "the browser test was SKIPPED", red=True, bold=True)
        for reason in sorted(reasons):
            terminalreporter.write_line(reason)
