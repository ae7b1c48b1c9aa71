"""Fixtures of the ledger contract suite: every backend runs the same tests by URL.

`ledger_url` is parametrized over the backends; the PostgreSQL one comes from the
`postgres_url` fixture (tests/conftest.py) and is skipped when that fixture is absent.
Time-based tests inject a `FakeClock` instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from ledger_helpers import CONFIG, FakeClock, MakeLedger

from rocky_dagster.ledger import Ledger, LedgerConfig, open_ledger


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty ledger on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    try:
        return request.getfixturevalue("postgres_url")
    except pytest.FixtureLookupError:
        pytest.skip("postgres fixture not available")


@pytest.fixture
def make_ledger(ledger_url: str) -> Iterator[MakeLedger]:
    """`make_ledger(config=None, clock=None)`: a ledger on this test's URL, closed at teardown.

    Several ledgers on one URL share the store, like processes of one deployment do.
    """
    opened: list[Ledger] = []

    def make(
        config: LedgerConfig | dict[str, Any] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> Ledger:
        ledger = open_ledger(ledger_url, config, clock=clock)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(make_ledger: MakeLedger, clock: FakeClock) -> Ledger:
    """A ledger with the suite's short policy (`CONFIG`) on the injected clock."""
    return make_ledger(CONFIG, clock)
