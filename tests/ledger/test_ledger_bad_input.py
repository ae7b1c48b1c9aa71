"""Bad input: every mistake is a named error that says what to fix, and changes nothing.

The first half runs on every backend (`ledger_url`); the second half is about SQLite
files and URLs. "Changes nothing" is checked on get()/history()/stats() (or the raw file).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ledger_helpers import CONFIG, FakeClock, MakeLedger, snapshot

from rocky_dagster.ledger import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidResultError,
    Ledger,
    LedgerConfig,
    LedgerConfigError,
    LedgerError,
    LedgerSchemaError,
    LedgerUnavailableError,
    Outcome,
    State,
    open_ledger,
    redact_url,
)

BAD_KEYS = {
    "empty": ("", "must not be empty"),
    "too-long": ("k" * 513, "the limit is 512"),
    "newline": ("job\nstep", "control character"),
    "nul": ("job\x00", "control character"),
    "tab": ("\tjob", "control character"),
    "delete": ("job\x7f", "control character"),
    "c1-control": ("job\x85", "control character"),
    "lone-surrogate": ("job\ud800", "lone surrogate"),
    "not-a-string": (42, "must be a string"),
    "bytes": (b"job", "must be a string"),
}


@pytest.fixture
def held(ledger: Ledger) -> tuple[Ledger, int]:
    """A ledger holding one live claim on `k`, whose state the bad calls must not touch."""
    claim = ledger.claim("k", "run-1", pipeline="p", fingerprint="fp")
    assert claim.fence is not None
    return ledger, claim.fence


def rejected(
    ledger: Ledger, error: type[LedgerError], call: Callable[[], Any], *says: str
) -> LedgerError:
    """Run a bad call: it raises `error` saying `says`, and `k` and the totals stay as they were."""
    before = snapshot(ledger, "k")
    with pytest.raises(error) as raised:
        call()
    for phrase in says:
        assert phrase in str(raised.value)
    assert snapshot(ledger, "k") == before
    return raised.value


# --- keys, labels, fences, outcomes, results (every backend) ---------------------------------------


@pytest.mark.parametrize(("bad", "says"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_keys_are_refused_by_every_call(held: tuple[Ledger, int], bad: Any, says: str):
    ledger, fence = held
    for call in (
        lambda: ledger.claim(bad, "run-2"),
        lambda: ledger.finalize(bad, fence, Outcome.SUCCEEDED),
        lambda: ledger.heartbeat(bad, fence),
        lambda: ledger.release(bad),
        lambda: ledger.reset(bad),
    ):
        error = rejected(ledger, InvalidKeyError, call, says, "key")
        assert isinstance(error, InvalidArgumentError) and isinstance(error, ValueError)


@pytest.mark.parametrize("field", ["run_id", "pipeline", "fingerprint"])
@pytest.mark.parametrize(("bad", "says"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_run_ids_and_labels_are_refused(
    held: tuple[Ledger, int], field: str, bad: Any, says: str
):
    ledger, _ = held
    args: dict[str, Any] = {"run_id": "run-2", field: bad}
    rejected(ledger, InvalidKeyError, lambda: ledger.claim("k", **args), says, field)
    rejected(ledger, InvalidKeyError, lambda: ledger.claim("fresh", **args), says, field)
    assert ledger.get("fresh") is None


def test_a_control_character_is_located_in_the_message(held: tuple[Ledger, int]):
    ledger, _ = held
    rejected(ledger, InvalidKeyError, lambda: ledger.claim("abc\rdef", "r"), "position 3", "'\\r'")


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "3", None], ids=repr)
def test_bad_fences_are_refused(held: tuple[Ledger, int], bad: Any):
    ledger, _ = held
    for call in (
        lambda: ledger.finalize("k", bad, Outcome.SUCCEEDED),
        lambda: ledger.heartbeat("k", bad),
    ):
        rejected(ledger, InvalidArgumentError, call, "fence must be the positive integer")
    if bad is not None:  # release(fence=None) means "any fence"
        rejected(ledger, InvalidArgumentError, lambda: ledger.release("k", fence=bad), "fence")


@pytest.mark.parametrize("bad", ["done", "SUCCESS", "", None, 1])
def test_bad_outcomes_are_refused(held: tuple[Ledger, int], bad: Any):
    ledger, fence = held
    rejected(
        ledger, InvalidArgumentError, lambda: ledger.finalize("k", fence, bad), "outcome must be"
    )


BAD_RESULTS = {
    "set": ({"tables": {"a", "b"}}, "not JSON-serializable"),
    "object": ({"when": object()}, "not JSON-serializable"),
    "nan": ({"ratio": float("nan")}, "not JSON-serializable"),
    "infinity": ({"ratio": float("inf")}, "not JSON-serializable"),
    "bytes": ({"blob": b"\x00"}, "not JSON-serializable"),
    "int-key": ({"by_year": {2024: 1}}, "non-string dict key 2024"),
    "none-key": ({"rows": [{None: 1}]}, "non-string dict key None"),
    "list": ([1, 2], "must be a dict"),
    "text": ("done", "must be a dict"),
    "huge": ({"rows": "x" * 70_000}, "the limit is 65536"),
}


@pytest.mark.parametrize(("bad", "says"), BAD_RESULTS.values(), ids=BAD_RESULTS.keys())
def test_results_that_would_not_come_back_unchanged_are_refused(
    held: tuple[Ledger, int], bad: Any, says: str
):
    ledger, fence = held

    rejected(
        ledger,
        InvalidResultError,
        lambda: ledger.finalize("k", fence, Outcome.SUCCEEDED, result=bad),
        says,
    )

    assert ledger.get("k").state == State.IN_FLIGHT  # the claim can still be finalized properly
    assert ledger.finalize("k", fence, Outcome.SUCCEEDED, result={"ok": 1}).applied


def test_a_clock_without_a_timezone_is_refused(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(CONFIG, clock)
    ledger.claim("k", "run-1")
    before = snapshot(ledger, "k")
    naive = make_ledger(CONFIG, lambda: clock.now.replace(tzinfo=None))

    for call in (lambda: naive.claim("k", "run-2"), lambda: naive.claim("new", "run-2")):
        with pytest.raises(LedgerConfigError, match="timezone-aware"):
            call()

    assert snapshot(ledger, "k") == before
    assert ledger.get("new") is None


# --- configuration (every backend) ----------------------------------------------------------------

BAD_CONFIGS = {
    "zero-retention": ({"retention_days": 0}, "retention_days"),
    "negative-retention": ({"retention_days": -1}, "retention_days"),
    "zero-ttl": ({"in_flight_ttl_hours": 0}, "in_flight_ttl_hours"),
    "negative-ttl": ({"in_flight_ttl_hours": -0.5}, "in_flight_ttl_hours"),
    "zero-lease": ({"lease_seconds": 0}, "lease_seconds"),
    "negative-lease": ({"lease_seconds": -30}, "lease_seconds"),
    "text-lease": ({"lease_seconds": "soon"}, "lease_seconds"),
    "unknown-field": ({"retention": 5}, "retention: unknown field"),
    "typo": ({"lease_second": 5}, "lease_second: unknown field"),
    "unknown-dedup": ({"dedup_on": "always"}, "dedup_on"),
    "unknown-mismatch": ({"on_fingerprint_mismatch": "warn"}, "on_fingerprint_mismatch"),
}


@pytest.mark.parametrize(("bad", "field"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_is_a_config_error_naming_the_field(
    make_ledger: MakeLedger, clock: FakeClock, bad: dict[str, Any], field: str
):
    ledger = make_ledger(CONFIG, clock)
    ledger.claim("k", "run-1")

    error = rejected(ledger, LedgerConfigError, lambda: make_ledger(bad, clock), field)

    assert "got" in str(error)  # the value given is shown
    with pytest.raises(LedgerConfigError, match=field):
        LedgerConfig.parse(bad)


def test_unknown_fields_list_the_known_ones():
    with pytest.raises(LedgerConfigError) as raised:
        LedgerConfig.parse({"lease": 10})
    for known in LedgerConfig.model_fields:
        assert known in str(raised.value)


def test_several_bad_fields_are_all_named():
    with pytest.raises(LedgerConfigError) as raised:
        LedgerConfig.parse({"retention_days": 0, "dedup_on": "never", "extra": 1})
    assert all(f in str(raised.value) for f in ("retention_days", "dedup_on", "extra"))


# --- URLs and files (SQLite and the URL parser) ----------------------------------------------------


def ledger_with_history(path: Path) -> Ledger:
    ledger = open_ledger(f"sqlite:///{path}")
    claim = ledger.claim("k", "run-1")
    ledger.finalize("k", claim.fence, Outcome.SUCCEEDED)
    ledger.claim("live", "run-2")
    return ledger


def file_state(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://admin:hunter2@db.internal:3306/ledger", "unknown scheme 'mysql'"),
        ("redis://:hunter2@cache:6379/0", "unknown scheme 'redis'"),
        ("", "empty ledger url"),
        ("   ", "empty ledger url"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "in-memory ledger cannot be shared"),
    ],
)
def test_unusable_urls_are_config_errors_without_secrets(url: str, says: str):
    with pytest.raises(LedgerConfigError) as raised:
        open_ledger(url)
    message = str(raised.value)
    assert says in message
    assert "hunter2" not in message
    assert "sqlite:///" in message  # and how to write one that works


def test_a_directory_that_does_not_exist_is_named(tmp_path: Path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(LedgerConfigError) as raised:
        open_ledger(f"sqlite:///{missing}/ledger.db")
    assert str(missing) in str(raised.value) and "create it" in str(raised.value)
    assert not (tmp_path / "no").exists()


def test_a_directory_is_not_a_ledger_file(tmp_path: Path):
    with pytest.raises(LedgerConfigError, match="is a directory"):
        open_ledger(f"sqlite:///{tmp_path}")


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 200)
    before = file_state(path)

    with pytest.raises(LedgerConfigError) as raised:
        open_ledger(f"sqlite:///{path}")

    assert "not a SQLite database" in str(raised.value) and str(path) in str(raised.value)
    assert file_state(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_another_applications_database_is_refused_untouched(tmp_path: Path):
    path = tmp_path / "dagster.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT)")
        conn.execute("INSERT INTO runs VALUES ('r1', 'SUCCESS')")
    conn.close()

    with pytest.raises(LedgerSchemaError) as raised:
        open_ledger(f"sqlite:///{path}")

    assert "tables: runs" in str(raised.value) and "file of its own" in str(raised.value)
    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == [("runs",)]
        assert conn.execute("SELECT * FROM runs").fetchall() == [("r1", "SUCCESS")]
    conn.close()


@pytest.fixture
def read_only_ledger(tmp_path: Path):
    """A ledger file with history, then marked read-only (mode 0444; root could still write)."""
    path = tmp_path / "ledger.db"
    ledger_with_history(path).close()
    path.chmod(0o444)
    yield path
    path.chmod(0o644)


def test_a_read_only_ledger_can_be_read_but_refuses_every_write(read_only_ledger: Path):
    ledger = open_ledger(f"sqlite:///{read_only_ledger}")
    before = snapshot(ledger, "k"), snapshot(ledger, "live")
    live_fence = ledger.get("live").fence

    for call in (
        lambda: ledger.claim("new", "run-3"),
        lambda: ledger.claim("k", "run-3"),
        lambda: ledger.finalize("live", live_fence, Outcome.SUCCEEDED),
        lambda: ledger.heartbeat("live", live_fence),
        lambda: ledger.release("live"),
        lambda: ledger.reset("k"),
        ledger.sweep,
    ):
        with pytest.raises(LedgerUnavailableError) as raised:
            call()
        assert "read-only" in str(raised.value) and "chmod u+w" in str(raised.value)
        assert "no work was done" in str(raised.value)

    assert (snapshot(ledger, "k"), snapshot(ledger, "live")) == before
    ledger.close()
    read_only_ledger.chmod(0o644)
    with open_ledger(f"sqlite:///{read_only_ledger}") as reopened:
        assert (snapshot(reopened, "k"), snapshot(reopened, "live")) == before


def test_a_read_only_empty_file_is_refused_before_anything_is_created(tmp_path: Path):
    path = tmp_path / "ledger.db"
    path.touch(mode=0o444)
    path.chmod(0o444)
    assert not os.stat(path).st_mode & stat.S_IWUSR

    with pytest.raises(LedgerUnavailableError, match="read-only"):
        open_ledger(f"sqlite:///{path}")

    assert path.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db"]


def test_a_ledger_written_by_a_newer_version_is_refused_untouched(tmp_path: Path):
    path = tmp_path / "ledger.db"
    ledger_with_history(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rocky_ledger_meta SET value = 99 WHERE name = 'schema_version'")
    conn.close()
    before = file_state(path)

    with pytest.raises(LedgerSchemaError) as raised:
        open_ledger(f"sqlite:///{path}")

    assert "schema version 99" in str(raised.value) and "upgrade rocky_dagster" in str(raised.value)
    assert isinstance(raised.value, LedgerUnavailableError)  # callers fail closed
    assert file_state(path) == before


def test_a_plain_path_and_a_relative_url_both_open_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    with open_ledger("ledger.db") as by_path:
        by_path.claim("k", "run-1")
    with open_ledger("sqlite:///ledger.db") as by_url:
        assert by_url.get("k").run_id == "run-1"
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as absolute:
        assert absolute.get("k").run_id == "run-1"


# --- passwords ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app:hunter2@db:5432/ledger", "postgresql://app:***@db:5432/ledger"),
        ("postgresql://app:hun@ter2@db/ledger", "postgresql://app:***@db/ledger"),
        ("postgresql://app:hun/ter2@db/ledger", "postgresql://app:***@db/ledger"),
        ("postgresql://app:hun?ter2@db/ledger", "postgresql://app:***@db/ledger"),
        ("postgresql+psycopg://app:hunter2@db/x", "postgresql+psycopg://app:***@db/x"),
        ("postgresql://:hunter2@db/x", "postgresql://:***@db/x"),
        ("postgresql://db/x?user=app&password=hunter2", "postgresql://db/x?user=app&password=***"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("sqlite:////srv/a:b@c/ledger.db", "sqlite:////srv/a:b@c/ledger.db"),
    ],
)
def test_redact_url_hides_passwords_however_they_are_written(url: str, redacted: str):
    assert redact_url(url) == redacted


def test_an_unreachable_database_error_does_not_show_its_password():
    pytest.importorskip("psycopg")
    with pytest.raises(LedgerError) as raised:
        open_ledger("postgresql://app:hunter2@127.0.0.1:1/ledger")
    assert "hunter2" not in str(raised.value) and "hunter2" not in repr(raised.value)


# --- hardening: durations, reads, reasons, fences, depth, urls, filters (every backend) --------------

BAD_DURATIONS = {
    "retention-overflows": ({"retention_days": 3e6}, "retention_days"),
    "retention-inf": ({"retention_days": float("inf")}, "retention_days"),
    "retention-nan": ({"retention_days": float("nan")}, "retention_days"),
    "ttl-inf": ({"in_flight_ttl_hours": float("inf")}, "in_flight_ttl_hours"),
    "ttl-overflows": ({"in_flight_ttl_hours": 1e9}, "in_flight_ttl_hours"),
    "lease-overflows": ({"lease_seconds": 1e12}, "lease_seconds"),
    "lease-inf": ({"lease_seconds": float("inf")}, "lease_seconds"),
    "lease-below-a-microsecond": ({"lease_seconds": 1e-7}, "lease_seconds"),
    "lease-half-a-microsecond": ({"lease_seconds": 6e-7}, "lease_seconds"),
    "ttl-below-a-microsecond": ({"in_flight_ttl_hours": 1e-12}, "in_flight_ttl_hours"),
    "retention-below-a-microsecond": ({"retention_days": 1e-12}, "retention_days"),
}


@pytest.mark.parametrize(("bad", "field"), BAD_DURATIONS.values(), ids=BAD_DURATIONS.keys())
def test_durations_a_datetime_cannot_hold_are_refused_at_open(
    make_ledger: MakeLedger, clock: FakeClock, bad: dict[str, Any], field: str
):
    ledger = make_ledger(CONFIG, clock)
    ledger.claim("k", "run-1")

    rejected(ledger, LedgerConfigError, lambda: make_ledger(bad, clock), field)


def test_the_longest_and_shortest_durations_allowed_work_end_to_end(
    make_ledger: MakeLedger, clock: FakeClock
):
    longest = make_ledger(
        {"retention_days": 36_525, "in_flight_ttl_hours": 876_600, "lease_seconds": 3_155_760_000},
        clock,
    )
    claim = longest.claim("long", "run-1")
    assert longest.heartbeat("long", claim.fence)
    assert longest.finalize("long", claim.fence, Outcome.SUCCEEDED).applied
    assert longest.get("long").expires_at == clock.now + timedelta(days=36_525)

    shortest = make_ledger({"lease_seconds": 1e-6}, clock)
    claim = shortest.claim("short", "run-1")
    assert claim.lease_expires_at == clock.now + timedelta(microseconds=1)


READ_KEYS = {
    "lone-surrogate": "job\ud800",
    "escaped-undecodable-byte": b"job\xff".decode("utf-8", "surrogateescape"),
    "bytes": b"job\xff",
    "not-a-string": 7,
}


@pytest.mark.parametrize("bad", READ_KEYS.values(), ids=READ_KEYS.keys())
def test_read_calls_refuse_keys_no_store_can_hold(held: tuple[Ledger, int], bad: Any):
    ledger, _ = held
    for call in (
        lambda: ledger.get(bad),
        lambda: ledger.history(bad),
        lambda: ledger.history(bad, limit=5),
        lambda: ledger.entries(run_id=bad),
        lambda: ledger.entries(prefix=bad),
    ):
        rejected(ledger, InvalidKeyError, call)


@pytest.mark.parametrize("bad", ["done", "IN_FLIGHT", "", 3])
def test_an_unknown_state_filter_is_an_argument_error(held: tuple[Ledger, int], bad: Any):
    ledger, _ = held
    rejected(ledger, InvalidArgumentError, lambda: ledger.entries(bad), "state must be one of")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
def test_a_bad_limit_is_an_argument_error(held: tuple[Ledger, int], bad: Any):
    ledger, _ = held
    rejected(ledger, InvalidArgumentError, lambda: ledger.entries(limit=bad), "limit")
    rejected(ledger, InvalidArgumentError, lambda: ledger.history("k", limit=bad), "limit")


def test_entries_filter_by_prefix(ledger: Ledger):
    for key in ("base/a/extract", "base/a/load", "base/ab/extract", "other/base/a/x", "base%/a"):
        ledger.claim(key, "run-1")

    assert sorted(e.key for e in ledger.entries(prefix="base/a/")) == [
        "base/a/extract",
        "base/a/load",
    ]
    assert [e.key for e in ledger.entries(prefix="base%")] == ["base%/a"]  # no wildcards
    assert ledger.entries(prefix="base/a/", state="succeeded") == []


BAD_REASONS = {
    "bytes": (b"because", "must be a string"),
    "undecodable-bytes": (b"\xff\xfe", "must be a string"),
    "not-text": (42, "must be a string"),
    "empty": ("", "must not be empty"),
    "blank": ("   ", "must not be empty"),
    "newline": ("line one\nline two", "control character"),
    "nul": ("why\x00", "control character"),
    "lone-surrogate": ("why\udcff", "lone surrogate"),
    "too-long": ("x" * 1025, "the limit is 1024"),
}


@pytest.mark.parametrize(("bad", "says"), BAD_REASONS.values(), ids=BAD_REASONS.keys())
def test_operator_reasons_are_printable_bounded_text(held: tuple[Ledger, int], bad: Any, says: str):
    ledger, fence = held
    rejected(ledger, InvalidArgumentError, lambda: ledger.release("k", reason=bad), "reason", says)
    rejected(
        ledger,
        InvalidArgumentError,
        lambda: ledger.finalize("k", fence, Outcome.FAILED, reason=bad),
        "reason",
        says,
    )
    assert ledger.finalize("k", fence, Outcome.SUCCEEDED).applied
    rejected(ledger, InvalidArgumentError, lambda: ledger.reset("k", reason=bad), "reason", says)
    assert [e.kind.value for e in ledger.history("k")] == ["claimed", "succeeded"]  # readable


def test_the_longest_reason_is_kept_whole(held: tuple[Ledger, int]):
    ledger, _ = held
    assert ledger.release("k", reason="r" * 1024)
    assert ledger.history("k")[-1].detail == "r" * 1024


@pytest.mark.parametrize("bad", [2**63, 2**64 + 5, 10**30], ids=["2**63", "2**64+5", "10**30"])
def test_a_fence_beyond_the_stores_integers_is_an_argument_error(
    held: tuple[Ledger, int], bad: int
):
    ledger, _ = held
    for call in (
        lambda: ledger.finalize("k", bad, Outcome.SUCCEEDED),
        lambda: ledger.finalize("absent", bad, Outcome.SUCCEEDED),
        lambda: ledger.heartbeat("k", bad),
        lambda: ledger.release("k", fence=bad),
    ):
        rejected(ledger, InvalidArgumentError, call, "fence", "largest fence")


def test_the_largest_fence_is_a_stale_fence_not_an_error(held: tuple[Ledger, int]):
    ledger, _ = held
    before = ledger.get("k")
    done = ledger.finalize("k", 2**63 - 1, Outcome.SUCCEEDED)
    assert (done.applied, done.reason.value) == (False, "stale_fence")
    assert ledger.heartbeat("k", 2**63 - 1) is False
    assert ledger.get("k") == before


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_a_result_nested_past_the_limit_is_refused(held: tuple[Ledger, int], depth: int):
    ledger, fence = held
    rejected(
        ledger,
        InvalidResultError,
        lambda: ledger.finalize("k", fence, Outcome.SUCCEEDED, result=_nested(depth)),
        "deeper than 32",
    )
    assert ledger.finalize("k", fence, Outcome.SUCCEEDED, result=_nested(32)).applied
    assert ledger.get("k").result == _nested(32)


def test_a_result_that_contains_itself_is_refused(held: tuple[Ledger, int]):
    ledger, fence = held
    loop: dict[str, Any] = {}
    loop["self"] = loop
    rejected(
        ledger,
        InvalidResultError,
        lambda: ledger.finalize("k", fence, Outcome.SUCCEEDED, result=loop),
    )


@pytest.mark.parametrize(
    "bad",
    [None, 5, 3.5, b"sqlite:///ledger.db", ["sqlite:///x.db"], object()],
    ids=["none", "int", "float", "bytes", "list", "object"],
)
def test_a_url_that_is_not_text_is_a_config_error(bad: Any):
    with pytest.raises(LedgerConfigError, match="url must be a string"):
        open_ledger(bad)


@pytest.mark.parametrize(
    "bad", ["sqlite:///led\x00ger.db", "sqlite:///led\udcffger.db", "led\ud800.db"]
)
def test_a_url_with_nul_or_undecodable_bytes_is_a_config_error(tmp_path: Path, bad: str):
    with pytest.raises(LedgerConfigError, match="url contains"):
        open_ledger(bad)
    assert list(tmp_path.iterdir()) == []


def test_a_config_built_directly_or_copied_is_checked_too(
    make_ledger: MakeLedger, clock: FakeClock
):
    with pytest.raises(LedgerConfigError, match="retention_days"):
        LedgerConfig(retention_days=3e6)
    sneaky = CONFIG.model_copy(update={"lease_seconds": 1e12})
    with pytest.raises(LedgerConfigError, match="lease_seconds"):
        make_ledger(sneaky, clock)
    unchecked = LedgerConfig.model_construct(retention_days=float("inf"))
    with pytest.raises(LedgerConfigError, match="retention_days"):
        make_ledger(unchecked, clock)


@pytest.mark.parametrize("bad", ["yes", 1, None, [True]])
def test_force_must_be_a_bool(held: tuple[Ledger, int], bad: Any):
    ledger, _ = held
    rejected(ledger, InvalidArgumentError, lambda: ledger.claim("k", "run-2", force=bad), "force")
    rejected(ledger, InvalidArgumentError, lambda: ledger.claim("new", "run-2", force=bad), "force")
    assert ledger.get("new") is None


@pytest.mark.parametrize("bad", [5, "now", object()], ids=["int", "str", "object"])
def test_a_clock_that_is_not_a_function_is_refused_at_open(ledger_url: str, bad: Any):
    with pytest.raises(LedgerConfigError, match="clock must be a function"):
        open_ledger(ledger_url, clock=bad)


def test_a_clock_that_returns_no_datetime_is_refused(make_ledger: MakeLedger, clock: FakeClock):
    ledger = make_ledger(CONFIG, clock)
    ledger.claim("k", "run-1")
    before = snapshot(ledger, "k")
    broken = make_ledger(CONFIG, lambda: "2031-03-14")
    with pytest.raises(LedgerConfigError, match="clock must return a datetime"):
        broken.claim("k", "run-2")
    assert snapshot(ledger, "k") == before
