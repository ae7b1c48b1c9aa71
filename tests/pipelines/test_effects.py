"""Exactly-once effects: each pipeline commits its writes with an effect marker for the claim's
key generation, on real SQLite files, with real subprocesses for zombie/adopter interleavings."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from effect_worker import Holder
from pipeline_helpers import dump, execute, query

from rocky_dagster.effects import EFFECTS, EffectClaim, exactly_once, read_marker
from rocky_dagster.pipelines import (
    ClaimRefusedError,
    FenceLostError,
    LoadError,
    PipelineConfig,
    PipelineError,
    QualityChecksFailed,
    pipeline_from_dict,
)

WORKER = Path(__file__).with_name("effect_worker.py")


@dataclass(frozen=True)
class Setup:
    """A pipeline config whose run writes, and a change of its input after which running it
    again would write something different (so 'applied nothing' is observable)."""

    config: dict[str, Any]
    change_input: Callable[[], None]


def _replication(tmp: Path, wh: str) -> Setup:
    source = str(tmp / "source.db")
    execute(
        source, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');"
    )
    return Setup(
        {"type": "replication", "warehouse": wh, "source": source},
        lambda: execute(source, "INSERT INTO t VALUES (2, 'b');"),
    )


def _transformation(tmp: Path, wh: str) -> Setup:
    execute(wh, "CREATE TABLE raw (x INTEGER); INSERT INTO raw VALUES (1);")
    models = tmp / "models"
    models.mkdir()
    (models / "m.sql").write_text("SELECT x * 10 AS y FROM raw")
    return Setup(
        {"type": "transformation", "warehouse": wh, "models_dir": str(models)},
        lambda: execute(wh, "INSERT INTO raw VALUES (2);"),
    )


def _snapshot(tmp: Path, wh: str) -> Setup:
    execute(
        wh, "CREATE TABLE src (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO src VALUES (1, 'a');"
    )
    config = {
        "type": "snapshot",
        "warehouse": wh,
        "source_table": "src",
        "target_table": "snap",
        "unique_key": "id",
        "check_columns": "all",
    }
    return Setup(config, lambda: execute(wh, "UPDATE src SET v = 'b';"))


def _load(tmp: Path, wh: str) -> Setup:
    inbox = tmp / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text("id,v\n1,a\n2,b\n")
    config = {"type": "load", "warehouse": wh, "directory": str(inbox), "table": "t"}
    return Setup({**config, "reload": True}, lambda: None)  # reload: every run appends again


def _quality(tmp: Path, wh: str) -> Setup:
    execute(wh, "CREATE TABLE t (id INTEGER); INSERT INTO t VALUES (1);")
    config = {
        "type": "quality",
        "warehouse": wh,
        "checks": [{"kind": "not_null", "table": "t", "column": "id"}],
    }
    return Setup(config, lambda: execute(wh, "INSERT INTO t VALUES (NULL);"))


SETUPS = {
    "replication": _replication,
    "transformation": _transformation,
    "snapshot": _snapshot,
    "load": _load,
    "quality": _quality,
}


def prepare(kind: str, tmp: Path) -> tuple[str, PipelineConfig, Setup]:
    warehouse = str(tmp / "warehouse.db")
    setup = SETUPS[kind](tmp, warehouse)
    return warehouse, pipeline_from_dict(setup.config), setup


def claim(generation: int, fence: int, run_id: str = "run", key: str = "nightly") -> Holder:
    return Holder(key=key, generation=generation, fence=fence, run_id=run_id)


def test_the_worker_claim_satisfies_the_protocol() -> None:
    assert isinstance(claim(1, 1), EffectClaim)


@pytest.mark.parametrize("kind", sorted(SETUPS))
def test_the_first_holder_commits_its_writes_with_the_marker(tmp_path: Path, kind: str) -> None:
    warehouse, pipeline, _ = prepare(kind, tmp_path)
    result = pipeline.run(claim=claim(3, 3, "run-1"))
    assert not result.already_applied
    with closing(sqlite3.connect(warehouse)) as conn:
        marker = read_marker(conn, "nightly")
    assert marker is not None
    assert (marker.generation, marker.fence, marker.run_id, marker.pipeline_type) == (
        3,
        3,
        "run-1",
        kind,
    )
    assert json.loads(marker.summary_json) == json.loads(json.dumps(result.summary()))


@pytest.mark.parametrize("kind", sorted(SETUPS))
def test_an_adopter_of_a_committed_generation_applies_nothing_and_gets_the_recorded_result(
    tmp_path: Path, kind: str
) -> None:
    warehouse, pipeline, setup = prepare(kind, tmp_path)
    zombie = pipeline.run(claim=claim(3, 3, "zombie"))  # committed, then lost its lease
    setup.change_input()
    before = dump(warehouse)
    adopter = pipeline.run(claim=claim(3, 4, "adopter"))
    assert adopter.already_applied
    assert adopter.summary() == zombie.summary()
    assert dump(warehouse) == before
    # the same holder running again (an op retry within its claim) applies nothing either
    assert pipeline.run(claim=claim(3, 3, "zombie")).already_applied
    assert dump(warehouse) == before


@pytest.mark.parametrize("kind", sorted(SETUPS))
def test_a_zombie_after_the_adopter_committed_is_fenced_and_writes_nothing(
    tmp_path: Path, kind: str
) -> None:
    warehouse, pipeline, setup = prepare(kind, tmp_path)
    pipeline.run(claim=claim(3, 4, "adopter"))
    setup.change_input()
    before = dump(warehouse)
    with pytest.raises(FenceLostError) as caught:
        pipeline.run(claim=claim(3, 3, "zombie"))
    assert caught.value.pipeline == kind and "fence 4" in str(caught.value)
    assert dump(warehouse) == before


@pytest.mark.parametrize("kind", sorted(SETUPS))
def test_a_new_generation_replaces_the_marker_and_an_older_one_is_fenced(
    tmp_path: Path, kind: str
) -> None:
    warehouse, pipeline, setup = prepare(kind, tmp_path)
    pipeline.run(claim=claim(3, 3))
    if kind == "quality":  # its input change would fail the checks; a new generation re-runs
        execute(warehouse, "INSERT INTO t VALUES (2);")
    else:
        setup.change_input()
    second = pipeline.run(claim=claim(5, 5, "next"))
    assert not second.already_applied
    with closing(sqlite3.connect(warehouse)) as conn:
        marker = read_marker(conn, "nightly")
    assert marker is not None and (marker.generation, marker.fence) == (5, 5)
    assert query(warehouse, f"SELECT count(*) FROM {EFFECTS}") == [(1,)]
    before = dump(warehouse)
    with pytest.raises(FenceLostError, match="older generation 3"):
        pipeline.run(claim=claim(3, 4, "late"))
    assert dump(warehouse) == before


@pytest.mark.parametrize(
    ("holder", "message"),
    [
        (Holder("k", 1, 1, "r", should_run=False), "must not run"),
        (Holder("k", None, 1, "r"), "generation must be an integer"),
        (Holder("k", 1, None, "r"), "fence must be an integer"),
        (Holder("k", 1, True, "r"), "fence must be an integer"),  # type: ignore[arg-type]
        (Holder("k", 2, 1, "r"), "generation 2 is later than fence 1"),
        (Holder("", 1, 1, "r"), "key must be a non-empty string"),
        (Holder("k", 1, 2**63, "r"), "out of range"),
    ],
)
@pytest.mark.parametrize("kind", sorted(SETUPS))
def test_a_claim_that_may_not_run_is_refused_and_nothing_changes(
    tmp_path: Path, kind: str, holder: Holder, message: str
) -> None:
    warehouse, pipeline, _ = prepare(kind, tmp_path)
    before = dump(warehouse)
    with pytest.raises(ClaimRefusedError, match=message) as caught:
        pipeline.run(claim=holder)
    assert caught.value.pipeline == kind
    assert dump(warehouse) == before


def test_a_failed_run_records_no_marker_and_its_holder_may_run_again(tmp_path: Path) -> None:
    warehouse, pipeline, _ = prepare("load", tmp_path)
    (tmp_path / "inbox" / "b.csv").write_text("id,v\n3\n")
    with pytest.raises(LoadError):
        pipeline.run(claim=claim(1, 1))
    assert dump(warehouse) == {}
    (tmp_path / "inbox" / "b.csv").write_text("id,v\n3,c\n")
    assert not pipeline.run(claim=claim(1, 1)).already_applied
    assert query(warehouse, "SELECT count(*) FROM t") == [(3,)]


def test_failing_quality_checks_record_no_marker(tmp_path: Path) -> None:
    warehouse, pipeline, setup = prepare("quality", tmp_path)
    setup.change_input()
    before = dump(warehouse)
    with pytest.raises(QualityChecksFailed):
        pipeline.run(claim=claim(1, 1))
    assert dump(warehouse) == before


def test_keys_are_independent(tmp_path: Path) -> None:
    warehouse, pipeline, _ = prepare("load", tmp_path)
    pipeline.run(claim=claim(1, 1, key="a"))
    assert not pipeline.run(claim=claim(1, 1, key="b")).already_applied
    assert query(warehouse, "SELECT count(*) FROM t") == [(4,)]


# --- real processes: the zombie and the adopter are separate interpreters -----------------


def run_worker(config: dict[str, Any], holder: Holder) -> dict[str, Any]:
    spec = {"config": config, "claim": holder.__dict__}
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_worker(
    config: dict[str, Any], holder: Holder, barrier: Path | None = None
) -> subprocess.Popen[str]:
    spec = {"config": config, "claim": holder.__dict__, "barrier": barrier and str(barrier)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )


def wait_for_file(path: Path, *workers: subprocess.Popen[str], timeout: float = 120) -> None:
    """Poll (bounded) until a worker touches `path`; fail at once if a worker exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for worker in workers:
            assert worker.poll() is None, f"a worker exited before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.005)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def big_load(tmp: Path) -> tuple[str, dict[str, Any]]:
    """A load that is not idempotent by itself (reload: each run appends every row again)."""
    warehouse = str(tmp / "warehouse.db")
    inbox = tmp / "inbox"
    inbox.mkdir()
    rows = "".join(f"{i},v{i}\n" for i in range(200_000))
    (inbox / "a.csv").write_text("id,v\n" + rows)
    config = {
        "type": "load",
        "warehouse": warehouse,
        "directory": str(inbox),
        "table": "t",
        "reload": True,
        "batch_size": 1000,
    }
    return warehouse, config


def test_processes_zombie_commits_first_then_the_adopter_applies_nothing(tmp_path: Path) -> None:
    warehouse, config = big_load(tmp_path)
    zombie = run_worker(config, claim(7, 7, "zombie"))
    adopter = run_worker(config, claim(7, 8, "adopter"))
    assert zombie["ok"] and not zombie["already_applied"]
    assert adopter == {"ok": True, "already_applied": True, "summary": zombie["summary"]}
    assert query(warehouse, "SELECT count(*) FROM t") == [(200_000,)]


def test_processes_adopter_commits_first_then_the_zombie_is_fenced(tmp_path: Path) -> None:
    warehouse, config = big_load(tmp_path)
    adopter = run_worker(config, claim(7, 8, "adopter"))
    before = dump(warehouse)
    zombie = run_worker(config, claim(7, 7, "zombie"))
    assert adopter["ok"] and not adopter["already_applied"]
    assert (zombie["ok"], zombie["error"]) == (False, "FenceLostError")
    assert dump(warehouse) == before


def _holds_write_lock(warehouse: str) -> bool:
    if not Path(warehouse).exists():
        return False
    with closing(sqlite3.connect(warehouse, timeout=0, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False


def test_processes_adopter_starting_while_the_zombie_writes_waits_and_applies_nothing(
    tmp_path: Path,
) -> None:
    """The zombie holds its write transaction open (rows written, marker not yet committed)
    until the adopter has entered its own: the warehouse's write lock orders them, so the
    adopter finds the zombie's marker."""
    warehouse, config = big_load(tmp_path)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    zombie = start_worker(config, claim(7, 7, "zombie"), barrier)
    adopter = None
    try:
        wait_for_file(barrier / "zombie.holding", zombie)
        assert _holds_write_lock(warehouse)
        adopter = start_worker(config, claim(7, 8, "adopter"), barrier)
        wait_for_file(barrier / "adopter.entering", zombie, adopter)
        # the overlap: the adopter is inside its run while the zombie still holds the lock
        assert _holds_write_lock(warehouse) and zombie.poll() is None
        assert not (barrier / "zombie.release").exists()
        (barrier / "zombie.release").touch()
        zombie_out, adopter_out = finish(zombie), finish(adopter)
    finally:
        (barrier / "zombie.release").touch()
        for worker in (zombie, adopter):
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()
    assert not (barrier / "adopter.holding").exists()  # it never reached a commit of its own
    assert zombie_out["ok"] and not zombie_out["already_applied"]
    assert adopter_out == {"ok": True, "already_applied": True, "summary": zombie_out["summary"]}
    assert query(warehouse, "SELECT count(*) FROM t") == [(200_000,)]


# --- exactly_once: the same guarantee for a user's own SQLite writes -----------------------


def _invoices(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS invoices (n INTEGER)")
    return conn


def _send(conn: sqlite3.Connection, holder: Holder) -> tuple[bool, Any]:
    with exactly_once(conn, holder, name="send_invoices") as effect:
        if effect.already_applied:
            return True, effect.recorded
        conn.execute("INSERT INTO invoices VALUES (1), (2)")
        effect.result = {"invoices": 2, "by": holder.run_id}
        return False, effect.result


def test_exactly_once_applies_a_users_writes_once_per_generation(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    with closing(_invoices(path)) as conn:
        assert _send(conn, claim(1, 1, "zombie")) == (False, {"invoices": 2, "by": "zombie"})
        assert _send(conn, claim(1, 2, "adopter")) == (True, {"invoices": 2, "by": "zombie"})
        assert _send(conn, claim(3, 3, "next")) == (False, {"invoices": 2, "by": "next"})
        before = dump(path)
        with pytest.raises(FenceLostError, match="older generation 1"):
            _send(conn, claim(1, 2, "adopter"))  # generation 1 is over
        assert dump(path) == before
        assert query(path, "SELECT count(*) FROM invoices") == [(4,)]


def test_exactly_once_rolls_back_the_body_and_the_marker_together(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    with closing(_invoices(path)) as conn:
        before = dump(path)
        with pytest.raises(RuntimeError), exactly_once(conn, claim(1, 1)) as effect:
            conn.execute("INSERT INTO invoices VALUES (1)")
            effect.result = {"n": 1}
            raise RuntimeError("the body failed")
        assert dump(path) == before
        with (
            pytest.raises(PipelineError, match="result is not JSON"),
            exactly_once(conn, claim(1, 1)) as effect,
        ):
            conn.execute("INSERT INTO invoices VALUES (1)")
            effect.result = {"n": object()}
        assert dump(path) == before
        conn.execute("BEGIN")
        with (
            pytest.raises(PipelineError, match="already inside a transaction"),
            exactly_once(conn, claim(1, 1)),
        ):
            pass
        conn.execute("ROLLBACK")
        with (
            pytest.raises(ClaimRefusedError, match="must not run"),
            exactly_once(conn, Holder("k", 1, 1, "r", should_run=False)),
        ):
            pass
        assert dump(path) == before


def test_exactly_once_names_what_it_takes(tmp_path: Path) -> None:
    """A SQLite connection takes no ledger= / schema= (those are PostgreSQL's); anything but a
    sqlite3 or psycopg connection is refused by name. (Before: AttributeError / TypeError.)"""
    path = str(tmp_path / "app.db")
    with closing(_invoices(path)) as conn:
        before = dump(path)
        for option in ({"ledger": object()}, {"schema": "s"}):
            with (
                pytest.raises(PipelineError, match="are for a PostgreSQL connection"),
                exactly_once(conn, claim(1, 1), **option),  # type: ignore[arg-type]
            ):
                pass
        assert dump(path) == before
    with (
        pytest.raises(PipelineError, match=r"sqlite3\.Connection or a psycopg"),
        exactly_once(object(), claim(1, 1)),
    ):
        pass


def test_a_real_ledger_claim_is_accepted_once_it_carries_a_generation(tmp_path: Path) -> None:
    """The ledger's Claim is the intended argument: whatever it lacks is a named refusal."""
    from rocky_dagster.ledger import open_ledger

    ledger = open_ledger(str(tmp_path / "ledger.db"))
    answer = ledger.claim("nightly", "run-1")
    warehouse, pipeline, _ = prepare("load", tmp_path)
    if getattr(answer, "generation", None) is None:
        with pytest.raises(ClaimRefusedError, match="generation must be an integer"):
            pipeline.run(claim=answer)  # type: ignore[arg-type]
        assert dump(warehouse) == {}
    else:
        assert not pipeline.run(claim=answer).already_applied  # type: ignore[arg-type]
        assert pipeline.run(claim=answer).already_applied  # type: ignore[arg-type]


@pytest.mark.parametrize("module", ["rocky_dagster.effects", "rocky_dagster.effects.postgres"])
def test_the_effects_import_neither_the_pipelines_nor_dagster(module: str) -> None:
    """The effects sit beneath the pipelines: importing them (in a fresh interpreter, so no
    cycle can hide) loads no pipeline module and no Dagster, and psycopg only with postgres."""
    code = (
        f"import sys, {module}; "
        "print([m for m in sys.modules if m.startswith(('rocky_dagster.pipelines', 'dagster'))], "
        "'psycopg' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", str(module.endswith(".postgres"))]
