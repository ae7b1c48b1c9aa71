"""The package's public names: one export list, lazily imported, and its version."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import rocky_dagster

INIT = Path(rocky_dagster.__file__)


def test_every_exported_name_resolves_and_all_is_the_export_list() -> None:
    exports = rocky_dagster._EXPORTS
    assert rocky_dagster.__all__ == sorted(exports)
    for name in exports:
        assert getattr(rocky_dagster, name) is not None, name


def test_type_checking_imports_match_the_export_list() -> None:
    """What type checkers see (the TYPE_CHECKING block) is exactly what is exported."""
    tree = ast.parse(INIT.read_text())
    [block] = [
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    ]
    seen = {
        alias.asname or alias.name: f".{node.module}"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == rocky_dagster._EXPORTS


def test_ledger_errors_import_from_the_package() -> None:
    from rocky_dagster import (
        FingerprintMismatchError,
        LedgerConfigError,
        LedgerError,
        LedgerSchemaError,
        LedgerUnavailableError,
    )

    for error in (
        FingerprintMismatchError,
        LedgerConfigError,
        LedgerSchemaError,
        LedgerUnavailableError,
    ):
        assert issubclass(error, LedgerError)


def test_version_comes_from_the_package_metadata() -> None:
    assert rocky_dagster.__version__ == importlib.metadata.version("rocky-dagster")


def test_importing_the_ledger_errors_does_not_import_dagster() -> None:
    code = (
        "import sys; from rocky_dagster import LedgerError, __version__; "
        "print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
