"""Operator actions on the ledger, from the CLI and from the Dagster UI."""
