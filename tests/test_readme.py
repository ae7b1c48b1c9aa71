"""README.md's and docs/*.md's code blocks work as written.

Every ```python block (of the README and of every docs/*.md page, so a block moved there stays
tested) runs, pasted into a file in an empty directory, with only the package
installed and no `DAGSTER_HOME` / `ROCKY_LEDGER_URL` leaking in from this process. A block that
is deliberately a fragment says so in its first line (``# fragment``) and must still compile.
The shell lines that launch Dagster share one `DAGSTER_HOME`, and the README names no file
outside this repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
QUICKSTART_SECTION = "Quickstart"
MAIN_EXAMPLE_SECTION = "Using it in Dagster"
ASSETS_SECTION = "Using it with assets"
YAML_SECTION = "In YAML, for `dg`"
LEAKY_ENV = ("DAGSTER_HOME", "ROCKY_LEDGER_URL", "ROCKY_EXAMPLE_DATA_DIR")

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^#{1,6} (?P<title>.+)$", re.M)
_OUTSIDE_PATH = re.compile(r"(?<![\w:/.$})\]~-])(?:\.\./|/)[\w.-]+(?:/[\w.*-]+)*")
"""An absolute or parent-relative file path: not a URL (`scheme://…`, `sqlite:////x.db`), not
`$VAR/…`, not `~/…` (a user's own file such as ~/.pgpass), not a relative path in the repo."""
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    section: str
    page: str = "README.md"

    @property
    def is_fragment(self) -> bool:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first.startswith("# fragment")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def readme_blocks(text: str, lang: str, page: str = "README.md") -> list[Block]:
    headings = [(m.start(), m.group("title").strip()) for m in _HEADING.finditer(text)]
    found = []
    for match in _FENCE.finditer(text):
        if match.group("lang") != lang:
            continue
        section = next((t for pos, t in reversed(headings) if pos < match.start()), "")
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(lang, match.group("code"), line, section, page))
    return found


TEXT = README.read_text(encoding="utf-8")
PYTHON = [
    block
    for path in PAGES
    for block in readme_blocks(
        path.read_text(encoding="utf-8"), "python", str(path.relative_to(REPO))
    )
]
RUNNABLE = [b for b in PYTHON if not b.is_fragment]
FRAGMENTS = [b for b in PYTHON if b.is_fragment]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_python_block_runs_as_written_in_an_empty_directory(block: Block, tmp_path: Path):
    (tmp_path / "example.py").write_text(block.code, encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, f"{block} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert not (tmp_path / ".rocky").exists(), "the example fell back to ./.rocky/ledger.db"
    in_readme = block.page == "README.md"
    if in_readme and block.section == QUICKSTART_SECTION:
        # three launches with no tags: the second skips, the third follows a new input
        assert "second (same inputs) -> skipped" in done.stdout, done.stdout
        assert "third (after a new orders) -> worked" in done.stdout, done.stdout
        assert done.stdout.count("order_totals computed") == 2, done.stdout
    if in_readme and block.section == MAIN_EXAMPLE_SECTION:
        # the example's point: two runs with one key, the side effect happens once
        assert (tmp_path / "published.txt").read_text().splitlines() == ["published 2 payments"]
        second = [line for line in done.stdout.splitlines() if line.startswith("run 2:")]
        assert second and "'replayed': True" in second[0], done.stdout
    if in_readme and block.section == ASSETS_SECTION:
        # two runs with one key: the model materialized once, the warehouse built once
        assert "after run 2: revenue materialized 1 time(s)" in done.stdout, done.stdout
        assert "[('ada', 9.5), ('grace', 12.0)]" in done.stdout, done.stdout


def test_the_readme_opens_with_a_short_quickstart():
    """What the package is, how to install it, and a quickstart of at most 25 lines, all
    within the README's first 60 lines."""
    head = "\n".join(TEXT.splitlines()[:60])
    assert "## Install" in head and "not** `dagster-rocky`" in head
    [block] = [b for b in PYTHON if b.page == "README.md" and b.section == QUICKSTART_SECTION]
    assert len(block.code.strip().splitlines()) <= 25
    assert block.line + len(block.code.splitlines()) <= 60


def test_the_main_example_is_a_whole_program_not_a_fragment():
    main = [b for b in PYTHON if b.page == "README.md" and b.section == MAIN_EXAMPLE_SECTION]
    assert main, f"no python block under '## {MAIN_EXAMPLE_SECTION}'"
    assert not main[0].is_fragment
    assert "execute_in_process" in main[0].code


@pytest.mark.parametrize("block", FRAGMENTS, ids=str)
def test_fragment_compiles(block: Block):
    compile(block.code, str(block), "exec")


def test_the_defs_yaml_block_loads_and_its_pipelines_run(tmp_path: Path) -> None:
    """The YAML block, as written, in a defs folder beside the drops and models it names."""
    [block] = [b for b in readme_blocks(TEXT, "yaml") if b.section == YAML_SECTION]
    script = f"""
from pathlib import Path
import dagster as dg
from dagster.components.testing import create_defs_folder_sandbox
with create_defs_folder_sandbox() as sandbox:
    folder = sandbox.defs_folder_path / "warehouse"
    (folder / "drops").mkdir(parents=True)
    (folder / "drops" / "orders.csv").write_text("id,customer,amount\\n1,ada,2\\n")
    (folder / "models").mkdir()
    (folder / "models" / "revenue.sql").write_text("SELECT customer FROM orders")
    (folder / "defs.yaml").write_text({block.code!r})
    with sandbox.load_component_and_build_defs(defs_path=folder) as (_, defs):
        job = defs.get_repository_def().get_job("load_orders_job")
        result = job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), tags={{"rocky/idempotency_key": "k"}}
        )
        assert result.success
        print(sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()))
"""
    env = {**clean_env(), "ROCKY_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "['orders', 'revenue']" in done.stdout, done.stdout


def test_every_python_block_is_either_run_or_compiled():
    assert PYTHON and len(RUNNABLE) + len(FRAGMENTS) == len(PYTHON)


def test_dagster_launch_lines_share_the_dagster_home_of_dagster_dev():
    """Without DAGSTER_HOME, `dagster job execute` runs on a throwaway instance the UI never shows.

    A launch line has it when it sets it itself (`DAGSTER_HOME=… dagster …`) or when its block
    exported it earlier (a one-line prefix does not carry over to the next command).
    """
    homes = set()
    launches = 0
    for block in readme_blocks(TEXT, "bash"):
        exported = None
        code = re.sub(r"(^|\s)#.*$", "", block.code, flags=re.M)  # comments launch nothing
        for command in re.sub(r"\\\n", " ", code).splitlines():  # join continued lines
            export = re.match(r"\s*export DAGSTER_HOME=(\S+)", command)
            if export:
                exported = export.group(1)
                continue
            launch = re.search(r"\bdagster (dev|job execute|job launch)\b", command)
            if launch is None:
                continue
            launches += 1
            inline = re.search(r"DAGSTER_HOME=(\S+)\s", command[: launch.start()])
            home = inline.group(1) if inline else exported
            assert home, f"{block}: '{command.strip()}' runs without DAGSTER_HOME"
            homes.add(home)
    assert launches >= 2
    assert len(homes) == 1, f"the launch lines use different DAGSTER_HOMEs: {homes}"


@pytest.mark.parametrize(
    ("text", "outside"),
    [
        ('LoadPipeline(warehouse="/data/wh.db")', True),
        ("see ../shared/DESIGN.md", True),
        ("postgresql://rocky@db.internal:5432/dagster", False),
        ("sqlite:////absolute.db", False),
        ("$DAGSTER_HOME/rocky_ledger.db", False),
        ("~/.pgpass", False),
        ("example_project/.data/dagster_home", False),
    ],
)
def test_the_outside_path_rule_tells_outside_from_inside(text: str, outside: bool):
    assert bool(_OUTSIDE_PATH.search(text)) is outside


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_names_no_file_outside_the_repository(path: Path):
    text = path.read_text(encoding="utf-8")
    scanned = re.sub(r"/proc(/<pid>/\w+)?", "", text)  # the kernel's process table, no file
    outside = [
        m.group()
        for m in _OUTSIDE_PATH.finditer(scanned)
        if not (path.parent / m.group()).resolve().is_relative_to(REPO)
    ]
    assert outside == []
    assert "DESIGN" not in text
    for match in _LINK.finditer(text):
        target = match.group("target").split("#")[0]
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # an in-page anchor or a URL
        linked = (path.parent / target).resolve()
        assert linked.is_relative_to(REPO), f"link {target} leaves the repository"
        assert linked.exists(), f"link {target} names no file in the repository"
