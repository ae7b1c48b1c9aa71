"""The claim decision table (docs/contract.md, "Claim decisions") as one pure function.

Backends lock the key's row, call `decide`, and write what it says, so every
backend makes the same decision from the same row. Their one-statement fast paths
claim only a key with no row, writing `NEW_KEY` (what `decide(None, …)` returns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import DedupPolicy, LedgerConfig, MismatchPolicy
from .errors import FingerprintMismatchError
from .model import Decision, Entry, EventKind, State
from .process import Holder

JudgeHolder = Callable[[str | None], Holder]
"""What the claimant knows of an entry's recorded `holder_process` (see `process.holder`)."""


def _unknown(recorded: str | None) -> Holder:
    return Holder.UNKNOWN


@dataclass(frozen=True)
class Plan:
    """What a claim must do: the decision, whether it writes a new in-flight row, and its event."""

    decision: Decision
    takes_key: bool
    event: EventKind
    detail: str
    prior_run_id: str | None = None
    held_by_run_id: str | None = None
    forced: bool = False
    continues: bool = False
    """The new claim continues the existing entry's generation: adoption, same-run re-entry,
    and a claim after a failure or a release (docs/contract.md "When a generation ends")."""
    reentrant: bool = False
    """Same-run re-entry: the claim keeps the original `claimed_at`, so the TTL cap holds."""
    rebased: Entry | None = None
    """The existing in-flight row with times from the future clamped to `now` (the clock
    stepped back): written even when the claim does not take the key."""


def dedups(entry: Entry) -> bool:
    """Whether a terminal entry blocks new claims under the policy it was written with (a
    released claim never does: its work neither succeeded nor failed)."""
    if entry.state == State.SUCCEEDED:
        return True
    return entry.state == State.FAILED and entry.dedup_on == DedupPolicy.ANY and not entry.released


def decide(
    existing: Entry | None,
    *,
    now: datetime,
    run_id: str,
    fingerprint: str | None,
    config: LedgerConfig,
    force: bool = False,
    judge_holder: JudgeHolder = _unknown,
) -> Plan:
    """Decide a claim from the locked row. Raises before any write on a fingerprint mismatch.

    A live claim of the claimant's own run is re-entered only when its attempt is over
    (`judge_holder` says PARKED or GONE): two live processes of one run never both proceed.

    The fingerprint binds while the recorded work does: a live claim, a stale claim being
    adopted (the adopter continues that work), and a terminal record that still dedups. A
    retry after a failure or a release may change the parameters: with another fingerprint
    it begins a new generation (new work), with the same one it continues the old generation,
    whose work may have committed before its holder stopped. `force` overrides the check and,
    over a finished record, begins a new generation.
    """
    if existing is None:
        return Plan(Decision.PROCEED, True, EventKind.CLAIMED, "new claim")

    if existing.state == State.IN_FLIGHT:
        rebased = _rebase(existing, now, config)
        if rebased is not None:
            existing = rebased
        if existing.lease_expires_at <= now:
            if not force:  # the adopter would continue different work under the same key
                _check_fingerprint(existing, fingerprint, config)
            return Plan(
                Decision.ADOPTED_STALE,
                True,
                EventKind.ADOPTED,
                f"adopted from run {existing.run_id} (fence {existing.fence}): its lease expired "
                f"at {existing.lease_expires_at.isoformat()}",
                prior_run_id=existing.run_id,
                continues=True,
                rebased=rebased,
            )
        if not force:  # an audited override also overrides the parameter check
            _check_fingerprint(existing, fingerprint, config)
        if existing.run_id == run_id:
            holder = judge_holder(existing.holder_process)
            if holder in (Holder.PARKED, Holder.GONE):
                return Plan(
                    Decision.PROCEED,
                    True,
                    EventKind.CLAIMED,
                    f"re-entrant claim by the same run (replaces fence {existing.fence}: "
                    f"{holder.value})",
                    prior_run_id=existing.run_id,
                    continues=True,
                    reentrant=True,
                    rebased=rebased,
                )
            return Plan(
                Decision.SKIPPED_IN_FLIGHT,
                False,
                EventKind.SKIPPED_IN_FLIGHT,
                f"held by another live attempt of the same run {existing.run_id} (fence "
                f"{existing.fence}, {holder.value}) until at least "
                f"{existing.lease_expires_at.isoformat()}",
                held_by_run_id=existing.run_id,
                rebased=rebased,
            )
        return Plan(
            Decision.SKIPPED_IN_FLIGHT,
            False,
            EventKind.SKIPPED_IN_FLIGHT,
            f"held by run {existing.run_id} (fence {existing.fence}) until at least "
            f"{existing.lease_expires_at.isoformat()}",
            held_by_run_id=existing.run_id,
            rebased=rebased,
        )

    if existing.is_expired(now):
        return Plan(
            Decision.PROCEED,
            True,
            EventKind.CLAIMED,
            f"previous {existing.state.value} record of run {existing.run_id} expired",
            prior_run_id=existing.run_id,
        )
    if not dedups(existing):
        # the claim ended without a success: its work may have committed all the same, so the
        # next claim of the same work continues its generation (docs/contract.md)
        same_work = not force and not _changed(existing, fingerprint)
        ended = "was released" if existing.released else "failed"
        return Plan(
            Decision.PROCEED,
            True,
            EventKind.CLAIMED,
            f"retry after run {existing.run_id} {ended}"
            + ("" if same_work else ": new work, a new generation"),
            prior_run_id=existing.run_id,
            continues=same_work,
        )
    if force:
        return Plan(
            Decision.PROCEED,
            True,
            EventKind.FORCED,
            f"forced override of the {existing.state.value} record of run {existing.run_id}",
            prior_run_id=existing.run_id,
            forced=True,
        )
    _check_fingerprint(existing, fingerprint, config)
    return Plan(
        Decision.SKIPPED_COMPLETED,
        False,
        EventKind.SKIPPED_COMPLETED,
        f"{existing.state.value} in run {existing.run_id}",
        prior_run_id=existing.run_id,
    )


def _rebase(existing: Entry, now: datetime, config: LedgerConfig) -> Entry | None:
    """An in-flight row written "in the future" means the clock stepped back since.

    Its lease would then last until the old clock's time came round again (years, after a
    bad NTP step). Clamp its times to `now`: a live holder's next heartbeat renews the lease
    as usual; a dead holder's claim becomes adoptable one lease from now, and the TTL cap
    counts from now at the latest. None when no time is ahead of `now`.
    """
    if existing.claimed_at <= now and existing.heartbeat_at <= now:
        return None
    claimed_at = min(existing.claimed_at, now)
    return existing.model_copy(
        update={
            "claimed_at": claimed_at,
            "heartbeat_at": min(existing.heartbeat_at, now),
            "lease_expires_at": min(
                existing.lease_expires_at, now + config.lease, claimed_at + config.in_flight_ttl
            ),
        }
    )


def _changed(existing: Entry, fingerprint: str | None) -> bool:
    """Whether the claimant's fingerprint names other work than the entry's (both known)."""
    return (
        fingerprint is not None
        and existing.fingerprint is not None
        and fingerprint != existing.fingerprint
    )


def _check_fingerprint(existing: Entry, fingerprint: str | None, config: LedgerConfig) -> None:
    if (
        config.on_fingerprint_mismatch == MismatchPolicy.ERROR
        and fingerprint is not None
        and existing.fingerprint is not None
        and fingerprint != existing.fingerprint
    ):
        raise FingerprintMismatchError(
            existing.key, existing.fingerprint, fingerprint, existing.run_id
        )


NEW_KEY: Plan = decide(
    None,
    now=datetime(2000, 1, 1, tzinfo=UTC),
    run_id="-",
    fingerprint=None,
    config=LedgerConfig(),
)
"""The decision for a key with no row (it depends on nothing else): the one case a backend's
fast claim may take without loading a row; anything else goes through `decide`."""
