"""A tiny shop warehouse run by rocky_dagster: load, replicate, transform, check, snapshot."""
