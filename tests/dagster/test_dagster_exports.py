"""The package's public names: one export list, lazily imported, and its version."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_top_level_is_what_a_readme_user_types() -> None:
    """At most 25 names; no aliases, internals, errors, pipeline or ledger types up there."""
    assert len(rocky_dagster.__all__) <= 25, rocky_dagster.__all__
    moved = {
        # one import deeper now
        "LoadPipeline": "rocky_dagster.pipelines",
        "pipeline_op": "rocky_dagster.pipelines",
        "pipeline_assets": "rocky_dagster.pipelines",
        "quality_checks": "rocky_dagster.pipelines",
        "open_ledger": "rocky_dagster.ledger",
        "Outcome": "rocky_dagster.ledger",
        "LedgerError": "rocky_dagster.errors",
        "PipelineError": "rocky_dagster.errors",
        "running_claim": "rocky_dagster.step.guard",
        "step_decisions": "rocky_dagster.step.presentation",
        "OUTCOME_TAG": "rocky_dagster.step.keys",
        "load_op": "rocky_dagster.decorators.pipeline_ops",
        "ledger_hook": "rocky_dagster.decorators.hooks",
        "LedgerAdminConfig": "rocky_dagster.operations.admin_job",
    }
    for name, module in moved.items():
        assert name not in rocky_dagster.__all__, name
        value = getattr(importlib.import_module(module), name)
        # (`rocky_dagster.decorators.pipeline_assets` is also a module: the attribute may be that)
        assert getattr(rocky_dagster, name, None) is not value, name


def test_every_error_has_one_root_and_imports_from_rocky_dagster_errors() -> None:
    errors_module = importlib.import_module("rocky_dagster.errors")
    root = errors_module.RockyDagsterError
    found: set[type] = set()
    modules = ("rocky_dagster.ledger", "rocky_dagster.effects", "rocky_dagster.pipelines")
    for module in (*modules, "rocky_dagster.errors"):
        mod = importlib.import_module(module)
        for name in dir(mod):
            value = getattr(mod, name)
            if isinstance(value, type) and issubclass(value, Exception):
                found.add(value)
    assert found, "no errors found"
    for error in found:
        assert issubclass(error, root), error
        assert getattr(errors_module, error.__name__) is error, error
    from rocky_dagster.errors import LedgerError, PipelineError

    assert LedgerError.__bases__ == (root,) and PipelineError.__bases__ == (root,)
    assert set(errors_module.__all__) >= {e.__name__ for e in found}


def test_renamed_names_say_what_they_do_and_the_old_ones_still_import() -> None:
    from rocky_dagster import IDEMPOTENCY_TAG, RequestBackoff
    from rocky_dagster.step.keys import FORCE_TAG

    assert IDEMPOTENCY_TAG == FORCE_TAG == "rocky/idempotency"
    with pytest.warns(DeprecationWarning, match="RequestBackoff"):
        from rocky_dagster.sensors.backoff import RetryBackoff
    assert RetryBackoff is RequestBackoff


def test_the_pipelines_import_no_dagster_until_a_builder_is_used() -> None:
    code = (
        "import sys; import rocky_dagster.pipelines as p; before = 'dagster' in sys.modules; "
        "p.pipeline_op; print(before, 'dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_version_comes_from_the_package_metadata() -> None:
    assert rocky_dagster.__version__ == importlib.metadata.version("rocky-dagster")


def test_importing_the_ledger_errors_does_not_import_dagster() -> None:
    code = (
        "import sys; from rocky_dagster.errors import LedgerError, PipelineError; "
        "from rocky_dagster import __version__; "
        "print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
