"""Which Dagster releases the test suite proves, and which companion packages each can have.

    python scripts/dagster_matrix.py floor|newest

prints shell assignments for scripts/test: the Dagster version, the pip requirements to install
with it, the companions to install without their dependencies, and the ones missing.

- ``floor``: the newest patch of the lowest minor the package supports (``dagster>=1.12``).
- ``newest``: the newest ``dagster`` the registry serves.
- ``paired``: the newest ``dagster`` for which every companion is published (the lock-step
  engines, dagster-postgres and dagster-dg-cli lag behind ``newest``): the tests that need a
  companion run there, so each minor is proven with them.

Dagster's lock-step companions (dagster-webserver, dagster-graphql, dagster-dg-cli,
dagster-postgres) each pin one exact dagster and are sometimes published later than dagster
itself, so the newest dagster may have no matching companion. Then:

- dagster-graphql / dagster-dg-cli / dagster-postgres are left out, and the tests that need them
  run on the floor only (scripts/test says so);
- dagster-webserver (a UI server only: the run workers, daemon and code server are dagster
  itself) is taken from the newest release of the same minor, installed without its pin, so
  one ``dagster dev`` test still runs on the newest dagster.

Uses ``pip index versions`` (the same registry pip installs from); standard library only.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

FLOOR_MINOR = (1, 12)
"""Keep in step with ``dagster>=1.12`` in pyproject.toml."""

COMPANIONS = (
    "dagster-webserver",
    "dagster-graphql",
    "dagster-dg-cli",
    "dagster-postgres",
    "dagster-celery",
    "dagster-dask",
)
LIBRARIES = ("dagster-postgres", "dagster-celery", "dagster-dask")
"""Companions numbered 0.(minor+16).patch; the others share dagster's own number."""
EXTRAS = {"dagster-celery": ["redis>=4"]}
"""What a companion needs for the way the suite runs it (the Celery broker is Redis)."""


def versions(package: str) -> list[tuple[int, ...]]:
    """Every final release of `package` on the registry, newest first."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"Available versions: (.*)", out)
    if match is None:
        return []
    found = []
    for text in match.group(1).split(","):
        text = text.strip()
        if re.fullmatch(r"\d+(\.\d+)*", text):
            found.append(tuple(int(p) for p in text.split(".")))
    return sorted(found, reverse=True)


def companion_version(package: str, dagster: tuple[int, ...]) -> tuple[int, ...]:
    """The companion release paired with `dagster`: libraries are numbered 0.(minor+16).patch."""
    if package in LIBRARIES:
        return (0, dagster[1] + 16, *dagster[2:])
    return dagster


def text(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def main(target: str) -> int:
    with ThreadPoolExecutor(len(COMPANIONS) + 1) as pool:  # each look-up waits on the registry
        names = ("dagster", *COMPANIONS)
        found = dict(zip(names, pool.map(versions, names), strict=True))
    released = found["dagster"]
    if not released:
        print("echo 'scripts/dagster_matrix.py: pip index versions dagster found nothing' >&2")
        return 1
    if target == "floor":
        chosen = next(v for v in released if v[:2] == FLOOR_MINOR)
    elif target == "newest":
        chosen = released[0]
    elif target == "paired":
        chosen = next(
            v for v in released if all(companion_version(p, v) in found[p] for p in COMPANIONS)
        )
    else:
        print(f"echo 'scripts/dagster_matrix.py: unknown target {target}' >&2")
        return 2
    reqs = [f"dagster=={text(chosen)}"]
    nodeps: list[str] = []
    missing: list[str] = []
    for package in COMPANIONS:
        wanted = companion_version(package, chosen)
        available = found[package]
        if wanted in available:
            reqs.append(f"{package}=={text(wanted)}")
            reqs.extend(EXTRAS.get(package, []))
        elif package == "dagster-webserver":
            same_minor = [v for v in available if v[:2] == wanted[:2]]
            if same_minor:
                nodeps.append(f"{package}=={text(same_minor[0])}")
            missing.append(package)
        else:
            missing.append(package)
    print(f"DAGSTER_VERSION={text(chosen)}")
    print(f"DAGSTER_REQS={shlex.quote(' '.join(reqs))}")
    print(f"DAGSTER_NODEPS={shlex.quote(' '.join(nodeps))}")
    print(f"DAGSTER_MISSING={shlex.quote(' '.join(missing))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "newest"))
