"""A skip inside an asset backfill run still counts as done for the backfill.

Dagster's asset backfill counts a targeted asset partition as done only when a run of the
backfill materializes it. A guarded asset whose key is already done yields no output, so
Dagster 1.12 leaves such a backfill in progress forever, and 1.13.22+ marks the partition
failed (dagster issue #34219). In a backfill run, a skip whose key already succeeded therefore
reports a materialization that replays the recorded one: no work is done, its metadata carries
the decision and the run that did the work, and its data version is the prior
materialization's, so nothing downstream turns stale. Outside backfills a skip still
materializes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DataVersion, MaterializeResult, MetadataValue

BACKFILL_TAG = "dagster/backfill"
DATA_VERSION_TAG = "dagster/data_version"
REPLAY_KEY = "rocky/backfill_replay"
"""Metadata of a replayed materialization: true (the step did no work)."""


def backfill_replay(
    context: Any,
    asset_key: AssetKey,
    partition: str | None,
    decision: str,
    metadata: Mapping[str, Any],
) -> MaterializeResult | None:
    """The materialization a skipped asset reports in a backfill run (None elsewhere, and for
    a skip whose key is not done: in flight elsewhere, the backfill must not count it)."""
    if decision != "skipped_completed" or BACKFILL_TAG not in context.run.tags:
        return None
    version = _prior_data_version(context.instance, asset_key, partition)
    return MaterializeResult(
        asset_key=asset_key,
        metadata={**metadata, REPLAY_KEY: MetadataValue.bool(True)},
        data_version=DataVersion(version) if version else None,
    )


def _prior_data_version(instance: Any, asset_key: AssetKey, partition: str | None) -> str | None:
    records_filter = AssetRecordsFilter(
        asset_key=asset_key, asset_partitions=[partition] if partition is not None else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    return records[0].asset_materialization.tags.get(DATA_VERSION_TAG)
