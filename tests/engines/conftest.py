"""Fixtures of the engine suite; they live in `engines_deployment`, which the tests import by
that name (a module named `conftest` is ambiguous when several test folders are collected)."""

from engines_deployment import (  # noqa: F401 - fixtures and a hook, registered by being here
    deployment,
    pytest_collection_modifyitems,
    redis_server,
)
