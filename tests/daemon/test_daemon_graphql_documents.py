"""The daemon suite's GraphQL documents are valid against the installed Dagster schema.

Cheap (no server): a renamed argument or a changed result type fails here with the schema's
own message, instead of as a timeout deep inside an end-to-end test.
"""

from __future__ import annotations

import pytest
from daemon_server import DOCUMENTS
from dagster_graphql.schema import create_schema
from graphql import GraphQLSchema, parse, validate


@pytest.fixture(scope="module")
def schema() -> GraphQLSchema:
    return create_schema().graphql_schema


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_document_is_valid_against_the_installed_schema(schema: GraphQLSchema, name: str) -> None:
    errors = validate(schema, parse(DOCUMENTS[name]))
    assert not errors, [e.message for e in errors]


def test_validation_can_fail(schema: GraphQLSchema) -> None:
    """A document using a field the schema lacks is reported (the check above is not vacuous)."""
    bad = DOCUMENTS["sensor_ticks"].replace("skipReason", "skipReasonText")
    assert validate(schema, parse(bad))
