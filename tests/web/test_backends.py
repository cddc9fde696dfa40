"""The dashboard over every kind of processor: three shards, the in-memory one, mounted under a path of a host
app, a database that does not answer, a horizon held back."""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.routing import Mount

from core import DistributedProcessor
from core.testing import InMemoryProcessor
from core.web import dashboard
from tests.support import wait_until
from tests.web.conftest import Web, client_of, post
from tests.web.seed import seed
from tests.web.test_actions import hidden
from tests.web.test_routes import ids_on


def test_three_shards_merged_on_every_page(shards: DistributedProcessor) -> None:
    s = seed(shards)
    keyed = [list(shards.add_records([{"k": i}], queue="reports", ordering_key=f"key-{i}")) for i in range(12)]
    held = shards.claim_records(50, queues=["reports"])
    assert len({r.shard for r in held}) > 1  # the keys spread over the shards
    everything = sorted(s.pending + s.reports + s.completed + s.failed + [i[0] for i in keyed], reverse=True)
    with client_of(dashboard(shards)) as web:
        assert ids_on(web.get("/records").text) == everything
        assert ids_on(web.get("/records", params={"limit": 5}).text) == everything[:5]
        assert ids_on(web.get("/records", params={"state": "failed"}).text) == sorted(s.failed, reverse=True)
        overview = web.get("/").text
        row = re.search(r'<tr data-queue="reports">(.*?)</tr>', overview, re.S)
        assert row is not None and f">{len(held)}</a>" in row.group(1), row.group(1)  # summed over the shards
        for rid in (keyed[0][0], keyed[-1][0], s.xss):
            assert web.get(f"/records/{rid}").status_code == 200
        page = web.get("/shards")
        assert page.status_code == 200 and page.text.count("<tr><td>shard ") == 3
        assert "/shards" in overview
        assert "shards" in web.get("/instances").text
        assert web.get("/schedules").status_code == 200
        pending = shards.get_queue_status()["totals"]["pending"]
        confirm = post(web, "/records/bulk", {"do": "cancel", "scope": "filter", "state": "pending"})
        assert re.search(rf"Cancel <strong>{pending}</strong>", confirm.text)
        post(web, "/records/bulk", hidden(confirm.text))
        status = shards.get_queue_status()
        assert status["totals"]["cancelled"] == pending and status["totals"]["pending"] == 0


def test_a_shard_down_is_named_and_the_others_shown(dp_server: Any, dp_template: str) -> None:
    from core.testing.postgres import unique_name

    names = [unique_name(f"dp_d{i}") for i in range(2)]
    dsns = [dp_server.create_database(n, template=dp_template) for n in names]
    try:
        with DistributedProcessor(shards=dsns, connect_timeout=2) as p:
            p.migrate()
            ids = list(p.add_records([{"n": 1}], queue="q"))
            p.pause("q", reason="held")
            p.set_queue_rate("q", 4)
            p.schedule("nightly", cron="0 3 * * *", queue="q")
            p.store.stores[1].db.close()  # as good as down: its pool refuses every borrow
            with client_of(dashboard(p)) as web:
                page = web.get("/")
                assert page.status_code == 200
                assert "Unreachable: shard" in page.text and "unreachable</li>" in page.text
                assert 'data-health="degraded"' in page.text
                shard_page = web.get("/shards").text
                assert "unreachable:" in shard_page
                assert web.get("/records").status_code == 200
                assert web.get(f"/records/{ids[0]}").status_code in (200, 404)
                queues = web.get("/queues").text  # pauses and rates: from the shard that answers
                assert "Unreachable: shard" in queues and 'class="badge paused"' in queues and "4 per 1s" in queues
                schedules = web.get("/schedules")
                assert schedules.status_code == 200 and "Unreachable: shard" in schedules.text
    finally:
        for n in names:
            dp_server.drop_database(n)


def test_the_in_memory_processor(dp_memory: InMemoryProcessor) -> None:
    s = seed(dp_memory)
    dp_memory.set_queue_limit("emails", 100)
    with client_of(dashboard(dp_memory)) as web:
        overview = web.get("/")
        assert overview.status_code == 200 and 'data-queue="emails"' in overview.text
        assert ids_on(web.get("/records").text) == sorted(s.pending + s.reports + s.completed + s.failed,
                                                          reverse=True)
        assert ids_on(web.get("/records", params={"error": "upstream"}).text) == [s.failed[1]]
        assert ids_on(web.get("/records", params={"state": "completed", "limit": 2}).text) == sorted(
            s.completed, reverse=True)[:2]
        record = web.get(f"/records/{s.xss}")
        assert record.status_code == 200 and "&lt;script&gt;" in record.text
        assert "100 pending" in web.get("/queues").text
        assert web.get("/instances").status_code == 200
        assert web.get("/schedules").status_code == 200  # pause, rates, schedules: test_control.py
        confirm = post(web, "/records/bulk", {"do": "purge", "scope": "filter", "queue": "emails"})
        post(web, "/records/bulk", hidden(confirm.text))
        assert dp_memory.get_queue_status("emails")["queues"]["emails"]["completed"] == 0
        post(web, "/records/bulk", {"do": "cancel", "scope": "selected", "id": s.pending[0], "back": "record"})
        assert dp_memory.get_queue_status("emails")["queues"]["emails"]["cancelled"] == 1


def test_mounted_under_a_path_of_a_host_app(processor: DistributedProcessor) -> None:
    s = seed(processor)
    host = Starlette(routes=[Mount("/ops/queue", app=dashboard(processor))])
    with Web(host) as web:
        page = web.get("/ops/queue/")
        assert page.status_code == 200
        assert 'href="/ops/queue/records"' in page.text and 'src="/ops/queue/static/htmx.min.js"' in page.text
        assert web.get("/ops/queue/static/htmx.min.js").status_code == 200
        record = web.get(f"/ops/queue/records/{s.failed[1]}")
        assert 'href="/ops/queue/records?queue=emails"' in record.text
        answer = post(web, "/ops/queue/records/bulk", {"do": "retry", "scope": "selected", "id": s.failed[1],
                                                        "back": "record"})
        assert answer.headers["location"] == f"/ops/queue/records/{s.failed[1]}?done=retry&n=1"


def test_a_database_that_does_not_answer_is_a_503() -> None:
    with DistributedProcessor("host=127.0.0.1 port=1 dbname=nothing", connect_timeout=1) as p, \
            client_of(dashboard(p)) as web:
        for path in ("/", "/records", "/records/1", "/queues"):
            answer = web.get(path)
            assert answer.status_code == 503, path
            assert "Database unavailable" in answer.text and "password" not in answer.text


def test_a_held_horizon_makes_the_overview_degraded(dsn: str) -> None:
    with DistributedProcessor(dsn, horizon_warning_seconds=0.5) as p, client_of(dashboard(p)) as web, \
            psycopg.connect(dsn) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM processing_queue")  # a snapshot, held open
        def degraded() -> str | None:
            text = web.get("/").text
            return text if "MVCC horizon held back" in text else None

        page = wait_until(degraded, timeout=20, message="horizon reason on the overview")
        assert 'data-health="degraded"' in page and "backend pid" in page
        holder.rollback()


def test_requests_at_once_share_the_pool(processor: DistributedProcessor) -> None:
    seed(processor)
    app = dashboard(processor)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            with client_of(app) as web:
                for _ in range(5):
                    assert web.get("/").status_code == 200
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
