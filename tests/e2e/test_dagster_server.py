"""The e2e helper's GraphQL documents are valid against the installed Dagster schema.

Cheap (no server): a renamed argument or a mutation that changed shape between Dagster
releases (stopSensor takes an id in 1.13, not a selector) fails here with the schema's message
instead of as a timeout in an end-to-end test.
"""

from __future__ import annotations

import os

import pytest
from dagster_graphql.schema import create_schema
from dagster_server import QUERIES, session_processes
from graphql import parse, validate


@pytest.fixture(scope="module")
def schema():
    return create_schema().graphql_schema


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_document_is_valid_against_the_installed_schema(schema, name: str) -> None:
    errors = validate(schema, parse(QUERIES[name]))
    assert not errors, [e.message for e in errors]


def test_a_selector_for_stop_sensor_is_rejected(schema) -> None:
    """The validation above can fail: the pre-1.13 stopSensor(sensorSelector:) shape is invalid."""
    old = "mutation($s: SensorSelector!) { stopSensor(sensorSelector: $s) { __typename } }"
    assert validate(schema, parse(old))


def test_session_processes_finds_this_session() -> None:
    sid = os.getsid(0)
    assert os.getpid() in {pid for pid, _ in session_processes(sid)}
