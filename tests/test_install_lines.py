"""Every `pip install` line of the README, docs/*.md and the ledger's error messages works as
written from a clone of this repository, or says it is a fragment (``# fragment`` on its line).

Each line runs in bash, in a copy of the clone, with `pip` (and `.venv/bin/pip`) standing for
this interpreter's pip: `pip wheel` for real, `pip install` as `--dry-run --no-deps` (it
resolves the named packages, files and versions on the registry, installs nothing). An extra
of this package (`".[ui]"`) must be one pyproject.toml declares, since `--no-deps` does not
check it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"`(?P<code>[^`\n]*\bpip (?:install|wheel)\b[^`\n]*)`")
_MESSAGE_COMMAND = re.compile(r"pip install(?: +(?:'[^']*'|\"[^\"]*\"))+")
_OWN_EXTRA = re.compile(r"""(?:^|\s)['"]?\.\[(?P<extras>[\w,-]+)\]""")

SHIM = """\
pip() {
    if [ "$1" = install ]; then
        shift
        "$PY" -m pip install --dry-run --no-deps --quiet --disable-pip-version-check "$@"
    else
        "$PY" -m pip --disable-pip-version-check "$@"
    fi
}
"""


def _lines() -> list[tuple[str, str]]:
    """(where, command) of every install line of the pages: code blocks, then inline code."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO)
        for block in _FENCE.finditer(text):
            start = text.count("\n", 0, block.start()) + 2
            for offset, line in enumerate(block.group("code").splitlines()):
                if re.search(r"\bpip (install|wheel)\b", line.split("#")[0]):
                    found.append((f"{name}:{start + offset}", line))
        outside = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for match in _INLINE.finditer(outside):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{name}:{line}", match.group("code")))
    return found


def _error_message_lines() -> list[tuple[str, str]]:
    """The install commands the PostgreSQL error names when its drivers are missing."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None  # as if the drivers were not installed
        from rocky_dagster.ledger import LedgerConfigError, open_ledger
        try:
            open_ledger("postgresql://u@127.0.0.1:1/db")
        except LedgerConfigError as exc:
            print(exc)
        """
    )
    message = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    commands = _MESSAGE_COMMAND.findall(message)
    assert commands, message
    return [(f"open_ledger error: {message.strip()[:60]}…", c) for c in commands]


LINES = _lines()
ALL = LINES + _error_message_lines()


def test_the_pages_have_install_lines() -> None:
    assert any("README" in where for where, _ in LINES)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's package sources (what `pip install .` reads)."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(
        REPO / "rocky_dagster", root / "rocky_dagster", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


@pytest.mark.parametrize(("where", "line"), ALL, ids=[w for w, _ in ALL])
def test_install_line_works_as_written_from_a_clone(where: str, line: str, clone: Path) -> None:
    command = line.split(" #")[0].strip()
    if "# fragment" in line:
        pytest.skip(f"{where} says it is a fragment")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for match in _OWN_EXTRA.finditer(command):
        for extra in match.group("extras").split(","):
            assert extra in extras, f"{where}: no extra {extra!r} in pyproject.toml"
    command = re.sub(r"(^|\s)\.venv/bin/pip\b", r"\1pip", command)
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{SHIM}{command}"],
        cwd=clone,
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{where}: {command}\n{done.stdout}\n{done.stderr[-3000:]}"
