"""Where the ledger lives when nobody says: one rule shared by the resource and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

ENV_URL = "ROCKY_LEDGER_URL"
FILE_NAME = "rocky_ledger.db"


def default_ledger_url(*, create_dir: bool = True) -> str:
    """`$ROCKY_LEDGER_URL`, else `$DAGSTER_HOME/rocky_ledger.db`, else `./.rocky/ledger.db`.

    Beside the Dagster instance by default, so every process of one deployment
    (webserver, daemon, code server, run workers) finds the same file.
    """
    url = os.environ.get(ENV_URL, "").strip()
    if url:
        return url
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if home:
        return f"sqlite:///{Path(home).expanduser().absolute() / FILE_NAME}"
    directory = Path.cwd() / ".rocky"
    if create_dir:
        directory.mkdir(exist_ok=True)
    return f"sqlite:///{directory / 'ledger.db'}"
