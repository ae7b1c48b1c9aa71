"""`ledger_admin_job`: operate the ledger from the Launchpad, for deployments with no shell.

One op, four actions on one key or a key prefix: ``list``, ``release`` (free an in-flight
claim), ``reset`` (forget a finished key) and ``force`` (make the next run of a completed key
do the work again). ``dry_run`` is on by default: the run then only reports what would change.

It refuses what the operator CLI (``rocky-dagster ledger …``) refuses, with the same rules: no
reset of an in-flight key, no release of a finished one, no entry for an exact key. Every key
of a prefix is checked before the first write, so a refusal changes nothing. Each write goes
through the ledger API with a reason naming this Dagster run and job, so the ledger's event log
says which run did it; the run's output metadata lists what changed (or would change).

``force`` resets the key's completed record, audited as "forced by Dagster run …". The ledger
keeps no "force the next claim" flag, so this is the one honest way to make *the next run of
that key* proceed from an admin run. Unlike the force run tag (``rocky/idempotency=force``), which
overrides the record atomically at the claim of the run that carries it, a forced key is free
for whichever run claims it next. Keys whose next run proceeds anyway (a failure under
``dedup_on='success'``, an expired record) are left unchanged; an in-flight key is refused,
because neither this action nor the tag overrides a live claim.
"""

# No `from __future__ import annotations`: Dagster reads the op's `config` annotation as a class
# when the op is defined, and a string annotation there is rejected.

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from dagster import (
    Config,
    DefaultSensorStatus,
    Definitions,
    Failure,
    JobDefinition,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    job,
    op,
)
from pydantic import Field

from .keys import FORCE_TAG, FORCE_VALUE
from .ledger import Entry, Ledger, LedgerError, State, redact_url
from .ledger.errors import InvalidArgumentError
from .ledger.machine import dedups
from .ledger.model import validate_key
from .reconcile import FINISHED_STATUSES
from .resource import RESOURCE_KEY, IdempotencyLedger
from .sensors import ledger_run_status_sensors

Action = Literal["list", "release", "reset", "force"]


class StateFilter(Enum):
    """A ledger state, as the Launchpad offers it (Dagster config has no optional Literal)."""

    in_flight = "in_flight"
    succeeded = "succeeded"
    failed = "failed"


DEFAULT_JOB_NAME = "rocky_ledger_admin"
_HISTORY_SHOWN = 20
_NO_LIMIT = 2**31 - 1
"""`Ledger.entries` takes a limit, never "all"."""

# a row's result
_DONE = {"release": "released", "reset": "reset", "force": "forced"}
_LEFT_ALONE = "changed meanwhile: left alone"
_NOT_ATTEMPTED = "not attempted (ledger error)"
_REFUSED = "refused"
_NOT_DONE = "unchanged (the action was refused)"


class LedgerAdminConfig(Config):
    """What `ledger_admin_job` does; every field is shown in the Launchpad."""

    action: Action = Field(
        default="list",
        description=(
            "list: show the selected entries (an exact key also shows its event log). "
            "release: free in-flight claims, so the next run of the key proceeds (if the holder "
            "is still working, its finalize is refused and the work runs again). "
            "reset: forget finished (succeeded or failed) keys, so the next run does the work "
            "again. force: make the next run of a completed key do the work again, by resetting "
            "its record with an audited 'forced' reason; keys whose next run proceeds anyway "
            "are left alone, in-flight keys are refused (to force one run only, launch that run "
            f"with the tag {FORCE_TAG}={FORCE_VALUE} instead)."
        ),
    )
    key: str | None = Field(
        default=None,
        description=(
            "One ledger key, exactly as stored (<base key>/<step key>, e.g. "
            "'daily@2026-11-01/load_payments'). Give key or prefix, not both."
        ),
    )
    prefix: str | None = Field(
        default=None,
        description=(
            "Select every key starting with this text (e.g. 'daily@2026-11-01/' for all steps "
            "of one run key). Optional for list (none: every entry)."
        ),
    )
    state: StateFilter | None = Field(
        default=None,
        description=(
            "Only entries in this state (with a prefix: e.g. release only the in-flight keys of "
            "a prefix; with a key: act only if the key is in this state)."
        ),
    )
    run_id: str | None = Field(
        default=None,
        description=(
            "Only entries held (in flight) or last finished by this Dagster run (with a key: act "
            "only if that run still holds it, as the CLI's --run-id)."
        ),
    )
    fence: int | None = Field(
        default=None,
        description="With a key: act only if its entry has this fence (as the CLI's --fence).",
    )
    max_keys: int = Field(
        default=100,
        description=(
            "At most this many keys: list shows the newest ones; release, reset and force "
            "refuse a selection larger than this (narrow it, or raise max_keys)."
        ),
    )
    dry_run: bool = Field(
        default=True,
        description=(
            "true: change nothing, report what would change (and refuse what would be "
            "refused). Set false to act."
        ),
    )
    reason: str | None = Field(
        default=None,
        description="Why, recorded in the ledger's event log after the run that did it.",
    )


class AdminRefusal(Exception):
    """A selection or action the admin job refuses; nothing was changed."""

    def __init__(self, message: str, rows: Sequence["Row"] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)
        """Every selected key, the refused ones with their reason (for the run's metadata)."""


@dataclass(frozen=True)
class Row:
    """One selected key: what it is, what the action does to it, and (after acting) the result."""

    key: str
    state: str
    run_id: str
    fence: int
    change: str
    """'release', 'reset', 'force', or 'none' (left unchanged, see `note`)."""
    note: str = ""
    result: str = ""
    """After acting: 'released', 'reset', 'forced', 'unchanged', 'changed meanwhile: left alone'
    or 'not attempted (ledger error)'; 'refused' or 'unchanged (the action was refused)' when the
    selection was refused; empty in a dry run that was not refused."""
    event: str = ""
    """The event the change wrote to the ledger's log."""


@dataclass(frozen=True)
class Selection:
    entries: list[Entry]
    described: str
    truncated: bool = False
    """More entries matched than max_keys (list only: it shows the newest max_keys)."""


# --- selecting and checking -----------------------------------------------------------------------


def select(ledger: Ledger, config: LedgerAdminConfig) -> Selection:
    """The entries the config names; raises AdminRefusal for a config that names none sensibly."""
    _check_fields(config)
    filters = _describe_filters(config)
    if config.key is not None:
        entry = ledger.get(config.key)
        if entry is None:
            raise AdminRefusal(
                f"no entry for key {config.key!r}; look for it with action: list and a prefix"
            )
        _check_guards(entry, config)
        return Selection([entry], f"key {config.key!r}")
    state = None if config.state is None else config.state.value
    if config.prefix is None:  # list only (checked above)
        found = ledger.entries(state, run_id=config.run_id, limit=config.max_keys + 1)
    else:
        # The ledger API has no prefix filter: read every (state/run filtered) entry, match here.
        found = ledger.entries(state, run_id=config.run_id, limit=_NO_LIMIT)
        found = [e for e in found if e.key.startswith(config.prefix)]
    described = (f"prefix {config.prefix!r}" if config.prefix is not None else "every key") + (
        f" ({filters})" if filters else ""
    )
    if config.action == "list":
        return Selection(found[: config.max_keys], described, len(found) > config.max_keys)
    if not found:
        raise AdminRefusal(f"no entry matches {described}: nothing to {config.action}")
    if len(found) > config.max_keys:
        raise AdminRefusal(
            f"{described} matches {len(found)} keys, more than max_keys={config.max_keys}; "
            "narrow the selection (state, run_id, a longer prefix) or raise max_keys"
        )
    return Selection(found, described)


def _check_fields(config: LedgerAdminConfig) -> None:
    if config.key is not None and config.prefix is not None:
        raise AdminRefusal("give key or prefix, not both")
    if config.action != "list" and config.key is None and config.prefix is None:
        raise AdminRefusal(
            f"action {config.action!r} needs a key or a prefix (list every key with action: list)"
        )
    if config.max_keys < 1:
        raise AdminRefusal(f"max_keys must be 1 or more, got {config.max_keys}")
    if config.fence is not None and config.key is None:
        raise AdminRefusal("fence guards one key: give key too (or leave fence out)")
    if config.fence is not None and config.fence < 1:
        raise AdminRefusal(f"fence must be 1 or more, got {config.fence}")
    try:
        for field in ("key", "prefix", "run_id"):
            value = getattr(config, field)
            if value is not None:
                validate_key(value, field)
    except InvalidArgumentError as exc:
        raise AdminRefusal(str(exc)) from None


def _describe_filters(config: LedgerAdminConfig) -> str:
    parts = []
    if config.state is not None:
        parts.append(f"state {config.state.value}")
    if config.run_id is not None:
        parts.append(f"run {config.run_id}")
    if config.fence is not None:
        parts.append(f"fence {config.fence}")
    return ", ".join(parts)


def _check_guards(entry: Entry, config: LedgerAdminConfig) -> None:
    if config.run_id is not None and entry.run_id != config.run_id:
        raise AdminRefusal(f"key {entry.key!r} is held by run {entry.run_id}, not {config.run_id}")
    if config.fence is not None and entry.fence != config.fence:
        raise AdminRefusal(f"key {entry.key!r} has fence {entry.fence}, not {config.fence}")
    if config.state is not None and entry.state.value != config.state.value:
        raise AdminRefusal(f"key {entry.key!r} is {entry.state.value}, not {config.state.value}")


def plan(
    ledger: Ledger,
    selection: Selection,
    action: Action,
    *,
    holder_status: dict[str, str] | None = None,
) -> list[Row]:
    """What `action` does to each selected entry; raises AdminRefusal naming every refused key.

    Every key is checked before anything is written, so one refused key leaves all unchanged.
    """
    now = ledger.now()
    many = len(selection.entries) > 1
    rows = [_plan_one(e, action, now, holder_status or {}, many) for e in selection.entries]
    refused = [r.note for r in rows if r.result == _REFUSED]
    if refused:
        raise AdminRefusal(
            f"{action} refused, nothing changed: "
            + "; ".join(refused[:10])
            + (f"; and {len(refused) - 10} more" if len(refused) > 10 else ""),
            [r if r.result else replace(r, result=_NOT_DONE) for r in rows],
        )
    return rows


def _plan_one(e: Entry, action: Action, now: datetime, statuses: dict[str, str], many: bool) -> Row:
    """One key's row: its change and why, or result 'refused' with the reason and the fix."""
    row = Row(e.key, e.state.value, e.run_id, e.fence, "none")
    if action == "list":
        return replace(row, note=_list_note(e, now))
    if action == "release":
        if e.state != State.IN_FLIGHT:
            fix = "to forget a finished key use action: reset"
            if many:
                fix += "; to release only the in-flight keys of a prefix add state: in_flight"
            return replace(
                row,
                result=_REFUSED,
                note=f"key {e.key!r} is {e.state.value}, not in flight: nothing to release ({fix})",
            )
        lease = "lease expired" if e.lease_expires_at <= now else "lease still running"
        holder = statuses.get(e.run_id, "unknown to this Dagster instance")
        return replace(row, change="release", note=f"{lease}; holder run {holder}")
    if e.state == State.IN_FLIGHT:
        fix = (
            "reset forgets finished keys only"
            if action == "reset"
            else f"force never overrides a live claim (nor does the {FORCE_TAG}={FORCE_VALUE} tag)"
        )
        return replace(
            row,
            result=_REFUSED,
            note=f"key {e.key!r} is in flight (run {e.run_id}): {fix}; to free the claim use "
            "action: release",
        )
    if action == "reset":
        return replace(row, change="reset", note="the next run does the work again")
    if not dedups(e):
        return replace(row, note=f"{e.state.value}: the next run proceeds anyway")
    if e.is_expired(now):
        return replace(row, note="record expired: the next run proceeds anyway")
    return replace(row, change="force", note="the next run does the work again")


def _list_note(entry: Entry, now: datetime) -> str:
    """When it was claimed and until when it holds, as the CLI's list shows it."""
    claimed = f"claimed {_time(entry.claimed_at)}"
    if entry.state == State.IN_FLIGHT:
        stale = "; stale (adoptable)" if entry.lease_expires_at <= now else ""
        return f"{claimed}; lease until {_time(entry.lease_expires_at)}{stale}"
    until = f"; dedups until {_time(entry.expires_at)}" if entry.expires_at else ""
    expired = "; expired (awaits sweep)" if entry.is_expired(now) else ""
    return f"{claimed}{until}{expired}"


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


# --- acting ---------------------------------------------------------------------------------------


def apply(ledger: Ledger, rows: Sequence[Row], reason: str) -> Iterator[Row]:
    """Carry out the planned changes one key at a time, yielding each row with its result.

    Each write is fenced to the entry that was checked: a key that changed since is left alone
    and reported. A ledger error stops at that key and propagates; what was yielded before it
    stays done (the caller reports it).
    """
    for row in rows:
        if row.change == "none":
            yield replace(row, result="unchanged")
            continue
        verb = _DONE[row.change]
        text = f"{verb} by {reason}"
        if row.change == "release":
            changed = ledger.release(row.key, run_id=row.run_id, fence=row.fence, reason=text)
        else:
            # reset has no fence guard of its own: look again right before it
            current = ledger.get(row.key)
            changed = (
                current is not None
                and current.fence == row.fence
                and current.state.value == row.state
                and ledger.reset(row.key, reason=text)
            )
        if not changed:
            yield replace(row, result=_LEFT_ALONE)
            continue
        last = ledger.history(row.key, limit=1)
        event = f"#{last[0].id} {last[0].kind.value}: {last[0].detail}" if last else ""
        yield replace(row, result=verb, event=event)


# --- presenting -----------------------------------------------------------------------------------


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ") or " "


def rows_markdown(rows: Sequence[Row], *, listing: bool = False) -> str:
    """A markdown table of the rows (the run page renders it)."""
    if not rows:
        return "_no entries_"
    headers = ["key", "state", "run", "fence", *([] if listing else ["change"]), "note"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells: list[object] = [r.key, r.state, r.run_id, r.fence]
        if not listing:
            outcome = r.result or (f"would {r.change}" if r.change != "none" else "unchanged")
            cells.append(f"{outcome} ({r.event})" if r.event else outcome)
        cells.append(r.note)
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _metadata(
    url: str,
    config: LedgerAdminConfig,
    selection: Selection | None,
    rows: Sequence[Row],
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "action": MetadataValue.text(config.action),
        "dry_run": MetadataValue.bool(config.dry_run or config.action == "list"),
        "ledger": MetadataValue.text(url),
        "selection": MetadataValue.text(selection.described if selection else "-"),
        "keys": MetadataValue.md(rows_markdown(rows, listing=config.action == "list")),
        "keys_json": MetadataValue.json([asdict(r) for r in rows]),
    }
    if config.action != "list":
        label = "would_change" if config.dry_run else "changed"
        applied = [
            r for r in rows if r.change != "none" and (r.result == _DONE[r.change] or not r.result)
        ]
        meta[label] = MetadataValue.int(len(applied))
        meta["unchanged"] = MetadataValue.int(len(rows) - len(applied))
    if selection is not None and selection.truncated:
        meta["truncated"] = MetadataValue.text(
            f"more entries match: only the newest {config.max_keys} are listed (raise max_keys)"
        )
    if len(rows) == 1:
        meta["run"] = MetadataValue.dagster_run(rows[0].run_id)
    return meta


def _history_markdown(ledger: Ledger, key: str) -> str:
    events = ledger.history(key, limit=_HISTORY_SHOWN)
    if not events:
        return "_no events_"
    lines = ["| id | at (UTC) | event | run | fence | detail |", "|---|---|---|---|---|---|"]
    for e in events:
        cells = [e.id, _time(e.at), e.kind.value, e.run_id or "-"]
        cells += ["-" if e.fence is None else e.fence, e.detail or ""]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# --- the Dagster job ------------------------------------------------------------------------------


def _holder_statuses(context: OpExecutionContext, entries: Sequence[Entry]) -> dict[str, str]:
    """The Dagster status of each in-flight holder run this instance knows (shown, not enforced:
    the CLI releases a live run's claim too, after a warning)."""
    statuses: dict[str, str] = {}
    for run_id in {e.run_id for e in entries if e.state == State.IN_FLIGHT}:
        run = context.instance.get_run_by_id(run_id)
        if run is not None:
            statuses[run_id] = run.status.value
            if run.status not in FINISHED_STATUSES:
                statuses[run_id] += " (still live: if it is working, the work runs again)"
    return statuses


@op(
    name="ledger_admin",
    description=(
        "List, release, reset or force ledger keys (dry run by default); see the config "
        "fields. Refuses what the rocky-dagster CLI refuses, and changes nothing then."
    ),
    out=Out(Nothing, description="No value; the output metadata lists what changed."),
)
def ledger_admin_op(
    context: OpExecutionContext, config: LedgerAdminConfig, ledger: IdempotencyLedger
) -> Output[None]:
    url = redact_url(ledger.resolved_url())
    reason = f"Dagster run {context.run_id} (job {context.job_name})" + (
        f": {config.reason}" if config.reason else ""
    )
    selection: Selection | None = None
    planned: list[Row] = []
    rows: list[Row] = []
    try:
        store = ledger.open()
        selection = select(store, config)
        statuses = _holder_statuses(context, selection.entries)
        planned = rows = plan(store, selection, config.action, holder_status=statuses)
        if config.action != "list" and not config.dry_run:
            rows = []
            for row in apply(store, planned, reason):
                rows.append(row)  # one at a time: a ledger error below still reports these
    except AdminRefusal as exc:
        raise Failure(
            description=f"rocky_dagster: {exc}",
            metadata=_metadata(url, config, selection, exc.rows),
            allow_retries=False,
        ) from None
    except LedgerError as exc:
        acted = len(rows) if rows is not planned else 0
        rows = rows[:acted] + [replace(r, result=_NOT_ATTEMPTED) for r in planned[acted:]]
        changed = sum(r.result in _DONE.values() for r in rows)
        raise Failure(
            description=(
                f"rocky_dagster: ledger error during {config.action} of "
                f"{selection.described if selection else 'the selection'}: {exc}; "
                + (
                    f"{changed} key(s) were changed before it (listed in the metadata) and stay "
                    "so, the others were not attempted; look again with action: list"
                    if changed
                    else "nothing was changed"
                )
            ),
            metadata=_metadata(url, config, selection, rows),
        ) from exc
    meta = _metadata(url, config, selection, rows)
    if config.action == "list" and config.key is not None:
        meta["history"] = MetadataValue.md(_history_markdown(store, config.key))
    for row in rows:
        if row.event:
            context.log.info(f"rocky_dagster: {row.key!r} {row.result}: {row.event}")
    lost = [r.key for r in rows if r.result == _LEFT_ALONE]
    if lost:
        raise Failure(
            description=(
                f"rocky_dagster: {len(lost)} key(s) changed between the check and the "
                f"{config.action} and were left alone: {', '.join(map(repr, lost[:10]))}; the "
                "others were changed as listed. Look again (action: list)"
            ),
            metadata=meta,
            allow_retries=False,
        )
    if config.dry_run and config.action != "list":
        context.log.info(
            f"rocky_dagster: dry run, nothing changed: {len([r for r in rows if r.change != 'none'])}"
            f" of {len(rows)} key(s) would be {_DONE[config.action]}; set dry_run: false to act"
        )
    return Output(None, metadata=meta)


def ledger_admin_job(*, name: str = DEFAULT_JOB_NAME) -> JobDefinition:
    """A job that operates the ledger from the Launchpad: list, release, reset or force keys.

    It needs the ``ledger`` resource (an `IdempotencyLedger`) from its Definitions. Every run is
    a dry run unless its config says ``dry_run: false``; refusals fail the run and change nothing.

    Examples:
        .. code-block:: python

            from dagster import Definitions
            from rocky_dagster import IdempotencyLedger
            from rocky_dagster.admin import ledger_admin_job

            Definitions(jobs=[ledger_admin_job()], resources={"ledger": IdempotencyLedger()})

        Launchpad config releasing a stuck claim:

        .. code-block:: yaml

            ops:
              ledger_admin:
                config:
                  action: release
                  key: "daily@2026-11-01/load_payments"
                  dry_run: false
                  reason: "host lost during the run"
    """

    @job(
        name=name,
        description=(
            "rocky_dagster: list, release, reset or force idempotency-ledger keys from the "
            "Launchpad (dry run by default); each change is audited in the ledger's event log."
        ),
    )
    def _admin() -> None:
        ledger_admin_op()

    return _admin


def ledger_definitions(
    *,
    ledger: IdempotencyLedger | None = None,
    name_prefix: str = "rocky_ledger",
    minimum_interval_seconds: int = 10,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> Definitions:
    """The ledger's operational definitions: the run-status sensors and the admin job.

    Merge them into your own (``Definitions.merge(defs, ledger_definitions())``). Pass `ledger`
    to include the ``ledger`` resource too; leave it out when your Definitions bind it already
    (merging two different ``ledger`` resources is an error).

    Args:
        ledger: the `IdempotencyLedger` resource to bind under ``ledger``, or None.
        name_prefix: prefix of the sensors' names (``<prefix>_on_failure`` …) and of the admin
            job's (``<prefix>_admin``).
        minimum_interval_seconds: how often the run-status sensors look for finished runs.
        default_status: whether the sensors start running (the default) or stopped.

    Examples:
        .. code-block:: python

            from dagster import Definitions
            from rocky_dagster import IdempotencyLedger
            from rocky_dagster.admin import ledger_definitions

            defs = Definitions.merge(
                Definitions(jobs=[my_job]),
                ledger_definitions(ledger=IdempotencyLedger()),
            )
    """
    return Definitions(
        jobs=[ledger_admin_job(name=f"{name_prefix}_admin")],
        sensors=ledger_run_status_sensors(
            name_prefix=name_prefix,
            minimum_interval_seconds=minimum_interval_seconds,
            default_status=default_status,
        ),
        resources={RESOURCE_KEY: ledger} if ledger is not None else None,
    )
