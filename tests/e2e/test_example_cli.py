"""The example from the command line, as a person with a fresh clone runs it.

- every job with `dagster job execute -m example_project.definitions -d . -j <job>` from the
  repository root, on a fresh data directory and a fresh, empty DAGSTER_HOME: no preparatory step;
- the README's first command, run in a temp copy of the repository, with its summary asserted.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from dagster_server import REPO, VENV_BIN

from rocky_dagster.ledger import open_ledger

pytestmark = pytest.mark.e2e

STEPS = ("load_payments", "replicate_shop", "build_models", "check_quality", "snapshot_customers")
# The jobs in dependency order, with a table each one must leave in the warehouse (quality_job
# checks tables the earlier jobs build, so alone on an empty warehouse it fails, correctly).
JOBS = (
    ("load_job", "payments"),
    ("replication_job", "raw_orders"),
    ("transformation_job", "customer_revenue"),
    ("quality_job", None),
    ("snapshot_job", "customers_history"),
    ("warehouse_job", None),
)
USER_ENV_VARS = ("DAGSTER_HOME", "ROCKY_EXAMPLE_DATA_DIR", "ROCKY_LEDGER_URL", "VIRTUAL_ENV")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV_VARS}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def _rows(warehouse: Path, table: str) -> int:
    with sqlite3.connect(warehouse) as conn:
        return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


def test_every_job_runs_with_dagster_job_execute_from_the_repo_root(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()  # DAGSTER_HOME must exist; nothing goes in it beforehand
    data = tmp_path / "data"
    env = _clean_env(DAGSTER_HOME=str(home), ROCKY_EXAMPLE_DATA_DIR=str(data))
    for job, table in JOBS:
        cmd = [
            str(VENV_BIN / "dagster"),
            *("job", "execute", "-m", "example_project.definitions", "-d", ".", "-j", job),
        ]
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{out[-6000:]}"
        assert f'RUN_SUCCESS - Finished execution of run for "{job}"' in out, out[-3000:]
        if table is not None:
            assert _rows(data / "warehouse.db", table) > 0, (job, table)
    # No key was given, so the ops ran unguarded and said so; nothing was claimed.
    assert "UNGUARDED" in out
    ledger_file = home / "rocky_ledger.db"
    if ledger_file.exists():
        with open_ledger(ledger_file) as ledger:
            assert ledger.entries() == []


# --- the README's first command ------------------------------------------------------------------


def _readme_first_command() -> str:
    """The first command of the README's "The two commands" (after what the package is, how to
    install it and its quickstart)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## The two commands\n", 1)[-1]
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", section, re.S)
    assert block, "README.md has no code block under '## The two commands'"
    first = next(line for line in block.group(1).splitlines() if line.strip())
    return first.split("#", 1)[0].strip()


def _copy_repo(dest: Path) -> None:
    """The files a clone would have: tracked ones plus new ones not ignored (not yet committed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(src.stat().st_mode)


def _layered_venv(copy: Path) -> Path:
    """The copy's own .venv, seeing the repo venv's installed packages.

    A real venv of the same interpreter, with one .pth line putting the repo venv's
    site-packages on sys.path (a plain path line: that directory's own .pth files, the repo's
    editable-install finder among them, are not run). The script finds .venv/bin/python and
    skips creating one; its `pip install -e .` is real and goes into the copy's venv: pip sees the
    dependencies already satisfied, installs the copy as the editable `rocky-dagster` there, and
    leaves the repo venv alone ("outside environment"). So nothing is downloaded but the build
    backend, and the repo's venv keeps pointing at the repo.
    """
    venv = copy / ".venv"
    subprocess.run(
        [sys._base_executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "zz_rocky_repo_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def _main_venv_state() -> dict[str, str]:
    site = Path(sysconfig.get_path("purelib"))
    return {p.name: p.read_text() for p in site.glob("__editable__*rocky*")}


def test_readme_first_command_in_a_fresh_copy(tmp_path: Path) -> None:
    command = _readme_first_command()
    assert command == "./scripts/demo", f"README's first command changed: {command!r}"
    copy = tmp_path / "clone"
    _copy_repo(copy)
    venv = _layered_venv(copy)
    before = _main_venv_state()

    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=copy,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{command} failed:\n{out}\n{proc.stderr[-6000:]}"
    assert _main_venv_state() == before, "the README command re-pointed the repo's venv"

    # The copy's venv has the copy installed (editable), and the demo ran the copy's code.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import rocky_dagster; print(rocky_dagster.__file__)"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(copy), where

    runs = re.findall(r"^run ([12]): (\S+)\s+(\w+)$", out, re.M)
    assert [(n, status) for n, _, status in runs] == [("1", "SUCCESS"), ("2", "SUCCESS")], out
    first_run = runs[0][1]
    decisions = re.findall(rf"^\s+({'|'.join(STEPS)})\s+(\S+)", out, re.M)
    assert decisions == [(s, "proceed") for s in STEPS] + [
        (s, "skipped_completed") for s in STEPS
    ], out
    for step in STEPS:  # each skip names the run that did the work
        assert re.search(
            rf"^\s+{step}\s+skipped_completed .*\(done by run {first_run[:8]}\)$", out, re.M
        ), out
    assert "second run skipped every op" in out, out
    home = copy / "example_project" / ".data" / "dagster_home"
    ledger_file = home / "rocky_ledger.db"
    assert f"ledger:     sqlite:///{ledger_file}" in out, out
    assert ledger_file.is_file()
    assert f"DAGSTER_HOME={home}" in out, out
    # it said what it installed while it installed, and does not install twice
    assert "demo: installing rocky_dagster[ui]" in out and "demo:   Successfully installed" in out
    again = subprocess.run(
        ["bash", "-c", f"{command} --help"],
        cwd=copy,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "demo: .venv is up to date" in again and "installing" not in again, again
