"""`input_versions_key`: key an asset by its code and the versions of what it reads.

Dagster's data versions show an asset as *stale* when its code or an upstream asset changed, but
nothing stops a run from recomputing an asset that is not stale. Used as an asset's `key_fn`,
this key makes every launch path (declarative automation, a schedule, a manual materialize, a
backfill) skip an asset whose code version and inputs are the ones it last succeeded with: the
ledger records the success under exactly that combination, and a new upstream materialization
or code version is a new key, so the asset runs again.

The base key is ``inputs:<digest>:code:<code version>`` (the ledger key appends the partition
and the asset key); the digest covers, per upstream asset,
its latest data version (``dagster/data_version`` of its latest materialization of the same
partition) or, when it carries none, that materialization's storage id; an upstream asset never
materialized counts as ``none``. An asset with no upstream asset has no inputs to key on: the
run's own key (tag, run_key, partition) applies, as without a key_fn. For an asset check the
input is the asset it checks: the check runs again once that asset changed.

`inputs_key` is the same key with the state of what an asset reads from outside Dagster folded
in (a pipeline's drop files, source database or model files). It is what a guarded asset claims
when its launch carries no key at all (a Materialize click, ``dg launch``, declarative
automation): unchanged inputs skip, naming the run that did the work; changed inputs proceed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

DATA_VERSION_TAG = "dagster/data_version"


def input_versions_key(context: Any, asset_key: AssetKey | None = None) -> str | None:
    """The base key of `asset_key` (default: the context's asset) for this run's inputs;
    None (no opinion: the run's key applies) for an asset with no upstream asset.

    Examples:
        .. code-block:: python

            from rocky_dagster import idempotent_asset, input_versions_key

            @idempotent_asset(key_fn=input_versions_key, code_version="2", deps=["orders"])
            def order_summary(context) -> None:
                ...  # recomputed only when `orders` was materialized again or the code changed
    """
    return inputs_key(context, asset_key)


def inputs_key(
    context: Any, asset_key: AssetKey | None = None, *, input_state: str | None = None
) -> str | None:
    """The base key of what `asset_key` reads: its upstream assets' data versions, its code
    version and `input_state` (the digest of what it reads from outside Dagster, see
    `pipeline_input_state`); None when it reads nothing known (no upstream, no state)."""
    key = asset_key or context.asset_key
    partition = context.partition_key if context.has_partition_key else None
    assets_def = getattr(context, "assets_def", None)
    if assets_def is None or key not in assets_def.keys:
        # an asset check: its one input is the asset it checks
        code_version, upstream = "-", [key]
    else:
        code_version = assets_def.code_versions_by_key.get(key) or "-"
        upstream = sorted(assets_def.asset_deps.get(key, ()), key=lambda k: k.to_user_string())
    if not upstream and input_state is None:
        return None
    parts = [
        f"{dep.to_user_string()}={_latest_version(context.instance, dep, partition)}"
        for dep in upstream
    ]
    if input_state is not None:
        parts.append(f"<outside>={input_state}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"inputs:{digest}:code:{code_version}"


def _latest_version(instance: DagsterInstance, key: AssetKey, partition: str | None) -> str:
    """The upstream asset's latest data version: of the same partition when the upstream is
    partitioned, of its latest materialization when it is not."""
    filters = [AssetRecordsFilter(asset_key=key)]
    if partition is not None:
        filters.insert(0, AssetRecordsFilter(asset_key=key, asset_partitions=[partition]))
    for records_filter in filters:
        records = instance.fetch_materializations(records_filter, limit=1).records
        if not records:
            continue
        materialization = records[0].asset_materialization
        if materialization is None:
            continue
        if records_filter.asset_partitions is None and materialization.partition is not None:
            return "none"  # partitioned upstream, this partition never materialized
        version = materialization.tags.get(DATA_VERSION_TAG)
        return version or f"storage:{records[0].storage_id}"
    return "none"


def pipeline_input_paths(pipeline: Any) -> list[Path] | None:
    """The files a pipeline reads from outside its warehouse (None: it reads only the
    warehouse, whose tables are assets with their own data versions)."""
    directory = getattr(pipeline, "directory", None)
    if directory is not None:  # load: the files it would read
        pattern = getattr(pipeline, "pattern", "*")
        return sorted(p for p in Path(directory).glob(pattern) if p.is_file())
    source = getattr(pipeline, "source", None)
    if source:  # replication: the source database
        return [Path(source)]
    models_dir = getattr(pipeline, "models_dir", None)
    if models_dir:  # transformation: the models
        return sorted(Path(models_dir).rglob("*.sql"))
    return None


def pipeline_input_state(pipeline: Any) -> str | None:
    """A digest of what a pipeline reads from outside its warehouse (names, sizes, modification
    times of its files) and of its configuration; None when it reads nothing outside."""
    paths = pipeline_input_paths(pipeline)
    if paths is None:
        return None
    return files_state(paths, extra=pipeline.fingerprint())


def files_state(paths: list[Path], extra: str | None = None) -> str:
    """A digest of files' names, sizes and modification times (a missing file counts too)."""
    stats: list[Any] = [] if extra is None else [extra]
    for path in paths:
        try:
            info = path.stat()
            stats.append((str(path), info.st_size, info.st_mtime_ns))
        except OSError:
            stats.append((str(path), None, None))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
