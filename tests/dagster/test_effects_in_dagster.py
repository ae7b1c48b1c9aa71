"""Exactly-once effects through the Dagster layer: a pipeline op's warehouse writes commit with
its claim's effect marker, and an adopter never applies again what a zombie already committed."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import DagsterInstance, job

from rocky_dagster import IdempotencyLedger
from rocky_dagster.decorators.pipeline_ops import load_op
from rocky_dagster.effects import EFFECTS
from rocky_dagster.ledger import Decision, Ledger, State, open_ledger
from rocky_dagster.pipelines import LoadPipeline
from rocky_dagster.step.keys import KEY_TAG


def _pipeline(tmp_path: Path, *, reload: bool = False) -> LoadPipeline:
    drops = tmp_path / "drops"
    drops.mkdir(exist_ok=True)
    (drops / "p.csv").write_text("id,amount\n1,2.5\n2,4.0\n")
    return LoadPipeline(
        warehouse=str(tmp_path / "wh.db"), directory=str(drops), table="payments", reload=reload
    )


def _job(pipeline: LoadPipeline, ledger_url: str):
    op_def = load_op(pipeline, name="load")

    @job(name="effects_job", resource_defs={"ledger": IdempotencyLedger(url=ledger_url)})
    def effects_job() -> None:
        op_def()

    return effects_job


def _markers(warehouse: str) -> list[tuple]:
    with closing(sqlite3.connect(warehouse)) as conn:
        return conn.execute(f"SELECT key, generation, fence, run_id FROM {EFFECTS}").fetchall()


def _rows(warehouse: str) -> int:
    with closing(sqlite3.connect(warehouse)) as conn:
        return conn.execute("SELECT count(*) FROM payments").fetchone()[0]


def test_a_pipeline_op_commits_its_claims_effect_marker(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    pipeline = _pipeline(tmp_path)
    result = _job(pipeline, ledger_url).execute_in_process(instance=instance, tags={KEY_TAG: "k"})
    assert result.success
    entry = ledger.get("k/load")
    assert entry is not None and entry.state == State.SUCCEEDED
    assert _markers(pipeline.warehouse) == [
        ("k/load", entry.generation, entry.fence, result.run_id)
    ]


def test_an_adopter_stamps_what_a_zombie_committed_without_applying_it_again(
    instance: DagsterInstance, ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    # reload=True: the loader's own record of loaded files does not stop a second load, so
    # only the effect marker can
    pipeline = _pipeline(tmp_path, reload=True)
    # a holder that committed its warehouse writes, then died before stamping the ledger; it
    # claimed an hour ago (its ledger's clock), so its lease has run out by now
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with open_ledger(ledger_url, clock=lambda: an_hour_ago) as earlier:
        zombie = earlier.claim("z/load", "zombie-run", fingerprint=pipeline.fingerprint())
        assert zombie.decision == Decision.PROCEED
        committed = pipeline.run(claim=zombie)
    assert _rows(pipeline.warehouse) == 2
    assert _markers(pipeline.warehouse) == [
        ("z/load", zombie.generation, zombie.fence, "zombie-run")
    ]

    result = _job(pipeline, ledger_url).execute_in_process(instance=instance, tags={KEY_TAG: "z"})
    assert result.success
    assert _rows(pipeline.warehouse) == 2  # not loaded twice, though reload=True would
    entry = ledger.get("z/load")
    assert entry is not None and entry.state == State.SUCCEEDED
    assert entry.run_id == result.run_id and entry.generation == zombie.generation
    assert entry.result == committed.summary()  # the zombie's recorded work, stamped once
    assert _markers(pipeline.warehouse) == [  # the zombie's marker, stamped, not rewritten
        ("z/load", zombie.generation, zombie.fence, "zombie-run")
    ]
    [output] = [e for e in result.all_events if e.is_successful_output and e.step_key == "load"]
    assert output.event_specific_data.metadata["rocky/already_applied"].value is True
