"""A user's own `@idempotent_asset` with an upstream, materialized from the UI's API with no
tags, on a real `dagster dev`: the second launch skips and says who did the work; with the
resource's `replay_skips`, the asset page and the catalog show the skip (headless Chromium); a
failed run's outcome says it failed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dagster_server import ARTIFACTS, LAUNCH_RUN_MUTATION, DagsterServer, browser_page

pytestmark = pytest.mark.e2e

OUTCOME_TAG = "rocky/outcome"
LOCATION = "user_project"

DEFINITIONS = '''\
from dagster import Definitions, MaterializeResult, asset

from rocky_dagster.decorators.assets import idempotent_asset
from rocky_dagster.resource import IdempotencyLedger
from rocky_dagster.sensors.run_requests import ledger_run_status_sensors


@asset
def orders() -> None:
    """Written elsewhere; each materialization is a new input for order_summary."""


@idempotent_asset(deps=[orders])
def order_summary(context) -> MaterializeResult:
    return MaterializeResult(metadata={"rows": 3})


@idempotent_asset(deps=[orders], resource_key="replaying_ledger")
def order_totals(context) -> MaterializeResult:
    """Its skips replay the recorded materialization, so the catalog shows them."""
    return MaterializeResult(metadata={"rows": 2})


@idempotent_asset(deps=[orders])
def broken_summary(context) -> None:
    raise RuntimeError("the warehouse is down")


defs = Definitions(
    assets=[orders, order_summary, order_totals, broken_summary],
    # one ledger file (the default under DAGSTER_HOME), two ways of reporting a skip
    resources={"ledger": IdempotencyLedger(), "replaying_ledger": IdempotencyLedger(replay_skips=True)},
    sensors=ledger_run_status_sensors(minimum_interval_seconds=5),
)
'''

WORKSPACE = f"""\
load_from:
  - python_file:
      relative_path: user_definitions.py
      location_name: {LOCATION}
      working_directory: .
"""


@dataclass
class UserProject:
    server: DagsterServer
    first: str
    second: str


def materialize(server: DagsterServer, asset: str) -> str:
    """What the UI's Materialize button sends: the asset job, one asset selected, no tags."""
    data = server.graphql(
        LAUNCH_RUN_MUTATION,
        {
            "p": {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": "__repository__",
                    "jobName": "__ASSET_JOB",
                    "assetSelection": [{"path": [asset]}],
                },
                "runConfigData": {},
                "executionMetadata": {"tags": []},
            }
        },
    )
    result = data["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return str(result["run"]["runId"])


def finished(server: DagsterServer, run_id: str, status: str = "SUCCESS") -> None:
    run = server.wait_for_run(run_id)
    assert run["status"] == status, (run, server.log_tail())


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserProject]:
    root = tmp_path_factory.mktemp("user_project")
    (root / "user_definitions.py").write_text(DEFINITIONS)
    (root / "workspace.yaml").write_text(WORKSPACE)
    server = DagsterServer(home=root / "home", workspace=root / "workspace.yaml", location=LOCATION)
    server.start()
    try:
        finished(server, materialize(server, "orders"))
        first = materialize(server, "order_summary")
        finished(server, first)
        second = materialize(server, "order_summary")
        finished(server, second)
        yield UserProject(server, first, second)
        server.terminate_unfinished()
    finally:
        server.stop()
    assert not server.leftovers, (
        f"processes left after SIGINT (SIGKILLed): {[pid for pid, _ in server.leftovers]}\n"
        f"{server.log_tail(40)}"
    )


def test_the_second_materialize_with_no_tags_skips_and_names_the_first(
    project: UserProject,
) -> None:
    server = project.server
    first_events = {e.get("eventType") for e in server.logs(project.first)}
    assert "ASSET_MATERIALIZATION" in first_events
    events = server.logs(project.second)
    assert "ASSET_MATERIALIZATION" not in {e.get("eventType") for e in events}
    lines = [e for e in events if e.get("level") == "INFO" and "SKIPPED" in e.get("message", "")]
    assert len(lines) == 1, events
    assert f"already completed in run {project.first}" in lines[0]["message"]
    assert "ledger key 'inputs:" in lines[0]["message"]
    assert server.tags(project.second)[OUTCOME_TAG] == "skipped"

    finished(server, materialize(server, "orders"))  # a new input: the next launch works
    third = materialize(server, "order_summary")
    finished(server, third)
    assert "ASSET_MATERIALIZATION" in {e.get("eventType") for e in server.logs(third)}


def test_a_failed_run_is_tagged_failed(project: UserProject) -> None:
    server = project.server
    run_id = materialize(server, "broken_summary")
    finished(server, run_id, "FAILURE")
    assert server.tags(run_id)[OUTCOME_TAG] == "failed"


@pytest.mark.browser
def test_the_asset_page_and_the_catalog_show_the_skip(project: UserProject) -> None:
    server = project.server
    worked = materialize(server, "order_totals")
    finished(server, worked)
    skipped = materialize(server, "order_totals")  # the latest launch: a skip, replayed
    finished(server, skipped)
    events = server.logs(skipped)
    assert server.tags(skipped)[OUTCOME_TAG] == "skipped"
    assert any(f"already completed in run {worked}" in e.get("message", "") for e in events)
    skipped_default = materialize(server, "order_summary")  # without replay_skips
    finished(server, skipped_default)
    assert "ASSET_MATERIALIZATION" not in {e.get("eventType") for e in server.logs(skipped_default)}
    with browser_page() as page:
        from playwright.sync_api import expect

        expect.set_options(timeout=120_000)  # a loaded machine renders the asset page slowly
        # The asset page's overview shows the latest materialization: the skip's replay,
        # with the decision, the run that did the work, and rocky/replay.
        page.goto(f"{server.url}/assets/order_totals")
        expect(page.get_by_text("skipped_completed").first).to_be_visible()
        expect(page.get_by_text("rocky/replay", exact=True).first).to_be_visible()
        expect(page.get_by_text(worked).first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "asset_page_overview_skip.png"), full_page=True)

        # The catalog: order_totals' status links to the run that skipped (the replay is its
        # latest materialization); order_summary's to the run that did the work.
        page.goto(f"{server.url}/assets")
        expect(page.get_by_role("link", name="order_totals").first).to_be_visible()
        expect(page.get_by_text(re.compile(r"^Loading"))).to_have_count(0)
        expect(page.locator(f'a[href*="{skipped}"]').first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "asset_catalog_skip.png"), full_page=True)

        # Without replay_skips, the skip is in the asset's Events tab: the newest event is
        # its observation, with the decision and the run that did the work.
        page.goto(f"{server.url}/assets/order_summary?view=events")
        expect(page.get_by_text("skipped_completed").first).to_be_visible()
        expect(page.get_by_text("rocky/prior_run_id").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "asset_page_events_skip.png"), full_page=True)

        # The runs list, filtered on the outcome tag: the skipped run is there, tagged.
        page.goto(f"{server.url}/runs?q%5B0%5D=tag%3Arocky%2Foutcome%3Dskipped")
        expect(page.get_by_text(skipped[:8]).first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "runs_outcome_skipped.png"), full_page=True)
