"""Quality: data checks on warehouse tables, read-only, every check reported.

All checks run in one read transaction with `query_only` on, so they see one consistent
snapshot and a custom expression cannot modify the warehouse. Error-severity failures fail
the run only after every check has been evaluated and reported.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..effects import EffectClaim
from .base import PipelineConfig, as_list, write_transaction
from .errors import PipelineError, QualityChecksFailed
from .results import CheckResult, PipelineResult, Severity, utcnow
from .sql import fetch_dicts, qi, table_columns
from .sqlmodels import single_select

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Outcome:
    passed: bool
    failing_rows: int = 0
    sample_rows: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str = Field(
        description="Check name (letters, digits, _), unique per table; defaults to kind_column."
    )
    severity: Severity = "error"
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name"):
            column = data.get("column") or "_".join(as_list(data.get("columns") or []))
            base = f"{data.get('kind', cls.model_fields['kind'].default)}_{column}".rstrip("_")
            data = {**data, "name": re.sub(r"[^A-Za-z0-9_]", "_", base)}
        return data

    @field_validator("name")
    @classmethod
    def _dagster_safe_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} may only contain letters, digits and underscores")
        return value

    @property
    def target(self) -> str | None:
        return getattr(self, "table", None)

    @property
    def column_label(self) -> str | None:
        return getattr(self, "column", None)

    def rule(self) -> str:
        raise NotImplementedError

    def validate(self, conn: sqlite3.Connection) -> None:
        """Hook run before the check's SQL."""

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        raise NotImplementedError

    def evaluate(self, conn: sqlite3.Connection, now: datetime) -> CheckResult:
        """Run the check; any error (SQL or a value it cannot read) is a failed check at this
        check's severity, so one broken check never hides the results of the others."""
        error = None
        try:
            self.validate(conn)
            outcome = self.outcome(conn, now)
        except Exception as exc:  # reported as a failed check; the run then fails on it
            outcome, error = Outcome(passed=False), f"{type(exc).__name__}: {exc}"
        return CheckResult(
            name=self.name,
            table=self.target,
            kind=self.kind,
            column=self.column_label,
            severity=self.severity,
            passed=outcome.passed,
            failing_rows=outcome.failing_rows,
            sample_rows=outcome.sample_rows,
            description=self.description or self.rule(),
            error=error,
            details=outcome.details,
        )


class _TableCheck(_Check):
    table: str
    where: str | None = Field(None, description="SQL condition limiting the rows checked.")

    def validate(self, conn: sqlite3.Connection) -> None:
        """SQLite reads an unknown "column" as a string literal, so a misspelt column would
        pass silently; make it an error instead."""
        present = {c.name.lower() for c in table_columns(conn, self.table)}
        if not present:
            raise sqlite3.OperationalError(f"no such table: {self.table}")
        wanted = as_list(getattr(self, "column", None) or getattr(self, "columns", None) or [])
        missing = [c for c in wanted if c.lower() not in present]
        if missing:
            raise sqlite3.OperationalError(f"no such column: {', '.join(missing)} in {self.table}")

    def _from(self, condition: str = "1") -> str:
        where = f" AND ({self.where})" if self.where else ""
        return f"FROM main.{qi(self.table)} WHERE ({condition}){where}"

    def _rows(self, conn: sqlite3.Connection, condition: str, params: list[Any]) -> Outcome:
        """Failing rows are those matching `condition`: count them and keep a sample."""
        count = conn.execute(f"SELECT count(*) {self._from(condition)}", params).fetchone()[0]
        sample = fetch_dicts(conn.execute(f"SELECT * {self._from(condition)} LIMIT 5", params))
        return Outcome(passed=count == 0, failing_rows=count, sample_rows=sample)


class NotNullCheck(_TableCheck):
    kind: Literal["not_null"] = "not_null"
    column: str

    def rule(self) -> str:
        return f"{self.table}.{self.column} is never NULL"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        return self._rows(conn, f"{qi(self.column)} IS NULL", [])


class UniqueCheck(_TableCheck):
    kind: Literal["unique"] = "unique"
    columns: list[str] = Field(min_length=1, description="Column(s) whose values must be unique.")

    @model_validator(mode="before")
    @classmethod
    def _column_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "column" in data and "columns" not in data:
            data = {**data, "columns": as_list(data["column"])}
            del data["column"]
        return data

    @property
    def column_label(self) -> str:
        return ",".join(self.columns)

    def rule(self) -> str:
        return f"no two rows of {self.table} share ({self.column_label}); NULLs are not compared"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        cols = ", ".join(qi(c) for c in self.columns)
        not_null = " AND ".join(f"{qi(c)} IS NOT NULL" for c in self.columns)
        groups = f"SELECT {cols}, count(*) AS duplicate_count {self._from(not_null)} GROUP BY {cols} HAVING count(*) > 1"
        count = conn.execute(
            f"SELECT coalesce(sum(duplicate_count), 0) FROM ({groups})"
        ).fetchone()[0]
        sample = fetch_dicts(conn.execute(f"{groups} LIMIT 5"))
        return Outcome(passed=count == 0, failing_rows=count, sample_rows=sample)


class AcceptedValuesCheck(_TableCheck):
    kind: Literal["accepted_values"] = "accepted_values"
    column: str
    values: list[str | int | float] = Field(min_length=1)

    def rule(self) -> str:
        return f"{self.table}.{self.column} is NULL or one of {self.values}"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        marks = ", ".join("?" for _ in self.values)
        condition = f"{qi(self.column)} IS NOT NULL AND {qi(self.column)} NOT IN ({marks})"
        return self._rows(conn, condition, list(self.values))


class RowCountCheck(_TableCheck):
    kind: Literal["row_count"] = "row_count"
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("min/max: give at least one bound for a row_count check")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    def rule(self) -> str:
        return f"{self.table} has between {self.min or 0} and {self.max or '∞'} rows"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        count = conn.execute(f"SELECT count(*) {self._from()}").fetchone()[0]
        passed = (self.min is None or count >= self.min) and (self.max is None or count <= self.max)
        return Outcome(
            passed=passed, details={"row_count": count, "min": self.min, "max": self.max}
        )


class FreshnessCheck(_TableCheck):
    """Newest value of a timestamp column (ISO text, naive = UTC, or unix seconds) is recent."""

    kind: Literal["freshness"] = "freshness"
    column: str
    max_age: timedelta = Field(description="e.g. '24h', '30m', '2d', 3600 (seconds) or 'PT1H'.")

    @field_validator("max_age", mode="before")
    @classmethod
    def _short_duration(cls, value: Any) -> Any:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2).lower()])
        return value

    @field_validator("max_age")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value

    def rule(self) -> str:
        return f"newest {self.table}.{self.column} is at most {self.max_age} old"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        col = qi(self.column)
        jd = (
            f"CASE WHEN typeof({col}) IN ('integer', 'real') THEN julianday({col}, 'unixepoch') "
            f"ELSE julianday({col}) END"
        )
        unparsed = conn.execute(
            f"SELECT coalesce(sum({col} IS NOT NULL AND {jd} IS NULL), 0) {self._from()}"
        ).fetchone()[0]
        # julianday() is a float, too coarse to compare an age exactly: SQLite only picks the
        # newest value, which is then read exactly (below) and compared as a datetime.
        newest = conn.execute(
            f"SELECT {col}, strftime('%Y-%m-%d %H:%M:%f', {col}) "
            f"{self._from(f'{jd} IS NOT NULL')} ORDER BY {jd} DESC, {col} DESC LIMIT 1"
        ).fetchone()
        details: dict[str, Any] = {"max_age_seconds": self.max_age.total_seconds()}
        if unparsed:
            details["unparseable_values"] = unparsed
        if newest is None:
            details["latest"] = None
            return Outcome(passed=False, details=details)
        latest = _exact_timestamp(newest[0], newest[1], self.column)
        age = now - latest
        details.update(latest=latest.isoformat(), age_seconds=round(age.total_seconds(), 3))
        return Outcome(passed=age <= self.max_age, details=details)


def _exact_timestamp(value: Any, sqlite_text: str | None, column: str) -> datetime:
    """The newest stored timestamp as an exact UTC datetime.

    Unix seconds are converted exactly; text is read the way SQLite read it to pick the
    newest (its own parse, to the millisecond), refined to Python's parse when the two agree
    (microseconds survive). A date outside years 1-9999 raises ValueError naming the value.
    """
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _UNIX_EPOCH + timedelta(seconds=value)
        by_sqlite = _as_utc(datetime.fromisoformat(str(sqlite_text)))
    except (OverflowError, ValueError) as exc:
        raise ValueError(
            f"newest {column} value {value!r} is a date outside years 1-9999 "
            f"(SQLite reads it as {sqlite_text!r}); fix the value or filter it out with `where`"
        ) from exc
    try:
        by_python = _as_utc(datetime.fromisoformat(str(value).strip()))
    except ValueError:
        return by_sqlite
    return by_python if abs(by_python - by_sqlite) < timedelta(milliseconds=1) else by_sqlite


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class ExpressionCheck(_Check):
    """Custom SQL that selects the offending rows; the check passes when it returns none."""

    kind: Literal["expression"] = "expression"
    sql: str
    table: str | None = Field(None, description="Table the check is reported against.")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:  # overrides the base: no sensible default
        if isinstance(data, dict) and not data.get("name"):
            raise ValueError("name: required for expression checks (letters, digits, _)")
        return data

    @field_validator("sql")
    @classmethod
    def _one_select(cls, value: str) -> str:
        try:
            single_select(value, "sql")
        except PipelineError as exc:
            raise ValueError(str(exc)) from exc
        return value

    def rule(self) -> str:
        return f"query returns no rows: {self.sql.strip()[:200]}"

    def outcome(self, conn: sqlite3.Connection, now: datetime) -> Outcome:
        body = single_select(
            self.sql, "sql"
        )  # newline below: a trailing -- comment must not eat ')'
        count = conn.execute(f"SELECT count(*) FROM ({body}\n)").fetchone()[0]
        sample = fetch_dicts(conn.execute(f"SELECT * FROM ({body}\n) LIMIT 5"))
        return Outcome(passed=count == 0, failing_rows=count, sample_rows=sample)


QualityCheck = Annotated[
    NotNullCheck
    | UniqueCheck
    | AcceptedValuesCheck
    | RowCountCheck
    | FreshnessCheck
    | ExpressionCheck,
    Field(discriminator="kind"),
]


class QualityPipeline(PipelineConfig):
    """Evaluate checks; raise QualityChecksFailed (with the full result) on any error failure."""

    pipeline_type: ClassVar[str] = "quality"

    checks: list[QualityCheck] = Field(min_length=1)

    @field_validator("checks")
    @classmethod
    def _unique_names(cls, checks: list[_Check]) -> list[_Check]:
        seen: set[tuple[str | None, str]] = set()
        for check in checks:
            key = (check.target, check.name)
            if key in seen:
                raise ValueError(
                    f"two checks on table {check.target!r} are named {check.name!r}; "
                    "give one of them another name"
                )
            seen.add(key)
        return checks

    def run(
        self, *, now: datetime | None = None, claim: EffectClaim | None = None
    ) -> PipelineResult:
        """`now` (default: the current time; naive means UTC) is what freshness is measured against.

        Checks write nothing, so with a `claim` the effect marker is all that is committed:
        it records a passing result once per key generation (a failing run records nothing).
        """
        effect = self._effect(claim)
        if not Path(self.warehouse).is_file():  # checking must not create an empty warehouse
            raise PipelineError(
                f"warehouse: {self.warehouse!r} does not exist; run the pipelines that fill "
                "it first, or fix the path",
                path=self.warehouse,
            )
        moment = now or utcnow()
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        result = PipelineResult(pipeline_type=self.pipeline_type)
        with self._session() as (conn, _db):
            if claim is not None:
                with write_transaction(conn):
                    recorded = effect.begin(conn)
                if recorded is not None:
                    return recorded
            conn.execute("PRAGMA query_only = ON")
            conn.execute("BEGIN")
            try:
                for check in self.checks:
                    if check.target:
                        result.table(check.target)
                    result.checks.append(check.evaluate(conn, moment))
            finally:
                conn.execute("ROLLBACK")
                conn.execute("PRAGMA query_only = OFF")
            result.finish()
            if any(not c.passed and c.severity == "error" for c in result.checks):
                raise QualityChecksFailed(result)
            if claim is not None:
                with write_transaction(conn):
                    recorded = effect.begin(conn)  # a holder may have finished meanwhile
                    if recorded is not None:
                        return recorded
                    effect.commit(conn, result)
        return result
