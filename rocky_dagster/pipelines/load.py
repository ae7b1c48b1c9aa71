"""Load: ingest CSV and JSON-lines files into one warehouse table, each file exactly once.

Every loaded file is recorded in `_rocky_loaded_files` with its size and SHA-256 in the same
transaction as its rows, so "loaded" and "recorded" can never disagree; a file whose content
was already loaded into the table is skipped unless `reload` is set.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator
from sqlite_utils import Database

from ..effects import EffectClaim
from . import fileformats as ff
from .base import PipelineConfig, check_identifier, failure_context, write_transaction
from .errors import LoadError, PipelineError
from .results import FileRecord, PipelineResult, TableStats, utcnow
from .sql import affinity, object_type, qi, table_columns

LOADED_FILES = "_rocky_loaded_files"
TYPE_CHECK_TRIGGER = "_rocky_load_type_check"
ColumnType = Literal["INTEGER", "REAL", "TEXT", "BLOB", "ANY"]
_TYPEOF = {"INTEGER": ("integer",), "REAL": ("real",), "NUMERIC": ("integer", "real")}


@dataclass(frozen=True)
class InputFile:
    """A matched file with the identity it is deduplicated by."""

    path: Path
    format: str
    size: int
    sha256: str
    mtime_ns: int

    def record(
        self, rows: int, status: Literal["loaded", "skipped"], reason: str | None = None
    ) -> FileRecord:
        return FileRecord(
            path=str(self.path),
            size=self.size,
            sha256=self.sha256,
            rows=rows,
            status=status,
            reason=reason,
        )


class LoadPipeline(PipelineConfig):
    """Load files matching `pattern` under `directory` into `table`."""

    pipeline_type: ClassVar[str] = "load"

    directory: str = Field(description="Directory holding the input files.")
    pattern: str = Field("*", description="Glob relative to directory, e.g. '*.csv', '**/*.jsonl'.")
    table: str = Field(description="Warehouse table the rows go to.")
    format: Literal["auto", "csv", "jsonl"] = Field(
        "auto",
        description="'auto' picks by extension: .csv/.txt → csv, .jsonl/.ndjson/.json → jsonl.",
    )
    header: bool = Field(True, description="CSV: the first row names the columns.")
    column_names: list[str] | None = Field(
        None, description="Column names; required without header."
    )
    column_types: dict[str, ColumnType] = Field(
        default_factory=dict, description="Declared types; other columns are inferred."
    )
    infer_rows: int = Field(1000, ge=1, description="Rows sampled to infer column types.")
    delimiter: str = Field(",", min_length=1, max_length=1)
    encoding: str = "utf-8-sig"
    empty_as_null: bool = Field(True, description="CSV: an empty field is NULL.")
    batch_size: int = Field(50_000, ge=1, description="Rows per executemany call.")
    create_table: bool = Field(True, description="Create the table (STRICT, typed) if missing.")
    truncate_first: bool = Field(
        False, description="Replace the table's content with the matched files when they changed."
    )
    reload: bool = Field(False, description="Load files even if their checksum was loaded before.")

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        return check_identifier(value, "table name")

    @field_validator("column_types", mode="before")
    @classmethod
    def _upper_types(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v.upper() if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _names_when_headerless(self) -> Self:
        if not self.header and not self.column_names:
            raise ValueError("column_names: required when header is false")
        names = [n.lower() for n in self.column_names or []]
        if len(set(names)) != len(names) or any(not n.strip() for n in names):
            raise ValueError("column_names: must be distinct and non-empty")
        return self

    def run(self, *, claim: EffectClaim | None = None) -> PipelineResult:
        """Load new files in one transaction; a bad row anywhere leaves the warehouse as it was."""
        effect = self._effect(claim)
        directory = Path(self.directory)
        if not directory.is_dir():
            raise PipelineError(
                f"directory: {self.directory!r} does not exist", path=self.directory
            )
        with failure_context(f"scanning {self.directory!r}", table=self.table):
            inputs = [self._scan(p) for p in sorted(directory.glob(self.pattern)) if p.is_file()]
        result = PipelineResult(pipeline_type=self.pipeline_type)
        with (
            self._session() as (conn, db),
            write_transaction(conn),
            failure_context(f"loading into {self.table!r}", table=self.table),
        ):
            recorded = effect.begin(conn)
            if recorded is not None:
                return recorded
            started = time.perf_counter()
            stats = result.table(self.table)
            _ensure_loaded_files(db)
            todo, records = self._plan(conn, inputs)
            if todo and self.truncate_first and object_type(conn, self.table) == "table":
                stats.rows_deleted = conn.execute(f"DELETE FROM main.{qi(self.table)}").rowcount
                conn.execute(f"DELETE FROM {LOADED_FILES} WHERE target_table = ?", (self.table,))
            loaded: list[dict[str, Any]] = []
            schemaless: list[InputFile] = []
            for item in todo:
                with self._file_context(item), ff.large_fields():
                    if not self._prepare_table(conn, db, item):
                        schemaless.append(item)
                    rows = _FileLoader(self, conn, item, stats).load()
                records[item.path] = item.record(rows, "loaded")
                loaded.append(self._ledger_row(item, rows))
            if schemaless and object_type(conn, self.table) is None:
                raise LoadError(
                    f"the file is empty, so there are no columns to create table "
                    f"{self.table!r} from; give column_names, or load a file with "
                    "a header or a record first",
                    path=str(schemaless[0].path),
                    table=self.table,
                )
            if loaded:
                db[LOADED_FILES].upsert_all(loaded, pk=("target_table", "path", "sha256"))  # type: ignore[union-attr]
            stats.duration_seconds = round(time.perf_counter() - started, 6)
            result.files = [records[i.path] for i in inputs]
            result.details = {"table": self.table}
            effect.commit(conn, result.finish())
        return result

    def _scan(self, path: Path) -> InputFile:
        fmt = self.format if self.format != "auto" else _format_of(path)
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            raise LoadError(f"cannot read the file: {exc}", path=str(path)) from exc
        return InputFile(path, fmt, stat.st_size, digest, stat.st_mtime_ns)

    def _plan(
        self, conn: sqlite3.Connection, inputs: list[InputFile]
    ) -> tuple[list[InputFile], dict[Path, FileRecord]]:
        """Which files to load; the rest are recorded as skipped with the reason."""
        done = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                f"SELECT sha256, path, loaded_at FROM {LOADED_FILES} WHERE target_table = ?",
                (self.table,),
            )
        }
        if object_type(conn, self.table) is None:  # records of a dropped table are stale
            conn.execute(f"DELETE FROM {LOADED_FILES} WHERE target_table = ?", (self.table,))
            done = {}
        records: dict[Path, FileRecord] = {}
        unchanged = {i.sha256 for i in inputs} == set(done)
        if self.truncate_first and not self.reload and (unchanged or not inputs):
            for item in inputs:
                records[item.path] = item.record(
                    0, "skipped", "table already holds exactly these files"
                )
            return [], records
        if self.truncate_first:
            done = {}
        todo: list[InputFile] = []
        for item in inputs:
            if item.sha256 in done and not self.reload:
                path, when = done[item.sha256]
                records[item.path] = item.record(
                    0, "skipped", f"same content already loaded from {path} ({when})"
                )
                continue
            done.setdefault(item.sha256, (str(item.path), "earlier in this run"))
            todo.append(item)
        return todo, records

    def _prepare_table(self, conn: sqlite3.Connection, db: Database, item: InputFile) -> bool:
        """Create the table from the first file (inferred + declared types) or vet the existing
        one; False when the table is missing and this file names no column (it is empty)."""
        kind = object_type(conn, self.table)
        if kind == "view":
            raise PipelineError(f"table: {self.table!r} is a view")
        if kind is None:
            if not self.create_table:
                raise PipelineError(
                    f"table: {self.table!r} does not exist and create_table is false"
                )
            declared = {k.lower(): v for k, v in self.column_types.items()}
            inferred = self._infer(item)
            if not inferred:
                return False
            columns = {name: declared.get(name.lower(), typ) for name, typ in inferred.items()}
            db[self.table].create(columns, strict=True)  # type: ignore[union-attr]
            return True
        existing = {c.name.lower(): c.type.upper() for c in table_columns(conn, self.table)}
        for name, wanted in self.column_types.items():
            if name.lower() in existing and existing[name.lower()] != wanted:
                raise PipelineError(
                    f"column_types: {name!r} is {wanted} but table {self.table!r} declares it "
                    f"{existing[name.lower()] or 'untyped'}"
                )
        return True

    @contextmanager
    def _file_context(self, item: InputFile) -> Iterator[None]:
        """Turn whatever reading one file raises into a LoadError naming the file and line."""
        path = str(item.path)
        try:
            yield
        except PipelineError as exc:
            exc.locate(table=self.table, path=path)
            raise
        except csv.Error as exc:
            line = ff.csv_error_line(path, self.encoding, self.delimiter)
            raise LoadError(
                f"malformed CSV in the record starting here: {exc}",
                path=path,
                line=line,
                table=self.table,
            ) from exc
        except UnicodeDecodeError as exc:
            raise LoadError(
                f"not valid {self.encoding}: {exc.reason}",
                path=path,
                line=ff.decode_error_line(path, self.encoding),
                table=self.table,
            ) from exc
        except sqlite3.Error as exc:
            raise LoadError(f"{type(exc).__name__}: {exc}", path=path, table=self.table) from exc
        except OSError as exc:
            raise LoadError(f"cannot read the file: {exc}", path=path, table=self.table) from exc

    def _infer(self, item: InputFile) -> dict[str, str]:
        tracker = ff.Tracker(path=str(item.path))
        with _open_text(item.path, self.encoding) as text:
            if item.format == "csv":
                reader, columns = ff.csv_header(
                    text,
                    delimiter=self.delimiter,
                    header=self.header,
                    names=self.column_names,
                    path=str(item.path),
                )
                sample = list(itertools.islice(ff.csv_rows(reader), self.infer_rows))
                return ff.infer_csv_types(sample, columns)
            objects = [
                obj for _, obj in itertools.islice(ff.json_objects(text, tracker), self.infer_rows)
            ]
        types = ff.infer_json_types(objects)
        if self.column_names:
            return {name: types.get(name, "TEXT") for name in self.column_names}
        return types

    def _ledger_row(self, item: InputFile, rows: int) -> dict[str, Any]:
        return {
            "target_table": self.table,
            "path": str(item.path),
            "sha256": item.sha256,
            "size": item.size,
            "rows": rows,
            "format": item.format,
            "loaded_at": utcnow().isoformat(),
        }


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise LoadError("cannot tell the format from the extension; set format", path=str(path))


def _open_text(path: Path, encoding: str) -> io.TextIOWrapper:
    return open(path, encoding=encoding, newline="")  # the caller closes it


def _ensure_loaded_files(db: Database) -> None:
    db[LOADED_FILES].create(  # type: ignore[union-attr]
        {
            "target_table": str,
            "path": str,
            "sha256": str,
            "size": int,
            "rows": int,
            "format": str,
            "loaded_at": str,
        },
        pk=("target_table", "path", "sha256"),
        if_not_exists=True,
    )


class _FileLoader:
    """Streams one file into the table with executemany; any failure names file and line."""

    def __init__(
        self, cfg: LoadPipeline, conn: sqlite3.Connection, item: InputFile, stats: TableStats
    ):
        self.cfg, self.conn, self.item, self.stats = cfg, conn, item, stats
        self.path = str(item.path)
        self.tracker = ff.Tracker(path=self.path)
        columns = table_columns(conn, cfg.table)
        self.table_cols = {c.name.lower(): c.name for c in columns}
        self.types = {c.name.lower(): c.type.upper() for c in columns}
        self.position: Callable[[], int] = lambda: self.tracker.line

    def load(self) -> int:
        with _open_text(self.item.path, self.cfg.encoding) as text:
            if self.item.format == "csv":
                reader, columns = ff.csv_header(
                    text,
                    delimiter=self.cfg.delimiter,
                    header=self.cfg.header,
                    names=self.cfg.column_names,
                    path=self.path,
                )
                if not columns or not self.table_cols:
                    return 0  # an empty file: no header, so no rows either
                names = self._table_names(columns)
                records: Iterator[list[Any]] = ff.csv_rows(reader)
                wrap = "NULLIF(?, '')" if self.cfg.empty_as_null else "?"
                self.position = lambda: reader.line_num
            else:
                if not self.table_cols:
                    return 0  # no table: _prepare_table found no record in the file
                names = list(self.table_cols.values())
                records = ff.json_records(ff.json_objects(text, self.tracker), names, self.tracker)
                wrap = "?"
            cols = ", ".join(qi(n) for n in names)
            marks = ", ".join(wrap for _ in names)
            sql = f"INSERT INTO main.{qi(self.cfg.table)} ({cols}) VALUES ({marks})"
            rows = self._insert(sql, records, names)
        stat = os.stat(self.item.path)
        if (stat.st_size, stat.st_mtime_ns) != (self.item.size, self.item.mtime_ns):
            raise LoadError("file changed while it was being loaded; run again", path=self.path)
        self.stats.rows_read += rows
        self.stats.rows_inserted += rows
        return rows

    def _table_names(self, columns: list[str]) -> list[str]:
        """The table's spelling of the file's columns; unknown columns are an error."""
        unknown = [c for c in columns if c.lower() not in self.table_cols]
        if unknown:
            raise LoadError(
                f"columns {unknown} are not in table {self.cfg.table!r} "
                f"({list(self.table_cols.values())})",
                path=self.path,
                line=1,
            )
        return [self.table_cols[c.lower()] for c in columns]

    def _insert(self, sql: str, records: Iterator[list[Any]], names: list[str]) -> int:
        """executemany in batches of lazily pulled rows, so the current line is the failing one."""
        checked = self._type_trigger(names)
        total = 0
        try:
            while True:
                cur = self.conn.executemany(sql, itertools.islice(records, self.cfg.batch_size))
                total += max(cur.rowcount, 0)
                if cur.rowcount < self.cfg.batch_size:
                    return total
        except sqlite3.Error as exc:
            line = self.position()
            raise LoadError(self._explain(exc, names, line), path=self.path, line=line) from exc
        except OverflowError as exc:
            line = self.position()
            raise LoadError(
                f"an integer beyond SQLite's 64-bit range ({exc}); write it as a JSON string",
                path=self.path,
                line=line,
            ) from exc
        finally:
            if checked:
                self.conn.execute(f"DROP TRIGGER IF EXISTS temp.{TYPE_CHECK_TRIGGER}")

    def _explain(self, exc: sqlite3.Error, names: list[str], line: int) -> str:
        if self.item.format == "csv":
            row = ff.csv_row_at(self.path, self.cfg.encoding, self.cfg.delimiter, line)
        else:
            row = self.tracker.row
        if isinstance(exc, sqlite3.ProgrammingError) and "number of bindings" in str(exc):
            return f"expected {len(names)} fields, found {len(row)}"
        return "row rejected: " + (ff.explain_value(row, names, self.types) or str(exc))

    def _type_trigger(self, names: list[str]) -> bool:
        """STRICT tables reject mistyped values natively; other tables get a temporary trigger."""
        strict = self.conn.execute(f"PRAGMA main.table_list({qi(self.cfg.table)})").fetchone()[5]
        conditions = []
        for name in names:
            allowed = _TYPEOF.get(affinity(self.types[name.lower()]))
            if allowed and not strict:
                kinds = ", ".join(f"'{k}'" for k in (*allowed, "null"))
                conditions.append(f"typeof(NEW.{qi(name)}) NOT IN ({kinds})")
        if not conditions:
            return False
        self.conn.execute(
            f"CREATE TEMP TRIGGER {TYPE_CHECK_TRIGGER} AFTER INSERT ON main.{qi(self.cfg.table)} "
            f"WHEN {' OR '.join(conditions)} BEGIN SELECT RAISE(ABORT, 'value does not match "
            "the column type'); END"
        )
        return True
