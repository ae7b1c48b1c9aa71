"""Shared config base and warehouse plumbing for every pipeline type."""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlite_utils import Database

from ..effects import Effect, EffectClaim
from ..effects import sqlite as effects_sqlite
from .errors import PipelineConfigError, PipelineError, WarehouseError
from .results import PipelineResult
from .sql import INTERNAL_PREFIX

BUSY_TIMEOUT_SECONDS = 30
MIN_SQLITE = (3, 37, 0)


def connect_warehouse(path: str) -> sqlite3.Connection:
    """Open the warehouse in WAL mode with a 30 s busy timeout, in autocommit mode so that
    transactions are only the ones `write_transaction` opens explicitly."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise PipelineError(
            f"SQLite {sqlite3.sqlite_version} is too old: the pipelines need STRICT tables and "
            f"upserts, SQLite {'.'.join(map(str, MIN_SQLITE))} or newer"
        )
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, uri=True)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA temp_store=MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """All of a run's writes in one IMMEDIATE transaction: a failure rolls every table back,
    and taking the write lock up front avoids deadlocking with a concurrent writer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def failure_context(
    label: str, *, table: str | None = None, path: str | None = None
) -> Iterator[None]:
    """Re-raise SQLite errors as WarehouseError naming what was being done, and give any
    PipelineError raised inside the table / file it concerns."""
    try:
        yield
    except PipelineError as exc:
        exc.locate(table=table, path=path)
        raise
    except sqlite3.Error as exc:
        raise WarehouseError(f"{label}: {exc}", table=table, path=path) from exc


def _guarded_run(run: Callable[..., PipelineResult]) -> Callable[..., PipelineResult]:
    """Wrap a pipeline's `run` so every failure is a PipelineError naming the pipeline.

    Runs write in one transaction that a failure rolls back, so the error is all that is left;
    an unexpected exception type is kept as the cause rather than leaking out raw.
    """

    @functools.wraps(run)
    def guarded(self: PipelineConfig, *args: Any, **kwargs: Any) -> PipelineResult:
        try:
            return run(self, *args, **kwargs)
        except PipelineError as exc:
            exc.locate(pipeline=self.pipeline_type)
            raise
        except sqlite3.Error as exc:
            raise WarehouseError(
                f"{type(exc).__name__}: {exc}", pipeline=self.pipeline_type
            ) from exc
        except Exception as exc:
            raise PipelineError(
                f"unexpected {type(exc).__name__}: {exc}", pipeline=self.pipeline_type
            ) from exc

    guarded.__rocky_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def check_identifier(value: str, field: str) -> str:
    """Reject empty names and names in rocky's reserved `_rocky_` namespace."""
    if not value.strip():
        raise ValueError(f"{field} must not be empty")
    if value.lower().startswith(INTERNAL_PREFIX):
        raise ValueError(f"{field} {value!r} uses the reserved prefix {INTERNAL_PREFIX!r}")
    return value


def as_list(value: Any) -> Any:
    """Accept a single name where a list of names is expected (YAML convenience)."""
    return [value] if isinstance(value, str) else value


class PipelineConfig(BaseModel):
    """Base of every pipeline config: frozen, strict about unknown fields, fingerprintable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pipeline_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, "__rocky_guarded__", False):
            cls.run = _guarded_run(run)  # type: ignore[method-assign]

    warehouse: str = Field(
        description="Path of the warehouse SQLite file; created if missing, its directory must exist."
    )

    @field_validator("warehouse")
    @classmethod
    def _warehouse_directory_exists(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be the path of a SQLite file, e.g. /data/warehouse.db")
        path = Path(value)
        if path.is_dir():
            raise ValueError(f"{value!r} is a directory; give the path of a SQLite file inside it")
        if not path.parent.is_dir():
            raise ValueError(
                f"directory {str(path.parent)!r} does not exist; create it or fix the path"
            )
        return value

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of type + config: equal configs give equal fingerprints
        in any process, so the ledger can tell a re-run from a changed definition."""
        payload = {"pipeline_type": self.pipeline_type, "config": self.model_dump(mode="json")}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls.model_validate(dict(data))

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Self:
        """Build from a YAML file path or YAML text holding a mapping of this config's fields."""
        return cls.model_validate(read_yaml_mapping(path_or_text))

    def run(self, *, claim: EffectClaim | None = None) -> PipelineResult:
        """Run once. With a `claim` (the ledger's answer for this step) the warehouse writes
        commit together with the claim's effect marker: exactly once per key generation."""
        raise NotImplementedError

    def _effect(self, claim: EffectClaim | None) -> PipelineEffect:
        """The run's effect bookkeeping: checks `claim` now, before the run does any work."""
        return PipelineEffect(claim, self.pipeline_type)

    @contextmanager
    def _session(self) -> Iterator[tuple[sqlite3.Connection, Database]]:
        """Warehouse connection for one run, wrapped for sqlite-utils, closed at the end."""
        label = f"{self.pipeline_type} pipeline on {self.warehouse}"
        with failure_context("opening the warehouse", path=self.warehouse):
            conn = connect_warehouse(self.warehouse)
        try:
            with failure_context(label):
                db = Database(conn)
                # SQLite >= 3.37 is checked at connect; pre-answering sqlite-utils' upsert probe
                # keeps it from creating a throwaway table in the warehouse mid-transaction.
                db._supports_on_conflict = True  # type: ignore[attr-defined]
                yield conn, db
        finally:
            conn.close()


class PipelineEffect(Effect):
    """A pipeline run's effect on its SQLite warehouse, whose recorded result is the run's
    PipelineResult (the effects know no pipeline types, so the pipelines add that here)."""

    def begin(self, conn: sqlite3.Connection) -> PipelineResult | None:
        """Call first inside the write transaction: the recorded PipelineResult, marked
        already_applied, when this generation's work is committed; else None. FenceLostError
        when a later holder or a newer generation committed it."""
        marker = effects_sqlite.applied(conn, self)
        if marker is None:
            return None
        recorded = PipelineResult.model_validate_json(marker.result_json)
        recorded.already_applied = True
        return recorded

    def commit(self, conn: sqlite3.Connection, result: PipelineResult) -> None:
        """Call last inside the run's write transaction: the marker commits with the writes."""
        summary = json.dumps(result.summary(), sort_keys=True)
        effects_sqlite.record(conn, self, result.model_dump_json(), summary)


def read_yaml_mapping(path_or_text: str | Path) -> dict[str, Any]:
    """Parse YAML from a file (a Path, or a one-line string naming a file) or from text."""
    if isinstance(path_or_text, Path) or (
        "\n" not in path_or_text
        and ": " not in path_or_text
        and (path_or_text.endswith((".yml", ".yaml")) or Path(path_or_text).is_file())
    ):
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    else:
        text = str(path_or_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineConfigError(
            f"a pipeline config must be a YAML mapping of fields, got {type(data).__name__}"
        )
    return data
