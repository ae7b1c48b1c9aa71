"""PostgreSQL fixtures: a throwaway server for the session, a fresh ledger schema per test.

The server is started from the local binaries (see tests/pg_server.py). Without binaries the
tests that need it are skipped with a loud reason, unless ROCKY_REQUIRE_POSTGRES=1 (CI), where
they fail instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pg_server
import pytest

REQUIRE_ENV = "ROCKY_REQUIRE_POSTGRES"
TEST_DATABASE = pg_server.TEST_DATABASE
_POSTGRES_FIXTURES = {"postgres_server", "postgres_url", "postgres_database"}
_counter = itertools.count(1)


def _missing_reason() -> str | None:
    if pg_server.find_bindir() is None:
        return (
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found in $ROCKY_PG_BINDIR, "
            "/usr/lib/postgresql/*/bin or PATH: install postgresql-15 (apt-get install "
            "postgresql-15) to run the PostgreSQL ledger tests"
        )
    return None


def pytest_report_header(config: pytest.Config) -> str:
    reason = _missing_reason()
    if reason is None:
        return f"postgres: throwaway server from {pg_server.find_bindir()}"
    if os.environ.get(REQUIRE_ENV) == "1":
        return f"postgres: MISSING and {REQUIRE_ENV}=1, so PostgreSQL tests will FAIL: {reason}"
    return f"postgres: MISSING, PostgreSQL tests will be SKIPPED: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the server carry the `postgres` marker (`-m "not postgres"` deselects)."""
    for item in items:
        if _POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under CI's requirements (a server and a browser are promised) a skip is a failure, so a
    test that quietly stops running cannot pass as green."""
    if not any(os.environ.get(flag) == "1" for flag in (REQUIRE_ENV, "ROCKY_REQUIRE_BROWSER")):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        session.config.stash[_SKIPS_FAILED] = [report.nodeid for report in skipped]


_SKIPS_FAILED = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    failed_skips = terminalreporter.config.stash.get(_SKIPS_FAILED, [])
    if failed_skips:
        terminalreporter.write_sep("!", "tests were SKIPPED under CI: failing", red=True, bold=True)
        for nodeid in failed_skips:
            terminalreporter.write_line(f"skipped: {nodeid}")
    reason = _missing_reason()
    if reason is not None and os.environ.get(REQUIRE_ENV) != "1":
        terminalreporter.write_sep("!", "PostgreSQL tests were SKIPPED", red=True, bold=True)
        terminalreporter.write_line(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg_server.PostgresServer]:
    """One throwaway PostgreSQL on 127.0.0.1:<free port> for the session; stopped at the end."""
    reason = _missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(f"POSTGRES TESTS SKIPPED: {reason}")
    bindir = pg_server.find_bindir()
    assert bindir is not None
    server = pg_server.PostgresServer(bindir)
    try:
        server.start()
        server.sql(f'CREATE DATABASE "{TEST_DATABASE}"')
    except Exception:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: pg_server.PostgresServer) -> str:
    """A ledger URL naming a schema no test used before: an empty ledger, created on open."""
    schema = f"t{os.getpid()}_{next(_counter)}"
    return postgres_server.url(TEST_DATABASE, schema=schema)


@pytest.fixture
def postgres_database(postgres_server: pg_server.PostgresServer) -> Iterator[str]:
    """A fresh database (for Dagster's instance storage); dropped afterwards, sessions and all."""
    name = f"db{os.getpid()}_{next(_counter)}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
