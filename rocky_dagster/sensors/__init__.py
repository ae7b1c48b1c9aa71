"""Sensors and schedules that ask the ledger before they request a run."""
