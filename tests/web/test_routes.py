"""The dashboard's routes over a real PostgreSQL: every page, every filter, every refusal, the headers, the
escaping of every value that comes from a record."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from core.web import dashboard
from tests.web.conftest import ORIGIN, Web, client_of, post
from tests.web.seed import XSS, completed, seed

SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}


def ids_on(html: str) -> list[int]:
    """The record ids a records page lists, in order."""
    return [int(i) for i in re.findall(r'name="id" value="(\d+)"', html)]


def test_every_page_answers_with_the_records_it_holds(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    overview = web.get("/")
    assert overview.status_code == 200
    assert 'data-queue="emails"' in overview.text and 'data-queue="reports"' in overview.text
    assert 'data-health="healthy"' in overview.text
    assert "<svg" in overview.text and 'class="bar completed"' in overview.text  # 3 completed this hour
    records = web.get("/records")
    assert ids_on(records.text) == sorted(s.pending + s.reports + s.completed + s.failed, reverse=True)
    record = web.get(f"/records/{s.failed[1]}")
    assert record.status_code == 200 and "TimeoutError: upstream did not answer in 30 s" in record.text
    assert "a@example.com" in record.text  # the payload, pretty-printed
    queues = web.get("/queues")
    assert queues.status_code == 200 and 'data-queue="reports"' in queues.text
    instances = web.get("/instances")
    assert instances.status_code == 200
    schedules = web.get("/schedules")
    assert schedules.status_code == 200 and 'href="/schedules"' in overview.text
    assert web.get("/shards").status_code == 404  # one database: no shards page, no nav entry
    assert "/shards" not in overview.text
    assert web.head("/records").status_code == 200


def test_the_overview_counts_by_state_and_shows_live_instances(web: Web,
                                                               processor: DistributedProcessor) -> None:
    seed(processor)
    processor.register_instance({"role": "test"})
    held = processor.claim_records(1, queues=["reports"])
    html = web.get("/").text
    row = re.search(r'<tr data-queue="emails">(.*?)</tr>', html, re.S)
    assert row is not None
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]
    assert cells[1:7] == ["4", "0", "0", "3", "2", "0"]  # pending, processing, waiting, completed, failed, cancelled
    assert "test-a" in html and ">1</td>" in html  # the instance, holding one record
    processor.release_records(held)


def test_counts_above_the_cap_are_shown_as_such(web: Web, processor: DistributedProcessor) -> None:
    processor.add_records([{"n": i} for i in range(10_050)], queue="bulk")
    row = re.search(r'<tr data-queue="bulk">(.*?)</tr>', web.get("/").text, re.S)
    assert row is not None
    shown = re.search(r'class="capped"[^>]*>([^<]+)<', row.group(1))
    assert shown is not None and (shown.group(1) == "10,000+" or shown.group(1).startswith("~"))


def test_each_filter_finds_its_records(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    assert ids_on(web.get("/records", params={"queue": "reports"}).text) == sorted(s.reports, reverse=True)
    assert ids_on(web.get("/records", params={"state": "failed"}).text) == sorted(s.failed, reverse=True)
    assert ids_on(web.get("/records", params={"state": "pending", "queue": "emails"}).text) == sorted(
        s.pending, reverse=True)
    assert ids_on(web.get("/records", params={"key": "customer-7"}).text) == sorted(s.reports, reverse=True)
    assert ids_on(web.get("/records", params={"key": "customer-7", "state": "pending"}).text) == sorted(
        s.reports, reverse=True)
    assert ids_on(web.get("/records", params={"dedupe": "order-2"}).text) == [s.pending[1]]
    assert ids_on(web.get("/records", params={"error": "UPSTREAM"}).text) == [s.failed[1]]
    assert ids_on(web.get("/records", params={"state": "completed", "error": "nothing like it"}).text) == []
    held = processor.claim_records(1, queues=["reports"])
    assert ids_on(web.get("/records", params={"state": "processing"}).text) == [held[0].id]


def test_pages_follow_the_keyset_cursor(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    everything = sorted(s.pending + s.reports + s.completed + s.failed, reverse=True)
    first = web.get("/records", params={"limit": 4})
    assert ids_on(first.text) == everything[:4]
    link = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert link is not None
    second = web.get(link.group(1).replace("&amp;", "&"))
    assert ids_on(second.text) == everything[4:8]
    # finished records: most recently finished first, the cursor carries the finish time
    done = web.get("/records", params={"state": "completed", "limit": 2})
    shown = ids_on(done.text)
    assert len(shown) == 2 and set(shown) <= set(s.completed)
    link = re.search(r'href="([^"]+)" rel="next"', done.text)
    assert link is not None and "at=" in link.group(1)
    rest = ids_on(web.get(link.group(1).replace("&amp;", "&")).text)
    assert sorted(shown + rest) == sorted(s.completed)


@pytest.mark.parametrize(("path", "message"), [
    ("/records?state=%3Cx%3E", "unknown state"),
    ("/records?state=bogus", "unknown state"),
    ("/records?after=abc", "after must be a positive integer"),
    ("/records?after=-5", "after must be a positive integer"),
    ("/records?after=99999999999999999999", "after must be between"),
    ("/records?at=yesterday", "at must be a time"),
    ("/records?limit=0", "limit must be between"),
    ("/records?limit=100000", "limit must be at most"),
    ("/records?queue=a%00b", "control characters"),
    ("/records?key=" + "k" * 201, "longer than 200"),
    ("/records/abc", "id must be a positive integer"),
    ("/records/0", "id must be between"),
])
def test_a_bad_value_is_a_400_with_a_message(web: Web, path: str, message: str) -> None:
    answer = web.get(path)
    assert answer.status_code == 400
    assert message in answer.text
    assert "&lt;x&gt;" in answer.text or "<x>" not in answer.text


def test_an_unknown_record_is_a_404(web: Web) -> None:
    answer = web.get("/records/424242")
    assert answer.status_code == 404 and "no record 424242" in answer.text


def test_every_response_carries_the_security_headers(processor: DistributedProcessor) -> None:
    seed(processor)
    with client_of(dashboard(processor, auth=("ops", "s3cret"))) as client:
        answers = [client.get("/"), client.get("/", auth=("ops", "s3cret")),
                   client.get("/records?state=bad", auth=("ops", "s3cret")),
                   client.get("/static/htmx.min.js", auth=("ops", "s3cret")),
                   client.get("/nowhere", auth=("ops", "s3cret")),
                   client.post("/records/bulk", auth=("ops", "s3cret"))]
    assert [a.status_code for a in answers] == [401, 200, 400, 200, 404, 403]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp


def test_pages_have_no_inline_script(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    processor.pause("emails", reason="no script here")
    processor.schedule("nightly", cron="0 3 * * *", queue="emails")
    for path in ("/", "/records", f"/records/{s.xss}", "/queues", "/instances", "/schedules"):
        html = web.get(path).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="' in attrs and body == "" for attrs, body in scripts), path
        assert not re.search(r"<[^>]+\son[a-z]+=", html), path  # no inline event handler either


def test_a_script_in_a_payload_key_or_error_shows_as_text(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path in (f"/records/{s.xss}", "/records?state=failed", f"/records?key={XSS}"):
        html = web.get(path).text
        assert XSS not in html, path
        assert escaped in html, path
    # a queue named so, paused and rated for that reason, and a schedule named so
    processor.add_records([{"n": 1}], queue=XSS)
    processor.pause(XSS, reason=XSS)
    processor.set_queue_rate(XSS, 2)
    processor.set_key_rate(XSS, 2)
    processor.schedule(XSS, every=60, queue=XSS, payload={"html": XSS})
    for path in ("/", "/queues", "/schedules"):
        html = web.get(path).text
        assert XSS not in html and escaped in html, path
    confirm = post(web, "/schedules/remove", {"name": XSS})
    assert confirm.status_code == 200 and XSS not in confirm.text and escaped in confirm.text


def test_basic_auth_is_required_and_checked(processor: DistributedProcessor) -> None:
    with client_of(dashboard(processor, auth=("ops", "pa:ss"))) as client:
        missing = client.get("/")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
        assert client.get("/", auth=("ops", "wrong")).status_code == 401
        assert client.get("/", auth=("other", "pa:ss")).status_code == 401
        garbage = client.get("/", headers={"Authorization": "Basic !!!not-base64"})
        assert garbage.status_code == 401
        token = base64.b64encode(b"ops:pa:ss").decode()
        assert client.get("/", headers={"Authorization": f"basic {token}"}).status_code == 200
        assert client.get("/static/dashboard.css").status_code == 401  # nothing is public


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_callable_decides_who_may_pass(processor: DistributedProcessor, asynchronous: bool) -> None:
    def allow(request: object) -> bool:
        return getattr(request, "headers", {}).get("x-user") == "alice"

    async def allow_async(request: object) -> bool:
        return allow(request)

    with client_of(dashboard(processor, auth=allow_async if asynchronous else allow)) as client:
        assert client.get("/").status_code == 403
        assert client.get("/", headers={"X-User": "alice"}).status_code == 200


def test_bad_auth_settings_are_refused() -> None:
    p = DistributedProcessor("host=127.0.0.1 port=1 dbname=x")
    for bad in (("user", ""), ("only-one",), 42):
        with pytest.raises(ValueError, match="auth must be"):
            dashboard(p, auth=bad)  # type: ignore[arg-type]
    p.close()


def test_actions_are_refused_cross_origin(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    form = {"do": "cancel", "scope": "selected", "id": s.pending[0], "confirm": "1"}
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": ORIGIN, "Sec-Fetch-Site": "same-site"}):
        answer = web.post("/records/bulk", data=form, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, headers
        assert "cross-origin" in answer.text
    assert web.post("/records/bulk", data=form, follow_redirects=False).status_code == 403  # no Origin at all
    assert web.get(f"/records/{s.pending[0]}").text.count("state-pending") >= 1
    same = web.post("/records/bulk", data=form, headers={"Sec-Fetch-Site": "same-origin"}, follow_redirects=False)
    assert same.status_code == 303


def test_a_get_never_acts(web: Web, processor: DistributedProcessor) -> None:
    s = seed(processor)
    query = {"do": "cancel", "scope": "selected", "id": s.pending[0], "confirm": "1"}
    assert web.get("/records/bulk", params=query).status_code in (400, 405)
    assert web.get("/queues/action", params={"do": "limit", "queue": "emails", "n": "1"}).status_code == 405
    assert web.get("/queues/action", params={"do": "pause", "queue": "emails"}).status_code == 405
    assert web.get("/schedules/fire").status_code == 405
    assert processor.paused_queues() == {}
    assert web.put("/records/bulk", data=query, headers={"Origin": ORIGIN}).status_code == 405
    assert processor.get_queue_status("emails")["queues"]["emails"]["cancelled"] == 0
    assert 'data-queue="emails"' in web.get("/queues").text and "1 pending" not in web.get("/queues").text


def test_read_only_offers_no_action_and_refuses_every_post(processor: DistributedProcessor) -> None:
    s = seed(processor)
    with client_of(dashboard(processor, read_only=True)) as client:
        for path in ("/", "/records", f"/records/{s.failed[1]}", "/queues", "/records?state=failed", "/schedules"):
            html = client.get(path).text
            assert 'method="post"' not in html and '<button name="do"' not in html, path
            assert "read-only" in html
        for path, form in (("/records/bulk", {"do": "retry", "scope": "selected", "id": s.failed[1],
                                              "confirm": "1", "back": "record"}),
                           ("/queues/action", {"do": "limit", "queue": "emails", "n": "5"})):
            answer = post(client, path, form)
            assert answer.status_code == 403 and "read-only" in answer.text
    assert processor.get_queue_status("emails")["queues"]["emails"]["failed"] == 2


def test_payloads_can_be_hidden(processor: DistributedProcessor) -> None:
    s = seed(processor)
    with client_of(dashboard(processor, hide_payloads=True)) as client:
        html = client.get(f"/records/{s.failed[1]}").text
    assert "a@example.com" not in html and "Hidden" in html


def test_a_search_out_of_time_links_to_where_it_stopped(web: Web, processor: DistributedProcessor,
                                                        db: psycopg.Connection[Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import core.web.pgsource
    import core.web.source

    done = completed(processor, 7)
    db.execute("UPDATE processing_queue SET finished_at = now() - id * interval '1 second'")
    monkeypatch.setattr(core.web.pgsource, "WINDOW", 2)  # a window of two finished records per statement
    monkeypatch.setattr(core.web.source, "PAGE_BUDGET", -1.0)  # and no time for a second one
    seen: list[int] = []
    url: str | None = "/records?state=completed"
    while url is not None:
        page = web.get(url)
        assert page.status_code == 200, page.text[-500:]
        seen += ids_on(page.text)
        found = re.search(r'<a href="([^"]+)" rel="next">', page.text)
        url = None if found is None else html.unescape(found.group(1))
        assert url is None or "Searched down to records finished at" in page.text
        assert len(seen) <= len(done)
    assert seen == sorted(done)  # most recently finished first (the lowest ids here), each once
