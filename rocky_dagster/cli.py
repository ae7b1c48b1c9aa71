"""`rocky-dagster`: the operator's command line for the idempotency ledger.

    rocky-dagster ledger list [--state S] [--prefix BASE_KEY] [--run-id RUN_ID | --touched-by RUN_ID]
                              [--limit N]               entries, newest claim first
    rocky-dagster ledger show KEY                       one entry, every field
    rocky-dagster ledger history KEY [--limit N]        the key's events, oldest first
    rocky-dagster ledger release KEY [--yes]            free an in-flight claim (audited)
    rocky-dagster ledger reset KEY [--yes]              forget a finished key (audited)
    rocky-dagster ledger force KEY [--yes]              make the next run of a completed key
                                                        do the work again (audited)
    rocky-dagster ledger sweep                          delete what retention no longer covers
    rocky-dagster ledger stats                          totals
    rocky-dagster ledger check                          look for damage (SQLite integrity_check)

`--prefix BASE_KEY` lists the keys starting with BASE_KEY (a tagged key's steps are
`BASE_KEY/step`). `--run-id RUN_ID` lists the entries that run holds in flight or last finished
(the same filter `release`/`reset`/`force --run-id` guard with, and the admin job's `run_id`);
`--touched-by RUN_ID` (formerly `--run`) adds every key whose history names the run (adopted
from it, skipped by it, reaped). The selecting, checking and writing are
`rocky_dagster.ledger.operations`, shared with `ledger_admin_job`.

`--url` (default: `$ROCKY_LEDGER_URL`, else `$DAGSTER_HOME/rocky_ledger.db`, else
`./.rocky/ledger.db`) and `--json` go anywhere: before `ledger`, before the command or after it.

Exit codes (errors are one line on stderr, never a traceback; with `--json` the same error is
also a JSON object on stdout, ``{"error": "...", "exit_code": N}``):

    0    done; `check` found no problem
    1    ledger error (unreachable, damaged, config), refused or aborted action, no such key,
         `check` found problems
    2    bad usage: unknown command or option, malformed option value, an argument that is
         not valid text (undecodable bytes), a key/run id/reason the ledger would refuse
    130  interrupted

Imports no Dagster, so it starts fast.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from rocky_dagster.ledger import (
    Event,
    InvalidArgumentError,
    Ledger,
    LedgerError,
    State,
    default_ledger_url,
    open_ledger,
    redact_url,
)
from rocky_dagster.ledger.model import validate_reason
from rocky_dagster.ledger.operations import (
    DONE,
    LEFT_ALONE,
    Action,
    Phrasing,
    Selection,
    apply,
    entry_note,
    format_time,
    holds_until,
    missing_message,
    plan,
    select,
)

PROG = "rocky-dagster"
CLI_PHRASING = Phrasing(
    action=lambda name: f"{PROG} ledger {name} KEY",
    state_filter=lambda state: f"--state {state}",
    listing=f"{PROG} ledger list",
    history=f"{PROG} ledger history KEY",
)
"""How the CLI words a fix (the admin job words it as config)."""


class CliError(Exception):
    """A refused or aborted action: exit 1 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    json_errors = False
    """Set by `main` when --json is on the command line: errors are JSON on stdout too."""
    json_written = False
    """Whether stdout already holds the command's JSON (`check` reports, then fails)."""

    def error(self, message: str) -> NoReturn:
        """Bad usage: one line on stderr and exit 2 (argparse would print the usage block too)."""
        text = f"{message} (see {self.prog} --help)"
        if _Parser.json_errors:
            _json({"error": text, "exit_code": 2}, sys.stdout)
        self.exit(2, f"{self.prog}: error: {text}\n")


# --- output -------------------------------------------------------------------------------------


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
    _Parser.json_written = True  # the command's answer: an error after it adds no second object
    out.write(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


# --- commands ---------------------------------------------------------------------------------


def cmd_list(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    selection = Selection(
        prefix=args.prefix,
        state=None if args.state is None else State(args.state),
        run_id=args.run_id,
        touched_by=args.touched_by,
    )
    entries = select(ledger, selection, CLI_PHRASING, limit=args.limit)
    if args.json:
        _json([e.model_dump(mode="json") for e in entries], out)
        return 0
    if not entries:
        where = [f"with prefix {args.prefix!r}"] if args.prefix is not None else []
        out.write(" ".join(["no entries", *where, *selection.filters()]) + "\n")
        return 0
    now = ledger.now()
    rows = [
        [
            e.key,
            e.state.value,
            e.run_id,
            str(e.fence),
            e.pipeline or "-",
            format_time(e.claimed_at),
            format_time(holds_until(e)),
            entry_note(e, now),
        ]
        for e in entries
    ]
    headers = ["KEY", "STATE", "RUN", "FENCE", "PIPELINE", "CLAIMED (UTC)", "UNTIL (UTC)", "NOTE"]
    _table(rows, headers, out)
    return 0


def cmd_show(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    [entry] = select(ledger, Selection(key=args.key), CLI_PHRASING, limit=1)
    if args.json:
        _json(entry.model_dump(mode="json"), out)
        return 0
    until = "lease_expires_at" if entry.state == State.IN_FLIGHT else "expires_at"
    note = entry_note(entry, ledger.now())
    _fields(
        [
            ("key", entry.key),
            ("state", entry.state.value + (f"  ({note})" if note else "")),
            ("run_id", entry.run_id),
            ("fence", entry.fence),
            ("generation", entry.generation),
            ("pipeline", entry.pipeline or "-"),
            ("fingerprint", entry.fingerprint or "-"),
            ("dedup_on", entry.dedup_on),
            ("prior_run_id", entry.prior_run_id or "-"),
            ("claimed_at", format_time(entry.claimed_at)),
            ("heartbeat_at", format_time(entry.heartbeat_at)),
            ("finalized_at", format_time(entry.finalized_at) if entry.finalized_at else "-"),
            (until, format_time(holds_until(entry))),
            ("result", "-" if entry.result is None else json.dumps(entry.result, sort_keys=True)),
        ],
        out,
    )
    return 0


def cmd_history(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    events = ledger.history(args.key, limit=args.limit)
    if not events:
        if ledger.get(args.key) is not None:  # a damaged or hand-edited log
            raise CliError(f"no history for key {args.key!r} (see: {PROG} ledger show KEY)")
        raise CliError(missing_message(ledger, args.key, CLI_PHRASING))
    if args.json:
        _json([e.model_dump(mode="json") for e in events], out)
        return 0
    rows = [_event_row(e) for e in events]
    _table(rows, ["ID", "AT (UTC)", "EVENT", "RUN", "FENCE", "DETAIL"], out)
    return 0


def _event_row(event: Event) -> list[str]:
    fence = "-" if event.fence is None else str(event.fence)
    return [
        str(event.id),
        format_time(event.at),
        event.kind.value,
        event.run_id or "-",
        fence,
        event.detail or "",
    ]


_QUESTIONS: dict[str, str] = {
    "release": "Release the in-flight claim on {key!r} held by run {run} (fence {fence}, lease "
    "until {until} UTC)? If that run is still working, its finalize will be refused and the "
    "next claim runs the work again.",
    "reset": "Forget the {state} record of {key!r} from run {run} (finalized {finalized} UTC)? "
    "The next claim of this key runs the work again.",
    "force": "Force the next run of {key!r}: forget the {state} record of run {run} (finalized "
    "{finalized} UTC), audited as forced? The next claim of this key runs the work again.",
}


def cmd_change(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    """release, reset or force one key: the same checks and writes as `ledger_admin_job`."""
    action: Action = args.command
    if args.reason is not None:  # refuse a bad reason before looking anything up
        validate_reason(args.reason)
    selection = Selection(key=args.key, run_id=args.run_id, fence=args.fence)
    [entry] = select(ledger, selection, CLI_PHRASING, limit=1)
    [row] = plan([entry], action, ledger.now(), CLI_PHRASING)
    verb = DONE[action]
    if row.change == "none":  # force of a key whose next run proceeds anyway
        if args.json:
            _json({"key": entry.key, verb: False, "state": entry.state.value, "why": row.note}, out)
        else:
            out.write(f"left {entry.key!r} unchanged: {row.note}\n")
        return 0
    question = _QUESTIONS[action].format(
        key=entry.key,
        run=entry.run_id,
        fence=entry.fence,
        state=entry.state.value,
        until=format_time(entry.lease_expires_at),
        finalized=format_time(entry.finalized_at),
    )
    _confirm(args, question, f"nothing {verb}")
    [done] = apply(ledger, [row], by=f"{_who()} with {PROG}", reason=args.reason)
    if done.result == LEFT_ALONE:
        raise CliError(f"the entry of {entry.key!r} changed meanwhile; nothing {verb}, look again")
    if action == "release":
        result: dict[str, Any] = {"key": entry.key, verb: True, "run_id": entry.run_id}
        result["fence"] = entry.fence
        text = f"released {entry.key!r} (run {entry.run_id}, fence {entry.fence})"
    else:
        result = {"key": entry.key, verb: True, "state": entry.state.value, "run_id": entry.run_id}
        text = f"{verb} {entry.key!r} (forgot the {entry.state.value} record of run {entry.run_id})"
    if args.json:
        _json(result, out)
    else:
        out.write(text + "\n")
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


def cmd_check(ledger: Ledger, args: argparse.Namespace, out: TextIO) -> int:
    problems = ledger.check()
    if args.json:
        _json({"url": ledger.url, "ok": not problems, "problems": problems}, out)
    elif problems:
        for problem in problems:
            out.write(f"problem: {' '.join(problem.split())}\n")
    else:
        out.write(f"ok: {ledger.url}\n")
    if problems:
        raise CliError(
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found in {ledger.url}; "
            "restore the ledger from a backup"
        )
    return 0


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


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "an unknown user"


# --- wiring -------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="ledger URL: sqlite:///path/to/ledger.db or postgresql://user@host/db "
        "(default: $ROCKY_LEDGER_URL, else $DAGSTER_HOME/rocky_ledger.db, else ./.rocky/ledger.db)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output; an error is then also a JSON object on stdout: "
        '{"error": MESSAGE, "exit_code": N}',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Operate the rocky_dagster idempotency ledger.")
    # global options are accepted at every level; SUPPRESS keeps a later level's default from
    # overwriting a value given earlier (argparse copies a subparser's namespace over ours)
    parser.set_defaults(url=None, json=False)
    common = _Parser(add_help=False)
    _global_options(common)
    _global_options(parser)
    groups = parser.add_subparsers(dest="group", required=True, metavar="{ledger}")
    ledger = groups.add_parser(
        "ledger",
        parents=[common],
        help="inspect and operate the ledger",
        description="Inspect and operate the idempotency ledger.",
    )
    commands = ledger.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    listing = add("list", cmd_list, "list entries, newest claim first")
    listing.add_argument("--state", choices=[s.value for s in State], help="only this state")
    listing.add_argument("--limit", type=_positive, default=50, help="at most N (default 50)")
    listing.add_argument(
        "--prefix",
        metavar="BASE_KEY",
        help="only keys starting with BASE_KEY (a tagged key's steps)",
    )
    by_run = listing.add_mutually_exclusive_group()
    by_run.add_argument(
        "--run-id",
        metavar="RUN_ID",
        help="only entries this run holds (in flight) or last finished",
    )
    by_run.add_argument(
        "--touched-by",
        "--run",
        dest="touched_by",
        metavar="RUN_ID",
        help="only what this run claimed or did: entries it holds or last finished, and keys "
        "whose history names it (--run is the former name)",
    )
    add("show", cmd_show, "show one entry").add_argument("key")
    history = add("history", cmd_history, "show a key's events, oldest first")
    history.add_argument("key")
    history.add_argument("--limit", type=_positive, help="only the newest N")
    for name, help in (
        ("release", "free an in-flight claim so the next run proceeds (audited)"),
        ("reset", "forget a finished key so the next run proceeds (audited)"),
        ("force", "make the next run of a completed key do the work again (audited)"),
    ):
        sub = add(name, cmd_change, help)
        sub.add_argument("key")
        sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        sub.add_argument("--run-id", help="act only if this run holds (or last finished) the key")
        sub.add_argument("--fence", type=_positive, help="act only if the entry has this fence")
        sub.add_argument("--reason", help="recorded in the event log")
    add("sweep", cmd_sweep, "delete entries and events that retention no longer covers")
    add("stats", cmd_stats, "totals by state, stale and expired counts, events")
    add("check", cmd_check, "look for damage: integrity check, rows that do not decode")
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


def _not_text(argv: Sequence[str]) -> str | None:
    """Why an argument cannot be used (undecodable bytes arrive as lone surrogates), or None."""
    for number, arg in enumerate(argv, start=1):
        for position, char in enumerate(arg):
            if "\ud800" <= char <= "\udfff":
                try:
                    shown = repr(arg.encode("utf-8", "surrogateescape"))
                except UnicodeEncodeError:
                    shown = ascii(arg)
                return (
                    f"argument {number} ({shown}) is not valid text: undecodable bytes at "
                    f"position {position}; pass UTF-8"
                )
    return None


def _fail(code: int, message: str) -> int:
    text = " ".join(message.split())  # one line, whatever the error says
    if _Parser.json_errors and not _Parser.json_written:
        _json({"error": text, "exit_code": code}, sys.stdout)
    sys.stderr.write(f"{PROG}: error: {text}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors, _Parser.json_written = "--json" in argv, False
    problem = _not_text(argv)
    if problem is not None:
        return _fail(2, f"{problem} (see {PROG} --help)")
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        ledger = _open(args.url)
        try:
            return args.handler(ledger, args, out)
        finally:
            ledger.close()
    except InvalidArgumentError as exc:
        return _fail(2, str(exc))
    except (LedgerError, CliError) as exc:
        return _fail(1, str(exc))
    except UnicodeEncodeError as exc:  # a terminal that cannot show a key's characters
        return _fail(
            1,
            f"cannot write the output in this terminal's encoding ({exc}); "
            "set PYTHONIOENCODING=utf-8",
        )
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # `rocky-dagster ledger list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
