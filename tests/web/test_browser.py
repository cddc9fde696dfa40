"""The dashboard in a real browser (Debian's Chromium through Playwright) over a real database, served by uvicorn.

``DP_SCREENSHOTS=1`` also writes the README's screenshots (docs/images/dashboard-*.png).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

from core import DistributedProcessor
from core.web import dashboard
from tests.support import wait_until
from tests.web.flowseed import run_status, seed_runs, shop
from tests.web.seed import XSS, completed, failed, seed

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
SHOTS = os.environ.get("DP_SCREENSHOTS") == "1"


def status_of(db: Any, rid: int) -> str | None:
    row = db.execute("SELECT status FROM processing_queue WHERE id = %s", (rid,)).fetchone()
    return None if row is None else str(row[0])


def busy_hour(p: DistributedProcessor, db: Any) -> None:
    """An hour of work for the screenshots: records of three queues finished over the last hour."""
    for queue, n in (("emails", 240), ("reports", 90), ("webhooks", 160)):
        completed(p, n, queue=queue)
    failed(p, [{"hook": i} for i in range(6)], "HTTPError: 503 Service Unavailable from hooks.example.com",
           queue="webhooks")
    db.execute("UPDATE processing_queue SET finished_at = now() - (id % 58) * interval '1 minute'"
               " - (id % 7) * interval '9 seconds' WHERE finished_at IS NOT NULL")
    p.add_records([{"to": f"user{i}@example.com"} for i in range(35)], queue="emails")
    p.add_records([{"report": i} for i in range(12)], queue="reports", ordering_key=[f"tenant-{i % 4}"
                                                                                    for i in range(12)])
    p.register_instance({"role": "worker"})
    p.claim_records(3, queues=["emails"])


def test_the_overview_shows_the_real_queues(page: Any, serve: Any, processor: DistributedProcessor,
                                            db: psycopg.Connection[Any]) -> None:
    seed(processor)
    if SHOTS:
        busy_hour(processor, db)
    site = serve(dashboard(processor))
    page.goto(site.url + "/")
    assert page.locator('tr[data-queue="emails"]').count() == 1
    assert page.locator('tr[data-queue="reports"]').count() == 1
    assert page.locator('[data-health]').get_attribute("data-health") == "healthy"
    assert page.locator("svg.chart rect.bar").count() >= 1
    if SHOTS:
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / "dashboard-overview.png"), full_page=True)


def test_filter_finds_a_failed_record_and_retrying_it_makes_it_pending(
        page: Any, serve: Any, processor: DistributedProcessor, db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    target = s.failed[1]
    site = serve(dashboard(processor))
    page.goto(site.url + "/records")
    page.select_option('select[name="state"]', "failed")
    page.fill('input[name="error"]', "upstream")
    page.click('form.filter button[type="submit"]')
    page.wait_for_url("**/records?*state=failed*")
    link = page.locator(f'a[href$="/records/{target}"]')
    assert link.count() == 1 and page.locator("table.records tbody tr").count() == 1
    link.click()
    page.wait_for_url(f"**/records/{target}")
    assert "TimeoutError: upstream did not answer in 30 s" in page.locator("#last-error").inner_text()
    if SHOTS:
        page.screenshot(path=str(IMAGES / "dashboard-record.png"), full_page=True)
    page.click('button[name="do"][value="retry"]')
    page.wait_for_url(f"**/records/{target}?done=retry*")
    assert "Retried 1 record(s)" in page.locator(".flash").inner_text()
    assert page.locator("h1 .state").inner_text() == "pending"
    assert status_of(db, target) == "pending"


def test_a_bulk_cancel_by_filter_cancels_exactly_the_matching_records(
        page: Any, serve: Any, processor: DistributedProcessor, db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    site = serve(dashboard(processor))
    page.goto(site.url + "/records?queue=emails&state=pending")
    assert page.locator("table.records tbody tr").count() == len(s.pending)
    page.click('form.all button[value="cancel"]')
    assert "Cancel 4 record(s)" in page.locator("#confirm-count").inner_text()
    page.click("button.danger")
    page.wait_for_url("**done=cancel*")
    assert "Cancelled 4 record(s)" in page.locator(".flash").inner_text()
    assert {rid: status_of(db, rid) for rid in s.pending + s.reports + s.failed} == {
        **{rid: "cancelled" for rid in s.pending}, **{rid: "pending" for rid in s.reports},
        **{rid: "failed" for rid in s.failed}}


def test_selecting_all_on_a_page_and_cancelling_them(page: Any, serve: Any, processor: DistributedProcessor,
                                                     db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    site = serve(dashboard(processor))
    page.goto(site.url + "/records?queue=reports")
    page.check("input[data-select-all]")  # the page's own script ticks every row
    assert page.locator('input[name="id"]:checked').count() == len(s.reports)
    page.click('#bulk button[value="cancel"]')
    assert "Cancel 2 selected record(s)" in page.locator("#confirm-count").inner_text()
    page.click("button.danger")
    page.wait_for_url("**done=cancel*")
    assert {status_of(db, rid) for rid in s.reports} == {"cancelled"}


def test_pausing_a_queue_shows_it_paused_and_stops_its_claims(page: Any, serve: Any,
                                                              processor: DistributedProcessor) -> None:
    seed(processor)
    if SHOTS:  # the screenshot shows rates too
        processor.set_queue_rate("reports", 120, 60)
        processor.set_key_rate("tenant-*", 2, 1)
        processor.set_key_rate("customer-7", 10, 3600)
    site = serve(dashboard(processor))
    page.goto(site.url + "/queues")
    emails = page.locator('tr[data-queue="emails"]')
    assert emails.locator(".queue-state").inner_text() == "running"
    emails.locator('input[name="reason"]').fill("deploy in progress")
    emails.locator('input[name="until"]').fill("30m")
    emails.locator('button[value="pause"]').click()
    page.wait_for_url("**/queues?done=pause")
    assert emails.locator(".badge.paused").count() == 1
    assert "deploy in progress" in emails.locator(".queue-state").inner_text()
    assert "resumes by itself at" in emails.locator(".queue-state").inner_text()
    assert page.locator('tr[data-queue="reports"] .badge.paused').count() == 0
    if SHOTS:
        page.screenshot(path=str(IMAGES / "dashboard-queues.png"), full_page=True)
    added = processor.add_records([{"to": "late@example.com"}], queue="emails")[0]  # records keep coming in
    assert processor.claim_records(10, queues=["emails"]) == []
    assert [r.queue for r in processor.claim_records(10, queues=["reports"])] == ["reports"]  # others run
    page.goto(site.url + "/")
    assert page.locator("[data-health]").get_attribute("data-health") == "healthy"  # a state, not a failure
    assert "deploy in progress" in page.locator('.paused-list li[data-paused="emails"]').inner_text()
    page.goto(site.url + "/queues")
    page.locator('tr[data-queue="emails"] button[value="resume"]').click()
    page.wait_for_url("**/queues?done=resume")
    assert page.locator('tr[data-queue="emails"] .badge.paused').count() == 0
    assert added in [r.id for r in processor.claim_records(10, queues=["emails"])]
    page.goto(site.url + f"/records/{added}")
    assert page.locator("h1 .state").inner_text() == "processing"


def test_firing_due_schedules_and_removing_one(page: Any, serve: Any, processor: DistributedProcessor) -> None:
    processor.schedule("every-second", every=1, queue="ticks", payload={"tick": True})
    processor.schedule("nightly-report", cron="30 2 * * *", timezone="Europe/Paris", queue="reports",
                       misfire="all", backfill=6 * 3600, overlap="skip_if_running")
    processor.pause("reports", reason="month-end close")
    site = serve(dashboard(processor))
    page.goto(site.url + "/schedules")
    assert page.locator("tr[data-schedule]").count() == 2
    assert page.locator('tr[data-schedule="nightly-report"] .badge.paused').count() == 1

    def fired() -> bool:  # a bounded poll through the page: the every-second tick is due within a second
        page.locator("#fire-due button").click()
        page.wait_for_url("**/schedules?done=fire*")
        return "1 record(s) added" in page.locator(".flash").inner_text()

    wait_until(fired, timeout=15, interval=0.1, message="a due tick fired from the page")
    assert page.locator('tr[data-schedule="every-second"] td.n').inner_text() == "1"
    assert processor.get_queue_status("ticks")["queues"]["ticks"]["pending"] == 1
    if SHOTS:
        page.screenshot(path=str(IMAGES / "dashboard-schedules.png"), full_page=True)
    page.locator('tr[data-schedule="every-second"] button[value="remove"]').click()
    assert "every-second" in page.locator("#confirm-unschedule").inner_text()
    assert [s["name"] for s in processor.list_schedules()] == ["every-second", "nightly-report"]
    page.locator("button.danger").click()
    page.wait_for_url("**/schedules?done=unschedule")
    assert page.locator("tr[data-schedule]").count() == 1
    assert [s["name"] for s in processor.list_schedules()] == ["nightly-report"]


def test_a_failed_step_shows_in_the_graph_and_cancel_run_cancels_a_running_run(
        page: Any, serve: Any, processor: DistributedProcessor, db: psycopg.Connection[Any]) -> None:
    runs = seed_runs(processor)
    shown, running = runs.failed.id, runs.running.id
    if SHOTS:  # the screenshot's run fans out over four items before its charge fails
        shown = processor.start_flow(shop, {"order": 1042, "items": ["book", "pen", "ink", "mug"], "fail": True}).id
        processor.run(shop, stop_when_empty=True, handle_signals=False)  # type: ignore[arg-type]  # and the running run
        running = processor.start_flow(shop, {"items": ["cup", "lid"]}).id
    site = serve(dashboard(processor))
    page.goto(site.url + "/flows?status=failed")
    assert page.locator("tr[data-run]").count() == (2 if SHOTS else 1)
    page.click(f'tr[data-run="{shown}"] a[href$="/flows/{shown}"]')
    page.wait_for_url(f"**/flows/{shown}")
    charge = page.locator('svg.flow-graph g[data-step="charge"]')
    assert set((charge.get_attribute("class") or "").split()) == {"node", "state-failed", "failed-step"}
    assert charge.locator("text.line").text_content() == "failed"  # SVG text: no inner_text
    assert "state-cancelled" in (page.locator('svg.flow-graph g[data-step="ship"]').get_attribute("class") or "")
    assert page.locator("#failed-step").inner_text() == "charge"
    assert XSS in page.locator("#run-error").inner_text()  # as text; the page fixture fails on any alert()
    assert page.locator("#cancel-run").count() == 0  # it ended
    if SHOTS:
        page.screenshot(path=str(IMAGES / "dashboard-flow-run.png"), full_page=True)

    page.goto(site.url + f"/flows/{running}")
    assert page.locator("h1 .state").inner_text() == "running"
    page.click("#cancel-run button")
    assert f"Cancel run {running}" in page.locator("#confirm-flow-cancel").inner_text()
    assert run_status(processor, running) == "running"
    page.click("button.danger")
    page.wait_for_url(f"**/flows/{running}?done=flow_cancel")
    assert "Run cancelled" in page.locator(".flash").inner_text()
    assert page.locator("h1 .state").inner_text() == "cancelled"
    assert page.locator("#cancel-run").count() == 0
    assert page.locator('svg.flow-graph g[data-step="validate"]').get_attribute("class") == "node state-cancelled"
    assert run_status(processor, running) == "cancelled"
    assert db.execute("SELECT count(*) FROM processing_queue WHERE flow_run_id = %s AND status <> 'cancelled'",
                      (running,)).fetchone() == (0,)


def test_a_script_in_a_record_shows_as_text(page: Any, serve: Any, processor: DistributedProcessor) -> None:
    s = seed(processor)
    site = serve(dashboard(processor))
    page.goto(site.url + f"/records/{s.xss}")
    assert XSS in page.locator("#payload").inner_text()
    assert XSS in page.locator("#last-error").inner_text()
    page.goto(site.url + "/records?state=failed")
    assert XSS in page.locator("table.records").inner_text()
    assert page.evaluate("() => document.querySelectorAll('main script').length") == 0
    # the page fixture fails the test on any alert() dialog or script error


def test_read_only_offers_no_action(page: Any, serve: Any, processor: DistributedProcessor,
                                    db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    site = serve(dashboard(processor, read_only=True))
    processor.pause("reports", reason="read-only shows it")
    processor.schedule("nightly", cron="0 3 * * *", queue="emails")
    for path in ("/", "/records?state=failed", f"/records/{s.failed[1]}", "/queues", "/schedules"):
        page.goto(site.url + path)
        assert page.locator("form[method=post]").count() == 0, path
        assert page.locator("button[name=do]").count() == 0, path
        assert page.locator(".badge.ro").inner_text() == "read-only"
    refused = page.request.post(site.url + "/records/bulk", form={"do": "retry", "scope": "selected",
                                                                   "id": str(s.failed[1]), "confirm": "1"},
                                headers={"Origin": site.url})
    assert refused.status == 403
    assert status_of(db, s.failed[1]) == "failed"
