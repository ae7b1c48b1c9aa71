"""Where the example keeps its data, resolved from this package, never from the caller's cwd.

`ROCKY_EXAMPLE_DATA_DIR` moves the data (tests use a temp dir); by default it lives in
`example_project/.data/` (git-ignored). `ensure_data()` makes a fresh clone runnable with no
preparatory step: it generates the source database and seeds the drop directory, idempotently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .sample_data import ensure_source

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR / "models"
SHIPPED_DROPS = PACKAGE_DIR / "drops"


def data_dir() -> Path:
    configured = os.environ.get("ROCKY_EXAMPLE_DATA_DIR", "").strip()
    return Path(configured).expanduser().absolute() if configured else PACKAGE_DIR / ".data"


DATA_DIR = data_dir()
SOURCE_DB = DATA_DIR / "shop.db"
WAREHOUSE_DB = DATA_DIR / "warehouse.db"
DROPS_DIR = DATA_DIR / "drops"
REPORTS_DIR = DATA_DIR / "reports"


def ensure_data() -> None:
    """Create the data directory, the source database and the seeded drop files if missing."""
    for directory in (DATA_DIR, DROPS_DIR, REPORTS_DIR):
        directory.mkdir(parents=True, exist_ok=True)
    ensure_source(SOURCE_DB)
    seeded = DATA_DIR / ".drops_seeded"
    if not seeded.exists():
        for shipped in sorted(SHIPPED_DROPS.iterdir()):
            if shipped.is_file():
                shutil.copy2(shipped, DROPS_DIR / shipped.name)
        seeded.touch()
