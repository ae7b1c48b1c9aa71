"""A skip that reports a materialization replaying the recorded one: in every backfill run, and
in every run when the ledger resource says `replay_skips`.

Dagster's asset catalog and the asset page's overview render only an asset's latest
materialization, so a skip reported as an observation is seen only in the Events tab; a
replay shows there as the latest materialization, with the skip's decision in its metadata.
Dagster's asset backfill counts a targeted asset partition as done only when a run of the
backfill materializes it. A guarded asset whose key is already done yields no output, so
Dagster 1.12 leaves such a backfill in progress forever, and 1.13.22+ marks the partition
failed (dagster issue #34219). In a backfill run, a skip whose key already succeeded therefore
reports a materialization that replays the recorded one: no work is done, its metadata carries
the decision and the run that did the work, and its data version is the prior
materialization's, so nothing downstream turns stale. Outside backfills a skip still
materializes nothing unless the resource asks for replays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DataVersion, MaterializeResult, MetadataValue

BACKFILL_TAG = "dagster/backfill"
DATA_VERSION_TAG = "dagster/data_version"
REPLAY_KEY = "rocky/replay"
"""Metadata of a replayed materialization: true (the step did no work)."""


def skip_replay(
    context: Any,
    asset_key: AssetKey,
    partition: str | None,
    decision: str,
    metadata: Mapping[str, Any],
    *,
    everywhere: bool = False,
) -> MaterializeResult | None:
    """The materialization a skipped asset reports in a backfill run, or in any run with
    `everywhere` (None otherwise, and for a skip whose key is not done: in flight elsewhere,
    nothing may claim it was materialized)."""
    if decision != "skipped_completed":
        return None
    if not everywhere and BACKFILL_TAG not in context.run.tags:
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
