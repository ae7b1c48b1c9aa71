"""Fixtures for the daemon suite: one real `dagster dev` (webserver + daemon) per test module.

The server runs the example project (workspace.yaml) on 127.0.0.1 with a temp DAGSTER_HOME
whose dagster.yaml enables run retries and run monitoring, and a temp example data directory.
The test process reads what the server writes: the ledger (the default one,
``$DAGSTER_HOME/rocky_ledger.db``) and the Dagster instance (event logs, materializations).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # daemon_server, importable by name

from daemon_server import DaemonServer  # noqa: E402

from rocky_dagster.ledger import Ledger, open_ledger  # noqa: E402


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonServer]:
    base = tmp_path_factory.mktemp("daemon")
    server = DaemonServer(
        home=base / "dagster_home", env={"ROCKY_EXAMPLE_DATA_DIR": str(base / "data")}
    )
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()
        leftovers = getattr(server, "leftovers", None)
        if leftovers:
            warnings.warn(
                f"dagster dev left processes behind (SIGKILLed): {leftovers}", stacklevel=1
            )


@pytest.fixture(scope="module")
def data_dir(dagster_dev: DaemonServer) -> Path:
    """The example's data directory (drops/, reports/, shop.db, warehouse.db)."""
    path = Path(dagster_dev.env["ROCKY_EXAMPLE_DATA_DIR"])
    assert (path / "drops").is_dir(), "the code location creates the example data on load"
    return path


@pytest.fixture(scope="module")
def ledger(dagster_dev: DaemonServer) -> Iterator[Ledger]:
    """The server's default ledger, read from the test process."""
    store = open_ledger(f"sqlite:///{Path(dagster_dev.home) / 'rocky_ledger.db'}")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="module")
def instance(dagster_dev: DaemonServer) -> Iterator[DagsterInstance]:
    """The server's Dagster instance, read from the test process."""
    inst = DagsterInstance.from_config(str(dagster_dev.home))
    try:
        yield inst
    finally:
        inst.dispose()
