"""Reading CSV and JSON-lines files for the load pipeline: records, line numbers, type inference.

Records are consumed by `executemany` one row at a time, so the csv reader's `line_num` (or
the JSON tracker's `line`) is always the line of the row SQLite is inserting: a failing insert
names that line.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import LoadError

_INT = re.compile(r"^[+-]?(0|[1-9]\d{0,17})$")
_REAL = re.compile(r"^[+-]?((0|[1-9]\d*)(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
# SQLite's default SQLITE_MAX_LENGTH: any field SQLite can store loads; csv's default is 128 KiB.
FIELD_LIMIT = 1_000_000_000
INT64 = (-(2**63), 2**63 - 1)


_LIMIT_LOCK = threading.Lock()
_limit_users = 0
_limit_before = 0


@contextmanager
def large_fields() -> Iterator[None]:
    """Raise the csv module's (process-wide) field size limit while files are read.

    Counted, so that concurrent loads in threads keep the raised limit until the last one
    finishes, and the caller's own limit comes back afterwards.
    """
    global _limit_users, _limit_before
    with _LIMIT_LOCK:
        if _limit_users == 0:
            _limit_before = csv.field_size_limit(FIELD_LIMIT)
        _limit_users += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _limit_users -= 1
            if _limit_users == 0:
                csv.field_size_limit(_limit_before)


def csv_reader(text: IO[str], delimiter: str) -> Any:
    """A strict RFC 4180 reader: an unterminated quote or text after a closing quote is an
    error instead of silently merging lines into one field."""
    return csv.reader(text, delimiter=delimiter, strict=True)


def csv_error_line(path: str, encoding: str, delimiter: str) -> int:
    """Line where the record that a strict read rejects starts (slow path, errors only)."""
    with large_fields(), open(path, encoding=encoding, newline="") as text:
        reader = csv_reader(text, delimiter)
        last = 0
        try:
            for _ in reader:
                last = reader.line_num
        except csv.Error:
            return last + 1
    return last + 1


def decode_error_line(path: str, encoding: str) -> int:
    """First line holding bytes that are not valid `encoding` (slow path, errors only)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as raw:
        for chunk in raw:
            try:
                line += decoder.decode(chunk).count("\n")
            except UnicodeDecodeError:
                return line
    return line


@dataclass
class Tracker:
    """Where the JSON record generator is: the line and values of the row being inserted."""

    path: str
    line: int = 0
    row: list[Any] = field(default_factory=list)


def csv_header(
    text: IO[str], *, delimiter: str, header: bool, names: list[str] | None, path: str
) -> tuple[Iterator[list[str]], list[str]]:
    """The csv reader positioned at the first data row, and the file's column names
    (none for an empty file with a header and no `names`)."""
    reader = csv_reader(text, delimiter)
    columns = list(names or [])
    if header:
        first = next(filter(None, reader), None)  # blank lines before the header are skipped
        if first is None:
            return reader, columns
        columns = columns or [c.strip() for c in first]
    duplicates = sorted({c for c in columns if [x.lower() for x in columns].count(c.lower()) > 1})
    if duplicates or any(not c for c in columns):
        raise LoadError(f"header has duplicate or empty column names: {columns}", path=path, line=1)
    return reader, columns


def csv_rows(reader: Any) -> Iterator[list[str]]:
    """Data rows without blank lines, all in C (`filter`): the load's hot path has no Python
    per row. A row with the wrong number of fields fails in executemany on the row itself."""
    return filter(None, reader)


def csv_row_at(path: str, encoding: str, delimiter: str, line: int) -> list[str]:
    """Re-read the row that ends on `line`: the slow path that explains a rejected row."""
    with large_fields(), open(path, encoding=encoding, newline="") as text:
        reader = csv_reader(text, delimiter)
        for row in reader:
            if reader.line_num >= line:
                return row
    return []


def json_objects(text: IO[str], tracker: Tracker) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a non-object line is an error."""
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_not_json)
        except ValueError as exc:
            raise LoadError(f"invalid JSON: {exc}", path=tracker.path, line=number) from exc
        if not isinstance(obj, dict):
            raise LoadError(
                f"expected a JSON object, got {type(obj).__name__}", path=tracker.path, line=number
            )
        yield number, obj


def _not_json(name: str) -> Any:
    """NaN and Infinity are Python's extensions, not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def json_records(
    objects: Iterator[tuple[int, dict[str, Any]]], columns: list[str], tracker: Tracker
) -> Iterator[list[Any]]:
    """Objects as value lists in `columns` order; keys matched case-insensitively."""
    known = set(columns)
    lower = {c.lower(): c for c in columns}
    for number, obj in objects:
        if not known.issuperset(obj):
            remapped = {lower.get(k.lower(), k): v for k, v in obj.items()}
            unknown = sorted(set(remapped) - known)
            if unknown:
                raise LoadError(
                    f"keys {unknown} are not columns of the table {columns}",
                    path=tracker.path,
                    line=number,
                )
            obj = remapped
        tracker.line = number
        tracker.row = [_sql_value(obj.get(c)) for c in columns]
        yield tracker.row


def _sql_value(value: Any) -> Any:
    """JSON arrays and objects are stored as their JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return value


def infer_csv_types(rows: list[list[str]], columns: list[str]) -> dict[str, str]:
    """INTEGER / REAL / TEXT per column from sample rows; empty cells are ignored.
    Numbers with leading zeros (zip codes, ids) stay TEXT so no digit is lost."""
    types: dict[str, str] = {}
    for i, name in enumerate(columns):
        values = [r[i] for r in rows if i < len(r) and r[i] != ""]
        if values and all(_INT.match(v) for v in values):
            types[name] = "INTEGER"
        elif values and all(_REAL.match(v) for v in values):
            types[name] = "REAL"
        else:
            types[name] = "TEXT"
    return types


def infer_json_types(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Column order of first appearance; INTEGER / REAL / TEXT from the Python values."""
    seen: dict[str, set[type]] = {}
    for obj in objects:
        for key, value in obj.items():
            kinds = seen.setdefault(key, set())
            if value is not None:
                kinds.add(int if isinstance(value, bool) else type(value))
    types: dict[str, str] = {}
    for key, kinds in seen.items():
        if kinds and kinds <= {int}:
            types[key] = "INTEGER"
        elif kinds and kinds <= {int, float}:
            types[key] = "REAL"
        else:
            types[key] = "TEXT"
    return types


def explain_value(row: list[Any], columns: list[str], types: dict[str, str]) -> str | None:
    """Which value of a rejected row does not fit its column's type, for the error message."""
    for name, value in zip(columns, row, strict=False):
        wanted = types.get(name.lower(), "")
        if value in (None, "") or wanted not in ("INTEGER", "REAL"):
            continue
        text = str(value).strip()
        ok = _INT.match(text) or (_REAL.match(text) and float(text).is_integer())
        if wanted == "REAL":
            ok = _REAL.match(text)
        if not ok:
            return f"column {name!r} expects {wanted}, got {value!r}"
    return None
