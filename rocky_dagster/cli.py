"""`rocky-dagster`: the operator's command line for the idempotency ledger.

    rocky-dagster ledger list [--state S] [--limit N]   entries, newest claim first
    rocky-dagster ledger show KEY                       one entry, every field
    rocky-dagster ledger history KEY [--limit N]        the key's events, oldest first
    rocky-dagster ledger release KEY [--yes]            free an in-flight claim (audited)
    rocky-dagster ledger reset KEY [--yes]              forget a finished key (audited)
    rocky-dagster ledger sweep                          delete what retention no longer covers
    rocky-dagster ledger stats                          totals

Every command takes `--url` (default: `$ROCKY_LEDGER_URL`, else `$DAGSTER_HOME/rocky_ledger.db`,
else `./.rocky/ledger.db`) and `--json`. Exit codes: 0 done, 1 ledger error or refused/aborted
action, 2 bad usage; errors are one line on stderr. Imports no Dagster, so it starts fast.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .ledger import (
    Entry,
    Event,
    Ledger,
    LedgerError,
    State,
    default_ledger_url,
    open_ledger,
    redact_url,
)

PROG = "rocky-dagster"


class CliError(Exception):
    """A refused or aborted action: exit 1 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: one line on stderr and exit 2 (argparse would print the usage block too)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- output -------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    """Columns padded to their widest cell, two spaces apart; the last column is not padded."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        out.write("  ".join([*cells, str(row[-1])]).rstrip() + "\n")


def _fields(pairs: list[tuple[str, Any]], out: TextIO) -> None:
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        out.write(f"{name.ljust(width)}  {value}\n")


def _json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def _note(entry: Entry, now: datetime) -> str:
    if entry.state == State.IN_FLIGHT:
        return "stale (adoptable)" if entry.lease_expires_at <= now else ""
    return "expired (awaits sweep)" if entry.is_expired(now) else ""


def _until(entry: Entry) -> datetime | None:
    return entry.lease_expires_at if entry.state == State.IN_FLIGHT else entry.expires_at


# --- commands ---------------------------------------------------------------------------------


def cmd_list(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    entries = ledger.entries(args.state, limit=args.limit)
    if args.json:
        _json([e.model_dump(mode="json") for e in entries], out)
        return 0
    if not entries:
        out.write("no entries" + (f" in state {args.state}" if args.state else "") + "\n")
        return 0
    now = ledger.now()
    rows = [
        [
            e.key,
            e.state.value,
            e.run_id,
            str(e.fence),
            e.pipeline or "-",
            _time(e.claimed_at),
            _time(_until(e)),
            _note(e, now),
        ]
        for e in entries
    ]
    headers = ["KEY", "STATE", "RUN", "FENCE", "PIPELINE", "CLAIMED (UTC)", "UNTIL (UTC)", "NOTE"]
    _table(rows, headers, out)
    return 0


def cmd_show(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    entry = _entry(ledger, args.key)
    if args.json:
        _json(entry.model_dump(mode="json"), out)
        return 0
    until = "lease_expires_at" if entry.state == State.IN_FLIGHT else "expires_at"
    note = _note(entry, ledger.now())
    _fields(
        [
            ("key", entry.key),
            ("state", entry.state.value + (f"  ({note})" if note else "")),
            ("run_id", entry.run_id),
            ("fence", entry.fence),
            ("pipeline", entry.pipeline or "-"),
            ("fingerprint", entry.fingerprint or "-"),
            ("dedup_on", entry.dedup_on),
            ("prior_run_id", entry.prior_run_id or "-"),
            ("claimed_at", _time(entry.claimed_at)),
            ("heartbeat_at", _time(entry.heartbeat_at)),
            ("finalized_at", _time(entry.finalized_at) if entry.finalized_at else "-"),
            (until, _time(_until(entry))),
            ("result", "-" if entry.result is None else json.dumps(entry.result, sort_keys=True)),
        ],
        out,
    )
    return 0


def cmd_history(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    events = ledger.history(args.key, limit=args.limit)
    if args.json:
        _json([e.model_dump(mode="json") for e in events], out)
        return 0
    if not events:
        out.write(f"no events for key {args.key!r}\n")
        return 0
    rows = [_event_row(e) for e in events]
    _table(rows, ["ID", "AT (UTC)", "EVENT", "RUN", "FENCE", "DETAIL"], out)
    return 0


def _event_row(event: Event) -> list[str]:
    fence = "-" if event.fence is None else str(event.fence)
    return [
        str(event.id),
        _time(event.at),
        event.kind.value,
        event.run_id or "-",
        fence,
        event.detail or "",
    ]


def cmd_release(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    entry = _entry(ledger, args.key)
    if entry.state != State.IN_FLIGHT:
        raise CliError(
            f"key {entry.key!r} is {entry.state.value}, not in flight: nothing to release "
            f"(to forget a finished key: {PROG} ledger reset KEY)"
        )
    _check_guards(entry, args)
    _confirm(
        args,
        f"Release the in-flight claim on {entry.key!r} held by run {entry.run_id} "
        f"(fence {entry.fence}, lease until {_time(entry.lease_expires_at)} UTC)? "
        "If that run is still working, its finalize will be refused and the next claim runs "
        "the work again.",
        "nothing released",
    )
    reason = _reason("released", args)
    if not ledger.release(entry.key, run_id=entry.run_id, fence=entry.fence, reason=reason):
        raise CliError(
            f"the claim on {entry.key!r} changed meanwhile; nothing released, look again"
        )
    done = {"key": entry.key, "released": True, "run_id": entry.run_id, "fence": entry.fence}
    if args.json:
        _json(done, out)
    else:
        out.write(f"released {entry.key!r} (run {entry.run_id}, fence {entry.fence})\n")
    return 0


def cmd_reset(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    entry = _entry(ledger, args.key)
    if entry.state == State.IN_FLIGHT:
        raise CliError(
            f"key {entry.key!r} is in flight (run {entry.run_id}): reset forgets finished keys "
            f"only; to free a claim use: {PROG} ledger release KEY"
        )
    _check_guards(entry, args)
    _confirm(
        args,
        f"Forget the {entry.state.value} record of {entry.key!r} from run {entry.run_id} "
        f"(finalized {_time(entry.finalized_at)} UTC)? The next claim of this key runs the work "
        "again.",
        "nothing reset",
    )
    if not ledger.reset(entry.key, reason=_reason("reset", args)):
        raise CliError(f"the entry of {entry.key!r} changed meanwhile; nothing reset, look again")
    done = {"key": entry.key, "reset": True, "state": entry.state.value, "run_id": entry.run_id}
    if args.json:
        _json(done, out)
    else:
        out.write(
            f"reset {entry.key!r} (forgot the {entry.state.value} record of run {entry.run_id})\n"
        )
    return 0


def cmd_sweep(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    swept = ledger.sweep()
    if args.json:
        _json({"swept": swept}, out)
    else:
        out.write(f"swept {swept} {'entry' if swept == 1 else 'entries'}\n")
    return 0


def cmd_stats(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    stats = ledger.stats()
    if args.json:
        _json({"url": ledger.url, **stats.model_dump(mode="json")}, out)
        return 0
    _fields([("url", ledger.url), *stats.model_dump().items()], out)
    return 0


def _entry(ledger: Ledger, key: str) -> Entry:
    entry = ledger.get(key)
    if entry is None:
        raise CliError(f"no entry for key {key!r} (see: {PROG} ledger list, or history KEY)")
    return entry


def _check_guards(entry: Entry, args: argparse.Namespace) -> None:
    if args.run_id is not None and entry.run_id != args.run_id:
        raise CliError(f"key {entry.key!r} is held by run {entry.run_id}, not {args.run_id}")
    if args.fence is not None and entry.fence != args.fence:
        raise CliError(f"key {entry.key!r} has fence {entry.fence}, not {args.fence}")


def _confirm(args: argparse.Namespace, question: str, refused: str) -> None:
    """Ask on stderr; anything but y/yes, or no answer at all (EOF, no stdin), is a no."""
    if args.yes:
        return
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline() if sys.stdin is not None else ""
    except (OSError, ValueError):
        answer = ""
    if not (sys.stdin is not None and sys.stdin.isatty()):
        sys.stderr.write("\n")  # the answer was not echoed: end the question's line
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError(f"aborted: {refused} (pass --yes to act without asking)")


def _reason(action: str, args: argparse.Namespace) -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "an unknown user"
    text = f"{action} by {who} with {PROG}"
    return f"{text}: {args.reason}" if args.reason else text


# --- wiring -------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Operate the rocky_dagster idempotency ledger.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{ledger}")
    ledger = groups.add_parser(
        "ledger",
        help="inspect and operate the ledger",
        description="Inspect and operate the idempotency ledger.",
    )
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        help="ledger URL: sqlite:///path/to/ledger.db or postgresql://user@host/db "
        "(default: $ROCKY_LEDGER_URL, else $DAGSTER_HOME/rocky_ledger.db, else ./.rocky/ledger.db)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    commands = ledger.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    listing = add("list", cmd_list, "list entries, newest claim first")
    listing.add_argument("--state", choices=[s.value for s in State], help="only this state")
    listing.add_argument("--limit", type=_positive, default=50, help="at most N (default 50)")
    add("show", cmd_show, "show one entry").add_argument("key")
    history = add("history", cmd_history, "show a key's events, oldest first")
    history.add_argument("key")
    history.add_argument("--limit", type=_positive, help="only the newest N")
    for name, handler, help in (
        ("release", cmd_release, "free an in-flight claim so the next run proceeds (audited)"),
        ("reset", cmd_reset, "forget a finished key so the next run proceeds (audited)"),
    ):
        sub = add(name, handler, help)
        sub.add_argument("key")
        sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        sub.add_argument("--run-id", help="act only if this run holds (or last held) the key")
        sub.add_argument("--fence", type=_positive, help="act only if the entry has this fence")
        sub.add_argument("--reason", help="recorded in the event log")
    add("sweep", cmd_sweep, "delete entries and events that retention no longer covers")
    add("stats", cmd_stats, "totals by state, stale and expired counts, events")
    return parser


def _sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names (as open_ledger reads it), or None for other URLs."""
    if "://" not in url:
        return Path(url)
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "sqlite" and rest.startswith("/") and rest[1:] not in ("", ":memory:"):
        return Path(rest[1:])
    return None


def _open(url: str | None) -> Ledger:
    """Open an existing ledger: reading a typo'd path must not create an empty ledger there."""
    url = url or default_ledger_url(create_dir=False)
    path = _sqlite_path(url)
    if path is not None and not path.expanduser().exists():
        raise CliError(
            f"no ledger at {path} (url {redact_url(url)}): nothing has been claimed there yet, "
            "or --url / $ROCKY_LEDGER_URL / $DAGSTER_HOME points elsewhere"
        )
    return open_ledger(url)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        ledger = _open(args.url)
        try:
            return args.handler(ledger, args, out)
        finally:
            ledger.close()
    except (LedgerError, CliError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the error says
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # `rocky-dagster ledger list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
