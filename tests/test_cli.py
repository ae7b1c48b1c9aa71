"""The `rocky-dagster` console script, run as a real subprocess against real ledger files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rocky_dagster.ledger import EventKind, Ledger, Outcome, State, open_ledger

SCRIPT = Path(sys.executable).with_name("rocky-dagster")
T0 = datetime(2031, 3, 14, 15, 9, 26, 500_000, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def rocky(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.fail(
            f"{SCRIPT} is missing: install the package (pip install -e . --no-deps) so the "
            "console script exists"
        )
    base = {k: v for k, v in os.environ.items() if k not in ("ROCKY_LEDGER_URL", "DAGSTER_HOME")}
    return subprocess.run(
        [str(SCRIPT), *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *says: str) -> str:
    """The command failed with `code` and one line on stderr saying `says`, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("rocky-dagster"), result.stderr
    assert all(phrase in lines[-1] for phrase in says), lines[-1]
    return lines[-1]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture
def seeded(url: str) -> Callable[..., Ledger]:
    """A ledger with one key in each state, written at known times (T0 and after)."""
    now = [T0]
    ledger = open_ledger(url, {"lease_seconds": 120}, clock=lambda: now[0])
    claim = ledger.claim("job/a/extract", "run-1", pipeline="replication", fingerprint="fp1")
    ledger.finalize("job/a/extract", claim.fence, Outcome.SUCCEEDED, result={"rows": 42})
    now[0] += timedelta(minutes=1)
    claim = ledger.claim("job/b/load", "run-2", pipeline="load")
    ledger.finalize("job/b/load", claim.fence, Outcome.FAILED)
    now[0] += timedelta(minutes=1)
    ledger.claim("job/c/transform-with-a-longer-key", "run-3")
    ledger.close()
    return lambda: open_ledger(url, clock=lambda: now[0])


def columns(line: str, headers: list[str], header_line: str) -> list[str]:
    starts = [header_line.index(h) for h in headers]
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_the_cli_does_not_import_dagster():
    probe = "import sys, rocky_dagster.cli; print(sorted(m for m in sys.modules if 'dagster' == m.split('.')[0]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_names_every_command():
    result = rocky("ledger", "--help")
    assert result.returncode == 0
    for command in ("list", "show", "history", "release", "reset", "sweep", "stats"):
        assert command in result.stdout


def test_list_is_an_aligned_table_in_utc_newest_claim_first(url: str, seeded):
    result = rocky("ledger", "list", "--url", url)

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    headers = ["KEY", "STATE", "RUN", "FENCE", "PIPELINE", "CLAIMED (UTC)", "UNTIL (UTC)", "NOTE"]
    assert header.split("  ")[0] == "KEY" and all(h in header for h in headers)
    table = [columns(row, headers, header) for row in rows]
    with seeded() as ledger:
        fences = [str(ledger.get(row[0]).fence) for row in table]
    assert [r[:5] for r in table] == [
        ["job/c/transform-with-a-longer-key", "in_flight", "run-3", fences[0], "-"],
        ["job/b/load", "failed", "run-2", fences[1], "load"],
        ["job/a/extract", "succeeded", "run-1", fences[2], "replication"],
    ]
    assert table[2][5:7] == ["2031-03-14 15:09:26Z", "2031-04-13 15:09:26Z"]  # +30 days retention
    assert table[0][5:7] == ["2031-03-14 15:11:26Z", "2031-03-14 15:13:26Z"]  # +2 min lease


def test_list_filters_by_state_and_limits(url: str, seeded):
    in_flight = rocky("ledger", "list", "--url", url, "--state", "in_flight")
    assert [line.split()[0] for line in in_flight.stdout.splitlines()[1:]] == [
        "job/c/transform-with-a-longer-key"
    ]
    limited = rocky("ledger", "list", "--url", url, "--limit", "2", "--json")
    assert [e["key"] for e in json.loads(limited.stdout)] == [
        "job/c/transform-with-a-longer-key",
        "job/b/load",
    ]
    none = rocky("ledger", "list", "--url", url, "--state", "failed", "--limit", "1")
    assert none.stdout.splitlines()[1].split()[:2] == ["job/b/load", "failed"]


def test_list_json_is_the_entries_as_the_api_gives_them(url: str, seeded):
    result = rocky("ledger", "list", "--url", url, "--json")

    assert result.returncode == 0
    with seeded() as ledger:
        assert json.loads(result.stdout) == [e.model_dump(mode="json") for e in ledger.entries()]
    assert json.loads(result.stdout)[2]["result"] == {"rows": 42}


def test_show_prints_every_field_and_json_round_trips(url: str, seeded):
    human = rocky("ledger", "show", "job/a/extract", "--url", url)
    as_json = rocky("ledger", "show", "job/a/extract", "--url", url, "--json")

    assert human.returncode == as_json.returncode == 0
    fields = dict(line.split(None, 1) for line in human.stdout.splitlines())
    assert fields["state"] == "succeeded" and fields["run_id"] == "run-1"
    assert fields["fingerprint"] == "fp1" and fields["result"] == '{"rows": 42}'
    assert fields["claimed_at"] == "2031-03-14 15:09:26Z"
    assert fields["expires_at"] == "2031-04-13 15:09:26Z"
    with seeded() as ledger:
        assert json.loads(as_json.stdout) == ledger.get("job/a/extract").model_dump(mode="json")


def test_show_of_an_unknown_key_is_an_error(url: str, seeded):
    one_line_error(
        rocky("ledger", "show", "nope", "--url", url), 1, "no entry and no history for key 'nope'"
    )


def test_history_lists_events_oldest_first(url: str, seeded):
    with seeded() as ledger:
        ledger.claim("job/a/extract", "run-9")  # a skip, logged
    human = rocky("ledger", "history", "job/a/extract", "--url", url)
    as_json = rocky("ledger", "history", "job/a/extract", "--url", url, "--json", "--limit", "2")

    header, *rows = human.stdout.splitlines()
    assert header.split() == ["ID", "AT", "(UTC)", "EVENT", "RUN", "FENCE", "DETAIL"]
    assert [row.split()[3:5] for row in rows] == [
        ["claimed", "run-1"],
        ["succeeded", "run-1"],
        ["skipped_completed", "run-9"],
    ]
    assert rows[0].split()[1:3] == ["2031-03-14", "15:09:26Z"]
    assert [e["kind"] for e in json.loads(as_json.stdout)] == ["succeeded", "skipped_completed"]


@pytest.mark.parametrize(
    ("stdin", "why"), [(None, "no stdin"), ("", "EOF"), ("n\n", "no"), ("maybe\n", "not yes")]
)
def test_release_without_a_yes_does_nothing(url: str, seeded, stdin: str | None, why: str):
    result = rocky(
        "ledger", "release", "job/c/transform-with-a-longer-key", "--url", url, stdin=stdin
    )

    one_line_error(result, 1, "aborted", "nothing released", "--yes")
    assert "Release the in-flight claim" in result.stderr and "run-3" in result.stderr
    with seeded() as ledger:
        assert ledger.get("job/c/transform-with-a-longer-key").state == State.IN_FLIGHT
        assert [e.kind for e in ledger.history("job/c/transform-with-a-longer-key")] == [
            EventKind.CLAIMED
        ]


@pytest.mark.parametrize("confirm", [["--yes"], ["-y"], []], ids=["--yes", "-y", "answer-y"])
def test_release_frees_the_claim_and_records_who_did_it(url: str, seeded, confirm: list[str]):
    key = "job/c/transform-with-a-longer-key"
    stdin = None if confirm else "y\n"
    result = rocky(
        "ledger", "release", key, "--url", url, "--reason", "worker OOM", *confirm, stdin=stdin
    )

    assert result.returncode == 0, result.stderr
    with seeded() as ledger:
        fence = ledger.history(key)[0].fence
        assert result.stdout == f"released '{key}' (run run-3, fence {fence})\n"
        assert ledger.get(key).released
        event = ledger.history(key)[-1]
        assert (event.kind, event.run_id, event.fence) == (EventKind.RELEASED, "run-3", fence)
        assert "rocky-dagster" in event.detail and "worker OOM" in event.detail


def test_release_refuses_finished_keys_and_wrong_guards(url: str, seeded):
    one_line_error(
        rocky("ledger", "release", "job/a/extract", "--url", url, "--yes"),
        1,
        "is succeeded, not in flight",
        "ledger reset",
    )
    key = "job/c/transform-with-a-longer-key"
    with seeded() as ledger:
        fence = ledger.get(key).fence
    one_line_error(
        rocky("ledger", "release", key, "--url", url, "--yes", "--run-id", "run-1"),
        1,
        "held by run run-3, not run-1",
    )
    wrong = rocky("ledger", "release", key, "--url", url, "--yes", "--fence", str(fence + 1))
    one_line_error(wrong, 1, f"has fence {fence}, not {fence + 1}")
    with seeded() as ledger:
        assert ledger.get(key).state == State.IN_FLIGHT
    right = rocky("ledger", "release", key, "--url", url, "--yes", "--json", "--fence", str(fence))
    assert json.loads(right.stdout) == {
        "key": key,
        "released": True,
        "run_id": "run-3",
        "fence": fence,
    }


def test_reset_forgets_a_finished_key_after_confirmation(url: str, seeded):
    refused = rocky("ledger", "reset", "job/a/extract", "--url", url)
    one_line_error(refused, 1, "aborted", "nothing reset")
    in_flight = rocky("ledger", "reset", "job/c/transform-with-a-longer-key", "--url", url, "--yes")
    one_line_error(in_flight, 1, "is in flight", "ledger release")
    with seeded() as ledger:
        assert ledger.get("job/a/extract").state == State.SUCCEEDED
        assert ledger.get("job/c/transform-with-a-longer-key").state == State.IN_FLIGHT

    done = rocky("ledger", "reset", "job/a/extract", "--url", url, "--json", stdin="yes\n")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "key": "job/a/extract",
        "reset": True,
        "state": "succeeded",
        "run_id": "run-1",
    }
    with seeded() as ledger:
        assert ledger.get("job/a/extract") is None
        assert ledger.history("job/a/extract")[-1].kind == EventKind.RESET
        assert ledger.claim("job/a/extract", "run-4").should_run


def test_sweep_deletes_what_retention_no_longer_covers(url: str):
    with open_ledger(url, clock=lambda: LONG_AGO) as ledger:  # long past its 30-day retention
        claim = ledger.claim("old", "run-1")
        ledger.finalize("old", claim.fence, Outcome.SUCCEEDED)
    with open_ledger(url) as ledger:
        claim = ledger.claim("young", "run-2")
        ledger.finalize("young", claim.fence, Outcome.SUCCEEDED)

    first = rocky("ledger", "sweep", "--url", url)
    second = rocky("ledger", "sweep", "--url", url, "--json")

    assert (first.returncode, first.stdout) == (0, "swept 1 entry\n")
    assert json.loads(second.stdout) == {"swept": 0}
    with open_ledger(url) as ledger:
        assert ledger.get("old") is None and ledger.get("young") is not None


def test_stats_human_and_json(url: str, seeded):
    human = rocky("ledger", "stats", "--url", url)
    as_json = json.loads(rocky("ledger", "stats", "--url", url, "--json").stdout)

    fields = dict(line.split(None, 1) for line in human.stdout.splitlines())
    assert fields["url"] == url
    assert (fields["entries"], fields["in_flight"], fields["succeeded"], fields["failed"]) == (
        "3",
        "1",
        "1",
        "1",
    )
    assert as_json["entries"] == 3 and as_json["events"] == 5 and as_json["url"] == url
    # judged by the store's clock (today), long before the 2031 lease and retention ends
    assert (as_json["stale_in_flight"], as_json["expired"]) == (0, 0)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "required"),
        (["ledger"], "required"),
        (["ledger", "frob"], "invalid choice"),
        (["ledger", "show"], "key"),
        (["ledger", "list", "--limit", "0"], "must be 1 or more"),
        (["ledger", "list", "--limit", "many"], "not a whole number"),
        (["ledger", "list", "--state", "done"], "invalid choice"),
        (["ledger", "release", "k", "--fence", "-1"], "must be 1 or more"),
        (["ledger", "stats", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str], says: str):
    one_line_error(rocky(*args), 2, "error", says)


def test_a_missing_ledger_file_is_an_error_and_is_not_created(tmp_path: Path):
    missing = tmp_path / "typo.db"
    one_line_error(rocky("ledger", "list", "--url", f"sqlite:///{missing}"), 1, "no ledger at")
    assert not missing.exists()


def test_ledger_errors_exit_1_without_traceback_or_password(tmp_path: Path):
    one_line_error(
        rocky("ledger", "stats", "--url", "mysql://admin:hunter2@db/x"), 1, "unknown scheme"
    )
    assert "hunter2" not in rocky("ledger", "stats", "--url", "mysql://admin:hunter2@db/x").stderr
    notes = tmp_path / "notes.db"
    notes.write_text("not a database\n" * 100)
    one_line_error(
        rocky("ledger", "list", "--url", f"sqlite:///{notes}"), 1, "not a SQLite database"
    )


def test_a_read_only_ledger_can_be_listed_but_not_released(url: str, seeded, tmp_path: Path):
    path, key = tmp_path / "ledger.db", "job/c/transform-with-a-longer-key"
    path.chmod(0o444)
    try:
        listed = rocky("ledger", "list", "--url", url)
        assert listed.returncode == 0 and "job/b/load" in listed.stdout
        one_line_error(rocky("ledger", "release", key, "--url", url, "--yes"), 1, "read-only")
    finally:
        path.chmod(0o644)
    with seeded() as ledger:
        assert ledger.get(key).state == State.IN_FLIGHT


def test_the_default_url_comes_from_the_environment(tmp_path: Path, url: str, seeded):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(tmp_path / "ledger.db", home / "rocky_ledger.db")

    by_env = rocky("ledger", "stats", "--json", env={"ROCKY_LEDGER_URL": url})
    by_home = rocky("ledger", "stats", "--json", env={"DAGSTER_HOME": str(home)})
    nowhere = rocky("ledger", "stats", cwd=tmp_path)

    assert json.loads(by_env.stdout)["url"] == url
    assert json.loads(by_home.stdout)["url"] == f"sqlite:///{home / 'rocky_ledger.db'}"
    assert json.loads(by_home.stdout)["entries"] == 3
    one_line_error(nowhere, 1, "no ledger at", str(tmp_path / ".rocky" / "ledger.db"))
    assert not (tmp_path / ".rocky").exists()  # looking never creates a ledger


# --- list filters, global options, missing keys, undecodable arguments, check ----------------------


@pytest.fixture
def tagged(url: str) -> Callable[..., Ledger]:
    """Two tagged keys' steps, and a run (`run-b`) whose claim was adopted, plus one skip."""
    now = [T0]
    ledger = open_ledger(url, {"lease_seconds": 60}, clock=lambda: now[0])
    for step in ("extract", "load"):
        claim = ledger.claim(f"nightly/2031-03-14/{step}", "run-a")
        ledger.finalize(f"nightly/2031-03-14/{step}", claim.fence, Outcome.SUCCEEDED)
    ledger.claim("nightly/2031-03-15/extract", "run-b")
    ledger.claim("nightly/2031-03-14/extract", "run-b")  # skipped: already done by run-a
    now[0] += timedelta(minutes=5)
    ledger.claim("nightly/2031-03-15/extract", "run-c")  # adopts run-b's dead claim
    ledger.claim("nightly/2031-03-150/extract", "run-c")
    ledger.close()
    return lambda: open_ledger(url, clock=lambda: now[0])


def listed(*args: str) -> list[str]:
    result = rocky("ledger", "list", *args, "--json")
    assert result.returncode == 0, result.stderr
    return sorted(e["key"] for e in json.loads(result.stdout))


def test_list_by_prefix_shows_one_tagged_keys_steps(url: str, tagged):
    assert listed("--url", url, "--prefix", "nightly/2031-03-14/") == [
        "nightly/2031-03-14/extract",
        "nightly/2031-03-14/load",
    ]
    assert listed("--url", url, "--prefix", "nightly/2031-03-15/") == ["nightly/2031-03-15/extract"]
    assert listed("--url", url, "--prefix", "nightly/2031-03-14/", "--state", "in_flight") == []
    empty = rocky("ledger", "list", "--url", url, "--prefix", "nope/")
    assert (empty.returncode, empty.stdout) == (0, "no entries with prefix 'nope/'\n")


def test_list_by_run_shows_what_the_run_claimed_or_did(url: str, tagged):
    # run-b: its adopted claim and the key it skipped (both name it in their history)
    assert listed("--url", url, "--run", "run-b") == [
        "nightly/2031-03-14/extract",
        "nightly/2031-03-15/extract",
    ]
    assert listed("--url", url, "--run", "run-a") == [
        "nightly/2031-03-14/extract",
        "nightly/2031-03-14/load",
    ]
    assert listed("--url", url, "--run", "run-c", "--prefix", "nightly/2031-03-15/") == [
        "nightly/2031-03-15/extract"
    ]
    assert listed("--url", url, "--run", "run-a", "--state", "in_flight") == []
    assert listed("--url", url, "--run", "nobody") == []


def test_run_id_is_the_holder_and_touched_by_adds_the_history_as_in_the_admin_job(url: str, tagged):
    """The same two filters as `ledger_admin_job`'s run_id / touched_by (one shared module)."""
    assert listed("--url", url, "--run-id", "run-b") == []  # its claims were adopted or skipped
    assert listed("--url", url, "--touched-by", "run-b") == listed("--url", url, "--run", "run-b")
    assert listed("--url", url, "--run-id", "run-c") == [
        "nightly/2031-03-15/extract",
        "nightly/2031-03-150/extract",
    ]
    both = rocky("ledger", "list", "--url", url, "--run-id", "a", "--touched-by", "b")
    one_line_error(both, 2, "not allowed with argument")


def test_force_resets_a_completed_key_and_leaves_one_that_proceeds_anyway(url: str, seeded):
    one_line_error(
        rocky("ledger", "force", "job/c/transform-with-a-longer-key", "--url", url, "--yes"),
        1,
        "is in flight",
        "never overrides a live claim",
        "ledger release KEY",
    )
    failed = rocky("ledger", "force", "job/b/load", "--url", url, "--yes")
    assert (failed.returncode, failed.stdout) == (
        0,
        "left 'job/b/load' unchanged: failed: the next run proceeds anyway\n",
    )

    done = rocky("ledger", "force", "job/a/extract", "--url", url, "--yes", "--reason", "re-ingest")

    assert done.returncode == 0, done.stderr
    assert done.stdout == "forced 'job/a/extract' (forgot the succeeded record of run run-1)\n"
    with seeded() as ledger:
        detail = ledger.history("job/a/extract")[-1].detail
        assert detail.startswith("forced by ") and "with rocky-dagster: re-ingest" in detail
        assert ledger.claim("job/a/extract", "run-4").should_run
        assert ledger.get("job/b/load").state == State.FAILED


@pytest.mark.parametrize(
    "where",
    [
        lambda url: ["--url", url, "--json", "ledger", "list"],
        lambda url: ["ledger", "--url", url, "--json", "list"],
        lambda url: ["ledger", "list", "--url", url, "--json"],
        lambda url: ["--json", "ledger", "list", "--url", url],
        lambda url: ["--url", url, "ledger", "--json", "list", "--limit", "5"],
    ],
    ids=["before-ledger", "before-command", "after-command", "split-1", "split-2"],
)
def test_global_options_go_before_or_after_the_subcommand(url: str, seeded, where):
    result = rocky(*where(url))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 3


def test_show_and_history_answer_a_missing_key_alike(url: str, seeded):
    show = one_line_error(rocky("ledger", "show", "nope", "--url", url), 1)
    history = one_line_error(rocky("ledger", "history", "nope", "--url", url), 1)
    assert (
        show
        == history
        == (
            "rocky-dagster: error: no entry and no history for key 'nope' "
            "(see: rocky-dagster ledger list)"
        )
    )
    with seeded() as ledger:
        ledger.reset("job/a/extract")
    gone = one_line_error(rocky("ledger", "show", "job/a/extract", "--url", url), 1)
    assert "no entry for key 'job/a/extract'" in gone and "history KEY" in gone
    assert rocky("ledger", "history", "job/a/extract", "--url", url).returncode == 0


BAD_TEXT = os.fsdecode(b"job\xff")  # undecodable bytes, as Python hands argv over


@pytest.mark.parametrize(
    "args",
    [
        ["ledger", "show", BAD_TEXT],
        ["ledger", "history", BAD_TEXT],
        ["ledger", "list", "--prefix", BAD_TEXT],
        ["ledger", "list", "--run", BAD_TEXT],
        ["ledger", "list", "--state", BAD_TEXT],
        ["ledger", "release", "job/c/transform-with-a-longer-key", "--yes", "--reason", BAD_TEXT],
        ["ledger", "reset", "job/a/extract", "--yes", "--run-id", BAD_TEXT],
        ["ledger", BAD_TEXT],
        [BAD_TEXT],
    ],
    ids=["show", "history", "prefix", "run", "state", "reason", "run-id", "command", "group"],
)
def test_undecodable_arguments_are_one_line_usage_errors(url: str, seeded, args: list[str]):
    before = rocky("ledger", "list", "--url", url, "--json").stdout

    line = one_line_error(rocky(*args, "--url", url), 2, "not valid text", "undecodable")

    assert "\\xff" in line
    assert rocky("ledger", "list", "--url", url, "--json").stdout == before


def test_an_undecodable_url_is_a_one_line_error(tmp_path: Path):
    bad = "sqlite:///" + os.fsdecode(str(tmp_path).encode() + b"/led\xffger.db")
    one_line_error(rocky("ledger", "stats", "--url", bad), 2, "not valid text")
    env_bad = rocky("ledger", "stats", env={"ROCKY_LEDGER_URL": bad})
    one_line_error(env_bad, 1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["ledger", "show", "job\tstep"], "control character"),
        (["ledger", "list", "--prefix", ""], "prefix must not be empty"),
        (["ledger", "release", "k", "--yes", "--reason", "x" * 1100], "reason"),
    ],
)
def test_values_the_ledger_refuses_are_usage_errors(url: str, seeded, args: list[str], says: str):
    one_line_error(rocky(*args, "--url", url), 2, says)


def test_check_of_a_sound_ledger_exits_0(url: str, seeded):
    human = rocky("ledger", "check", "--url", url)
    as_json = rocky("ledger", "--json", "check", "--url", url)

    assert (human.returncode, human.stdout.split(":")[0]) == (0, "ok"), human.stderr
    assert json.loads(as_json.stdout)["ok"] is True and json.loads(as_json.stdout)["problems"] == []


def test_check_lists_damaged_rows_and_exits_1(url: str, seeded, tmp_path: Path):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.execute("UPDATE rocky_ledger_entries SET result = '{oops' WHERE key = 'job/a/extract'")
    conn.execute("UPDATE rocky_ledger_events SET kind = 'exploded' WHERE key = 'job/b/load'")
    conn.commit()
    conn.close()

    result = rocky("ledger", "check", "--url", url)
    as_json = rocky("ledger", "check", "--url", url, "--json")

    one_line_error(result, 1, "3 problems found")  # the entry, and job/b/load's two events
    assert "job/a/extract" in result.stdout and "job/b/load" in result.stdout
    assert json.loads(as_json.stdout)["ok"] is False and as_json.returncode == 1


def test_check_surfaces_integrity_check_on_damaged_pages(url: str, tmp_path: Path):
    path = tmp_path / "ledger.db"
    with open_ledger(url) as ledger:
        for n in range(300):
            claim = ledger.claim(f"key/{n:04d}", "run-1")
            ledger.finalize(f"key/{n:04d}", claim.fence, Outcome.SUCCEEDED, result={"n": n})
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    for at in range(3 * 4096 + 200, len(data) - 4096, 4096):
        data[at : at + 8] = b"\xde\xad\xbe\xef" * 2  # cell contents, not page headers
    path.write_bytes(bytes(data))

    result = rocky("ledger", "check", "--url", url)

    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert "problem:" in result.stdout or "damaged" in result.stderr


def test_check_on_postgres(postgres_url: str):
    import psycopg

    from rocky_dagster.ledger.postgres import parse_url

    with open_ledger(postgres_url) as ledger:
        claim = ledger.claim("k", "run-1")
        ledger.finalize("k", claim.fence, Outcome.SUCCEEDED, result={"rows": 1})
    ok = rocky("ledger", "check", "--url", postgres_url)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr

    conninfo, schema = parse_url(postgres_url)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".rocky_ledger_entries SET result = %s', ("[1]",))
    damaged = rocky("ledger", "check", "--url", postgres_url)
    one_line_error(damaged, 1, "1 problem found")
    assert "'k'" in damaged.stdout
    assert "s3cret" not in damaged.stdout + damaged.stderr


def test_a_terminal_that_cannot_show_a_key_gets_one_line(url: str):
    with open_ledger(url) as ledger:
        ledger.claim("отчёт/2031", "run-1")
    result = rocky("ledger", "list", "--url", url, env={"PYTHONIOENCODING": "ascii"})
    one_line_error(result, 1, "PYTHONIOENCODING=utf-8")


def test_json_errors_are_json_on_stdout_too(url: str, seeded):
    seeded()
    missing = rocky("ledger", "show", "no/such/key", "--url", url, "--json")
    assert missing.returncode == 1
    error = json.loads(missing.stdout)
    assert error["exit_code"] == 1 and "no/such/key" in error["error"]
    assert missing.stderr.startswith("rocky-dagster: error:")  # the one line stays

    usage = rocky("ledger", "list", "--limit", "0", "--json", "--url", url)
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["exit_code"] == 2
    assert "--json" in rocky("ledger", "--help").stdout
