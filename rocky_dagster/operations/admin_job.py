"""`ledger_admin_job`: operate the ledger from the Launchpad, for deployments with no shell.

One op, four actions on one key or a key prefix: ``list``, ``release`` (free an in-flight
claim), ``reset`` (forget a finished key) and ``force`` (make the next run of a completed key
do the work again). ``dry_run`` is on by default: the run then only reports what would change.

Selecting, checking and acting are `rocky_dagster.ledger.operations`, the module under the
operator CLI (``rocky-dagster ledger …``) too, so both refuse alike: no reset of an in-flight
key, no release of a finished one, no entry for an exact key. Every key
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

from collections.abc import Sequence
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

from rocky_dagster.ledger import Entry, InvalidArgumentError, Ledger, LedgerError, State, redact_url
from rocky_dagster.ledger.operations import (
    DONE,
    LEFT_ALONE,
    NOT_ATTEMPTED,
    OperationRefused,
    Phrasing,
    Row,
    Selection,
    apply,
    entry_note,
    format_time,
    holds_until,
    plan,
    select,
)
from rocky_dagster.resource import RESOURCE_KEY, IdempotencyLedger
from rocky_dagster.sensors.run_requests import ledger_run_status_sensors
from rocky_dagster.step.keys import FORCE_VALUE, IDEMPOTENCY_TAG
from rocky_dagster.step.reconcile import FINISHED_STATUSES

Action = Literal["list", "release", "reset", "force"]


class StateFilter(Enum):
    """A ledger state, as the Launchpad offers it (Dagster config has no optional Literal)."""

    in_flight = "in_flight"
    succeeded = "succeeded"
    failed = "failed"


DEFAULT_JOB_NAME = "rocky_ledger_admin"
_HISTORY_SHOWN = 20


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
            f"with the tag {IDEMPOTENCY_TAG}={FORCE_VALUE} instead)."
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
            "only if that run still holds it), as the CLI's --run-id."
        ),
    )
    touched_by: str | None = Field(
        default=None,
        description=(
            "Only entries this Dagster run holds or last finished, or whose event history names "
            "it (a claim it lost, a key it skipped, a holder it reaped), as the CLI's "
            "--touched-by. Give run_id or touched_by, not both."
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


ADMIN_PHRASING = Phrasing(
    action=lambda name: f"action: {name}",
    state_filter=lambda state: f"state: {state}",
    listing="action: list and a prefix",
    history="action: list with this key, which shows its event log",
)
"""How the admin job words a fix (the CLI words it as a command)."""


@dataclass(frozen=True)
class Selected:
    selection: Selection
    entries: list[Entry]
    truncated: bool = False
    """More entries matched than max_keys (list only: it shows the newest max_keys)."""


def select_entries(ledger: Ledger, config: LedgerAdminConfig) -> Selected:
    """The entries the config names (the store filters them); raises OperationRefused for a
    config that names none sensibly, or more than max_keys for a change."""
    if config.action != "list" and config.key is None and config.prefix is None:
        raise OperationRefused(
            f"action {config.action!r} needs a key or a prefix (list every key with action: list)"
        )
    if config.max_keys < 1:
        raise OperationRefused(f"max_keys must be 1 or more, got {config.max_keys}")
    try:
        selection = Selection(
            key=config.key,
            prefix=config.prefix,
            state=None if config.state is None else State(config.state.value),
            run_id=config.run_id,
            touched_by=config.touched_by,
            fence=config.fence,
        ).checked()
        found = select(ledger, selection, ADMIN_PHRASING, limit=config.max_keys + 1)
    except InvalidArgumentError as exc:
        raise OperationRefused(str(exc)) from None
    described = selection.describe()
    if config.action == "list":
        return Selected(selection, found[: config.max_keys], len(found) > config.max_keys)
    if not found:
        raise OperationRefused(f"no entry matches {described}: nothing to {config.action}")
    if len(found) > config.max_keys:
        raise OperationRefused(
            f"{described} matches more than max_keys={config.max_keys} keys; narrow the "
            "selection (state, run_id, touched_by, a longer prefix) or raise max_keys"
        )
    return Selected(selection, found)


def _list_rows(entries: Sequence[Entry], now: datetime) -> list[Row]:
    """When each was claimed and until when it holds, as the CLI's list shows it."""
    rows = []
    for e in entries:
        until = "lease until" if e.state == State.IN_FLIGHT else "dedups until"
        parts = [f"claimed {format_time(e.claimed_at)}"]
        if holds_until(e) is not None:
            parts.append(f"{until} {format_time(holds_until(e))}")
        if entry_note(e, now):
            parts.append(entry_note(e, now))
        rows.append(Row(e.key, e.state.value, e.run_id, e.fence, "none", note="; ".join(parts)))
    return rows


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
    selected: Selected | None,
    rows: Sequence[Row],
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "action": MetadataValue.text(config.action),
        "dry_run": MetadataValue.bool(config.dry_run or config.action == "list"),
        "ledger": MetadataValue.text(url),
        "selection": MetadataValue.text(selected.selection.describe() if selected else "-"),
        "keys": MetadataValue.md(rows_markdown(rows, listing=config.action == "list")),
        "keys_json": MetadataValue.json([asdict(r) for r in rows]),
    }
    if config.action != "list":
        label = "would_change" if config.dry_run else "changed"
        applied = [
            r for r in rows if r.change != "none" and (r.result == DONE[r.change] or not r.result)
        ]
        meta[label] = MetadataValue.int(len(applied))
        meta["unchanged"] = MetadataValue.int(len(rows) - len(applied))
    if selected is not None and selected.truncated:
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
        cells = [e.id, format_time(e.at), e.kind.value, e.run_id or "-"]
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
    by = f"Dagster run {context.run_id} (job {context.job_name})"
    selected: Selected | None = None
    planned: list[Row] = []
    rows: list[Row] = []
    try:
        store = ledger.open()
        selected = select_entries(store, config)
        if config.action == "list":
            planned = rows = _list_rows(selected.entries, store.now())
        else:
            statuses = _holder_statuses(context, selected.entries)
            planned = rows = plan(
                selected.entries,
                config.action,
                store.now(),
                ADMIN_PHRASING,
                holder_status=statuses,
            )
            if not config.dry_run:
                rows = []
                for row in apply(store, planned, by=by, reason=config.reason):
                    rows.append(row)  # one at a time: a ledger error below still reports these
    except OperationRefused as exc:
        raise Failure(
            description=f"rocky_dagster: {exc}",
            metadata=_metadata(url, config, selected, exc.rows),
            allow_retries=False,
        ) from None
    except InvalidArgumentError as exc:  # a bad reason: refused before the first write
        raise Failure(
            description=f"rocky_dagster: {exc}",
            metadata=_metadata(url, config, selected, planned),
            allow_retries=False,
        ) from None
    except LedgerError as exc:
        acted = len(rows) if rows is not planned else 0
        rows = rows[:acted] + [replace(r, result=NOT_ATTEMPTED) for r in planned[acted:]]
        changed = sum(r.result in DONE.values() for r in rows)
        raise Failure(
            description=(
                f"rocky_dagster: ledger error during {config.action} of "
                f"{selected.selection.describe() if selected else 'the selection'}: {exc}; "
                + (
                    f"{changed} key(s) were changed before it (listed in the metadata) and stay "
                    "so, the others were not attempted; look again with action: list"
                    if changed
                    else "nothing was changed"
                )
            ),
            metadata=_metadata(url, config, selected, rows),
        ) from exc
    meta = _metadata(url, config, selected, rows)
    if config.action == "list" and config.key is not None:
        meta["history"] = MetadataValue.md(_history_markdown(store, config.key))
    for row in rows:
        if row.event:
            context.log.info(f"rocky_dagster: {row.key!r} {row.result}: {row.event}")
    lost = [r.key for r in rows if r.result == LEFT_ALONE]
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
            f" of {len(rows)} key(s) would be {DONE[config.action]}; set dry_run: false to act"
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
            from rocky_dagster.operations.admin_job import ledger_admin_job

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
            from rocky_dagster.operations.admin_job import ledger_definitions

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
