"""Exactly-once effects: a run's warehouse writes commit in one transaction with a marker
naming the claim generation they belong to.

Fencing in the ledger stops a holder that lost its claim from *stamping* success, not from
*writing*. The marker closes that gap inside the warehouse itself: the first holder of a key
generation to commit leaves `(key, generation, fence)` next to its writes, atomically. A later
holder of the same generation with a higher fence (an adopter, or the next claim after a
failure or a release: docs/contract.md "When a generation ends") then finds the work done and
returns the recorded result instead of doing it again; a holder with a lower fence (a zombie)
that gets there after an adopter committed is refused with FenceLostError and changes nothing.
A marker of an older generation is simply replaced: a new generation is new work.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import ClaimRefusedError, FenceLostError, PipelineError
from .results import PipelineResult, utcnow
from .sql import qi

EFFECTS = "_rocky_effects"


@runtime_checkable
class EffectClaim(Protocol):
    """What a run needs from an idempotency claim (the ledger's `Claim` provides it)."""

    @property
    def key(self) -> str: ...

    @property
    def generation(self) -> int | None: ...

    @property
    def fence(self) -> int | None: ...

    @property
    def run_id(self) -> str: ...

    @property
    def should_run(self) -> bool: ...


@dataclass(frozen=True)
class Marker:
    """The effect marker of one key, as stored in the warehouse."""

    key: str
    generation: int
    fence: int
    run_id: str
    pipeline_type: str
    result_json: str
    summary_json: str
    applied_at: str


def _integer(value: object, field: str, key: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClaimRefusedError(
            f"claim for key {key!r}: {field} must be an integer, got {value!r}; pass the claim "
            "the ledger returned for this step"
        )
    if not 0 < value < 2**63:
        raise ClaimRefusedError(f"claim for key {key!r}: {field} {value} is out of range")
    return value


class Effect:
    """One run's effect bookkeeping; without a claim every method is a no-op."""

    def __init__(self, claim: EffectClaim | None, pipeline_type: str) -> None:
        self.pipeline_type = pipeline_type
        self.claim = claim
        if claim is None:
            return
        key = getattr(claim, "key", None)
        if not isinstance(key, str) or not key:
            raise ClaimRefusedError(f"claim: key must be a non-empty string, got {key!r}")
        if not getattr(claim, "should_run", False):
            raise ClaimRefusedError(
                f"claim for key {key!r} says this step must not run (the ledger decided "
                f"{getattr(getattr(claim, 'decision', None), 'value', 'skip')!s}); run the "
                "pipeline only with a claim whose should_run is true"
            )
        self.key = key
        self.fence = _integer(getattr(claim, "fence", None), "fence", key)
        self.generation = _integer(getattr(claim, "generation", None), "generation", key)
        if self.generation > self.fence:
            raise ClaimRefusedError(
                f"claim for key {key!r}: generation {self.generation} is later than fence "
                f"{self.fence}; a generation is the fence of the claim that began it"
            )
        run_id = getattr(claim, "run_id", None)
        if not isinstance(run_id, str):
            raise ClaimRefusedError(f"claim for key {key!r}: run_id must be a string")
        self.run_id = run_id

    def applied(self, conn: sqlite3.Connection) -> Marker | None:
        """Call first inside the write transaction. The marker when an earlier holder of this
        generation (or this holder) already committed the work, else None; FenceLostError when
        a later holder or a newer generation did (the caller's transaction rolls back)."""
        if self.claim is None:
            return None
        return self.judge(read_marker(conn, self.key))

    def judge(self, marker: Marker | None) -> Marker | None:
        """`applied` for the key's marker however it was read (None: there is none)."""
        if marker is None or marker.generation < self.generation:
            return None
        if marker.generation > self.generation:
            raise FenceLostError(
                f"key {self.key!r}: generation {marker.generation} (run {marker.run_id}) "
                f"already committed its effects; this claim belongs to the older generation "
                f"{self.generation} and lost it, so nothing was written",
                table=EFFECTS,
            )
        if marker.fence > self.fence:
            raise FenceLostError(
                f"key {self.key!r}: a later holder (fence {marker.fence}, run {marker.run_id}) "
                f"already committed this generation's effects; this holder (fence "
                f"{self.fence}) lost its claim, so nothing was written",
                table=EFFECTS,
            )
        if marker.pipeline_type != self.pipeline_type:
            raise PipelineError(
                f"key {self.key!r}: its effects were committed by {marker.pipeline_type!r}, "
                f"not {self.pipeline_type!r}; give each step its own key",
                table=EFFECTS,
            )
        return marker

    def begin(self, conn: sqlite3.Connection) -> PipelineResult | None:
        """`applied` for a pipeline: the recorded PipelineResult, marked already_applied."""
        marker = self.applied(conn)
        if marker is None:
            return None
        recorded = PipelineResult.model_validate_json(marker.result_json)
        recorded.already_applied = True
        return recorded

    def commit(self, conn: sqlite3.Connection, result: PipelineResult) -> None:
        """Call last inside the run's write transaction: the marker commits with the writes."""
        self.record(conn, result.model_dump_json(), json.dumps(result.summary(), sort_keys=True))

    def record(self, conn: sqlite3.Connection, result_json: str, summary_json: str) -> None:
        if self.claim is None:
            return
        ensure_effects_table(conn)
        conn.execute(
            f"INSERT INTO main.{qi(EFFECTS)} (key, generation, fence, run_id, pipeline_type, "
            "result_json, summary_json, applied_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET generation = excluded.generation, "
            "fence = excluded.fence, run_id = excluded.run_id, "
            "pipeline_type = excluded.pipeline_type, result_json = excluded.result_json, "
            "summary_json = excluded.summary_json, applied_at = excluded.applied_at",
            (
                self.key,
                self.generation,
                self.fence,
                self.run_id,
                self.pipeline_type,
                result_json,
                summary_json,
                utcnow().isoformat(),
            ),
        )


@dataclass
class EffectScope:
    """What `exactly_once` hands the body: whether the work was already applied (then
    `recorded` is the result its holder recorded, and the body must write nothing), and the
    `result` slot the body fills in to be recorded with its writes. With `ledger=`, `stamp` is
    the ledger's FinalizeResult once the block committed."""

    already_applied: bool
    recorded: Any = None
    result: Any = None
    stamp: Any = None


@contextmanager
def exactly_once(
    conn: Any,
    claim: EffectClaim,
    *,
    name: str = "custom",
    schema: str | None = None,
    ledger: Any = None,
) -> Iterator[EffectScope]:
    """Make your own SQLite or PostgreSQL writes exactly-once per claim generation, like the
    pipelines'.

    `conn` is a `sqlite3.Connection` or a psycopg 3 `Connection` (autocommit or not), and must
    not be inside a transaction already. The body runs inside one transaction that also checks
    and writes the effect marker (table `_rocky_effects`: in SQLite's `main`, in PostgreSQL
    in `schema`, default the connection's current schema, created if missing); `name` tells
    your step's markers from the pipelines'::

        claim = ledger.claim(key, run_id=run_id)
        if claim.should_run:
            with exactly_once(conn, claim, name="send_invoices") as effect:
                if effect.already_applied:
                    result = effect.recorded
                else:
                    conn.execute("INSERT INTO invoices ...")
                    effect.result = result = {"invoices": 3}
            ledger.finalize(key, claim.fence, Outcome.SUCCEEDED, result=result)

    An exception in the body rolls everything back; FenceLostError means a later holder
    committed first and nothing of yours was written.

    PostgreSQL only: `ledger=` a PostgreSQL ledger whose tables are in the connection's
    database stamps the claim `succeeded` (with `effect.result`, a dict or None) in the same
    transaction, so your writes, the marker and the stamp commit together or not at all; a
    refused stamp (the claim was lost) raises FenceLostError and rolls your writes back. Then
    there is no separate `ledger.finalize` to call.
    """
    if claim is None:
        raise ClaimRefusedError("exactly_once needs the claim the ledger returned for this step")
    effect = Effect(claim, name)
    if isinstance(conn, sqlite3.Connection):
        if ledger is not None or schema is not None:
            raise PipelineError(
                "exactly_once: ledger= and schema= are for a PostgreSQL connection; with SQLite "
                "the marker is in the warehouse's main schema and you stamp the ledger yourself "
                "after the block (ledger.finalize)"
            )
        with _sqlite_once(conn, effect) as scope:
            yield scope
        return
    psycopg = sys.modules.get("psycopg")  # a psycopg connection means psycopg is imported
    if psycopg is None or not isinstance(conn, psycopg.Connection):
        raise PipelineError(
            "exactly_once: conn must be a sqlite3.Connection or a psycopg (3) Connection, got "
            f"{type(conn).__module__}.{type(conn).__name__}"
        )
    from .effects_pg import postgres_once

    with postgres_once(conn, effect, schema=schema, ledger=ledger) as scope:
        yield scope


def encode_effect_result(result: Any) -> str:
    try:
        return json.dumps(result, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"exactly_once: result is not JSON: {exc}") from exc


@contextmanager
def _sqlite_once(conn: sqlite3.Connection, effect: Effect) -> Iterator[EffectScope]:
    if conn.in_transaction:
        raise PipelineError(
            "exactly_once: the connection is already inside a transaction; commit or roll it "
            "back first, so the marker and your writes share one transaction"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        marker = effect.applied(conn)
        if marker is not None:
            yield EffectScope(already_applied=True, recorded=json.loads(marker.result_json))
        else:
            scope = EffectScope(already_applied=False)
            yield scope
            encoded = encode_effect_result(scope.result)
            effect.record(conn, encoded, encoded)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def ensure_effects_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS main.{qi(EFFECTS)} (key TEXT PRIMARY KEY, "
        "generation INTEGER NOT NULL, fence INTEGER NOT NULL, run_id TEXT NOT NULL, "
        "pipeline_type TEXT NOT NULL, result_json TEXT NOT NULL, summary_json TEXT NOT NULL, "
        "applied_at TEXT NOT NULL) STRICT"
    )


def read_marker(conn: sqlite3.Connection, key: str) -> Marker | None:
    """The marker of `key`, or None (also when no run with a claim ever wrote one)."""
    exists = conn.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?", (EFFECTS,)
    ).fetchone()
    if exists is None:
        return None
    row = conn.execute(
        "SELECT key, generation, fence, run_id, pipeline_type, result_json, summary_json, "
        f"applied_at FROM main.{qi(EFFECTS)} WHERE key = ?",
        (key,),
    ).fetchone()
    return None if row is None else Marker(*row)
