"""Every benchmark still runs: each in its short --smoke mode (a few iterations, ratios not
judged; the figures themselves are measured by hand, never in the test suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _smoke(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.parametrize(
    ("script", "prints"),
    [
        ("ledger_bench.py", "ratio cycle/baseline"),
        ("pipelines_bench.py", "ratio asset/op"),
        ("dagster_overhead.py", "ratio guarded/plain"),
    ],
)
def test_benchmark_runs_in_smoke_mode(script: str, prints: str) -> None:
    assert prints in _smoke(script)


def test_postgres_benchmark_runs_in_smoke_mode(postgres_url: str) -> None:
    assert "ratio" in _smoke("ledger_bench_pg.py", "--url", postgres_url)
