"""The dashboard's actions over a real PostgreSQL: confirmed with the count, acting on exactly what was
confirmed, through the processor's API; and the queue limits (pause, rates and schedules: test_control.py)."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from tests.web.conftest import Web, post
from tests.web.seed import completed, failed, seed


def statuses(db: Any, ids: list[int]) -> dict[int, str]:
    return dict(db.execute("SELECT id, status FROM processing_queue WHERE id = ANY(%s)", (ids,)).fetchall())


def hidden(html: str) -> dict[str, list[str]]:
    """The hidden fields of a confirmation page's form."""
    out: dict[str, list[str]] = {}
    for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html):
        out.setdefault(name, []).append(value)
    return out


def test_retry_from_a_record_page_makes_it_pending(web: Web, processor: DistributedProcessor,
                                                   db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    target = s.failed[1]
    answer = post(web, "/records/bulk", {"do": "retry", "scope": "selected", "id": target, "back": "record"})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/records/{target}?done=retry&n=1"
    assert statuses(db, [target]) == {target: "pending"}
    page = web.get(answer.headers["location"])
    assert "Retried 1 record(s)" in page.text and "state-pending" in page.text


def test_a_selection_is_confirmed_with_its_count_then_cancelled(web: Web, processor: DistributedProcessor,
                                                                db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    chosen = s.pending[:2]
    confirm = post(web, "/records/bulk", {"do": "cancel", "scope": "selected", "id": chosen})
    assert confirm.status_code == 200
    assert "Cancel 2 selected record(s)?" in confirm.text
    assert statuses(db, chosen) == {i: "pending" for i in chosen}  # nothing done before the confirmation
    done = post(web, "/records/bulk", hidden(confirm.text))
    assert done.status_code == 303 and "done=cancel&n=2" in done.headers["location"]
    assert statuses(db, s.pending) == {**{i: "cancelled" for i in chosen}, **{i: "pending" for i in s.pending[2:]}}


def test_a_bulk_cancel_by_filter_cancels_exactly_what_was_confirmed(web: Web, processor: DistributedProcessor,
                                                                    db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    confirm = post(web, "/records/bulk", {"do": "cancel", "scope": "filter", "queue": "emails", "state": "pending"})
    assert confirm.status_code == 200
    assert re.search(r"Cancel <strong>4</strong> record\(s\)", confirm.text)
    late = list(processor.add_records([{"late": True}], queue="emails"))  # arrives after the confirmation
    done = post(web, "/records/bulk", hidden(confirm.text))
    assert done.status_code == 303
    assert done.headers["location"] == "/records?queue=emails&state=pending&done=cancel&n=4"
    assert statuses(db, s.pending + late + s.reports) == {
        **{i: "cancelled" for i in s.pending}, late[0]: "pending", **{i: "pending" for i in s.reports}}
    assert set(statuses(db, s.failed).values()) == {"failed"}  # the filter said pending


def test_retry_and_purge_of_everything_a_filter_matches(web: Web, processor: DistributedProcessor,
                                                        db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    more = failed(processor, [{"n": i} for i in range(3)], "TimeoutError: again", queue="reports")
    confirm = post(web, "/records/bulk", {"do": "retry", "scope": "filter", "error": "timeout"})
    assert re.search(r"Retry <strong>4</strong> record\(s\)", confirm.text)
    post(web, "/records/bulk", hidden(confirm.text))
    assert set(statuses(db, [s.failed[1], *more]).values()) == {"pending"}
    assert statuses(db, [s.xss]) == {s.xss: "failed"}  # its error does not match
    # purge: finished records only, whatever else the filter matches
    confirm = post(web, "/records/bulk", {"do": "purge", "scope": "filter", "queue": "emails"})
    assert re.search(r"Purge <strong>4</strong> record\(s\)", confirm.text)  # 3 completed, 1 failed
    post(web, "/records/bulk", hidden(confirm.text))
    left = statuses(db, s.completed + s.failed + s.pending)
    assert set(left) == {s.failed[1], *s.pending}
    counts = processor.get_queue_status("emails")["queues"]["emails"]
    assert (counts["completed"], counts["failed"]) == (0, 0)  # queue_stats followed the deletes


def test_purge_from_a_record_page_is_confirmed(web: Web, processor: DistributedProcessor,
                                               db: psycopg.Connection[Any]) -> None:
    done = completed(processor, 1)[0]
    form = {"do": "purge", "scope": "selected", "id": done, "back": "record"}
    confirm = post(web, "/records/bulk", form)
    assert confirm.status_code == 200 and "Purge 1 selected record(s)?" in confirm.text
    assert statuses(db, [done]) == {done: "completed"}
    gone = post(web, "/records/bulk", hidden(confirm.text))
    assert gone.status_code == 303 and statuses(db, [done]) == {}
    assert web.get(f"/records/{done}").status_code == 404


def test_an_action_on_records_it_does_not_apply_to_changes_nothing(web: Web, processor: DistributedProcessor,
                                                                   db: psycopg.Connection[Any]) -> None:
    s = seed(processor)
    answer = post(web, "/records/bulk", {"do": "retry", "scope": "selected", "id": s.pending[0], "back": "record"})
    assert "n=0" in answer.headers["location"]
    confirm = post(web, "/records/bulk", {"do": "retry", "scope": "filter", "state": "pending"})
    assert "Nothing to do" in confirm.text
    assert statuses(db, [s.pending[0]]) == {s.pending[0]: "pending"}


@pytest.mark.parametrize(("form", "message"), [
    ({"do": "explode", "scope": "selected", "id": "1"}, "do must be one of"),
    ({"do": "cancel", "scope": "everything"}, "scope must be one of"),
    ({"do": "cancel", "scope": "selected"}, "no record selected"),
    ({"do": "cancel", "scope": "selected", "id": "x"}, "id must be a positive integer"),
    ({"do": "cancel", "scope": "filter", "state": "<b>"}, "unknown state"),
    ({"do": "cancel", "scope": "filter", "upto": "-1"}, "upto must be a positive integer"),
])
def test_a_bad_action_is_a_400(web: Web, form: dict[str, str], message: str) -> None:
    answer = post(web, "/records/bulk", form)
    assert answer.status_code == 400 and message in answer.text
    assert "<b>" not in answer.text


def test_queue_limits_are_set_and_removed(web: Web, processor: DistributedProcessor) -> None:
    seed(processor)
    answer = post(web, "/queues/action", {"do": "limit", "queue": "emails", "n": "25"})
    assert answer.status_code == 303 and answer.headers["location"] == "/queues?done=limit"
    page = web.get(answer.headers["location"]).text
    assert "25 pending" in page and "Queue limit saved" in page
    post(web, "/queues/action", {"do": "limit", "queue": "emails", "n": "0"})
    assert "0 pending" in web.get("/queues").text
    post(web, "/queues/action", {"do": "limit", "queue": "emails", "n": ""})
    assert " pending</td>" not in web.get("/queues").text
    processor.set_key_concurrency("tenant-*", 3, block_on_failure=True)
    assert "tenant-*" in web.get("/queues").text
    assert post(web, "/queues/action", {"do": "limit", "queue": "emails", "n": "x"}).status_code == 400
    assert post(web, "/queues/action", {"do": "limit", "n": "3"}).status_code == 400


def test_a_form_that_is_not_a_form_is_refused(web: Web) -> None:
    answer = web.post("/records/bulk", content=b"\xff\xfe", headers={"Origin": "http://testserver",
                                                                    "Content-Type": "text/plain"})
    assert answer.status_code == 400
    big = web.post("/records/bulk", content=b"a" * (2 << 20), headers={"Origin": "http://testserver"})
    assert big.status_code == 413
