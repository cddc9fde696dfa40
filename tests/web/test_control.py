"""The dashboard's queue control and schedules over every kind of processor (one database, three shards, the
in-memory one): pause and resume with a reason and an end, queue and key rates, the schedules page, firing the
due schedules and removing one; and their refusals (read-only, cross-origin, bad values)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from core.web import dashboard
from tests.support import wait_until
from tests.web.conftest import Web, client_of, post
from tests.web.seed import XSS

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@dataclass
class Backend:
    """A processor of one kind, and how its time passes: the fake clock's advance in memory; None where
    time is the database's (a test waits for it by a bounded poll)."""

    kind: str
    processor: Any
    advance: Callable[[float], object] | None = None


@pytest.fixture(params=["one", "shards", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "one":
        return Backend("one", request.getfixturevalue("processor"))
    if request.param == "shards":
        return Backend("shards", request.getfixturevalue("dp_shards"))
    clock = request.getfixturevalue("dp_clock")
    return Backend("memory", request.getfixturevalue("dp_memory"), clock.advance)


@pytest.fixture
def web(backend: Backend) -> Iterator[Web]:
    with client_of(dashboard(backend.processor)) as client:
        yield client


def row(html: str, attr: str, name: str) -> str:
    """The table line ``<tr data-<attr>="name">`` of a page."""
    found = re.search(rf'<tr data-{attr}="{re.escape(name)}"[^>]*>(.*?)</tr>', html, re.S)
    assert found is not None, f"no line {attr}={name!r}"
    return found.group(1)


def done(answer: httpx.Response, location: str) -> None:
    assert answer.status_code == 303, answer.text[:500]
    assert answer.headers["location"] == location


# ---------------------------------------------------------------------- pause and resume


def test_pause_with_a_reason_and_an_end_then_resume(web: Web, backend: Backend) -> None:
    p = backend.processor
    p.add_records([{"n": i} for i in range(3)], queue="emails")
    line = row(web.get("/queues").text, "queue", "emails")
    assert "running" in line and 'value="pause"' in line and 'value="resume"' not in line

    done(post(web, "/queues/action", {"do": "pause", "queue": "emails", "reason": f"deploy {XSS}",
                                      "until": "30m"}), "/queues?done=pause")
    state = p.paused_queues()["emails"]
    assert state["reason"] == f"deploy {XSS}"
    assert abs((state["until"] - state["since"]).total_seconds() - 1800) < 60
    assert p.claim_records(10, queues=["emails"]) == []  # on every instance and shard, from the next claim

    page = web.get("/queues?done=pause").text
    assert "Queue paused" in page
    line = row(page, "queue", "emails")
    assert 'class="badge paused"' in line and 'value="resume"' in line and 'value="pause"' not in line
    assert "resumes by itself at" in line and f"deploy {ESCAPED}" in line and XSS not in page
    overview = web.get("/").text
    assert 'data-health="healthy"' in overview  # a pause is a state, not a failure
    assert re.search(r'<li data-paused="emails">.*?deploy ' + re.escape(ESCAPED), overview, re.S)
    assert 'class="badge paused"' in row(overview, "queue", "emails") and XSS not in overview

    done(post(web, "/queues/action", {"do": "resume", "queue": "emails"}), "/queues?done=resume")
    assert p.paused_queues() == {}
    assert len(p.claim_records(10, queues=["emails"])) == 3
    done(post(web, "/queues/action", {"do": "resume", "queue": "emails"}), "/queues?done=not_paused")
    assert "was not paused" in web.get("/queues?done=not_paused").text
    assert "paused-list" not in web.get("/").text


def test_a_queue_without_records_is_paused_by_name_and_listed(web: Web, backend: Backend) -> None:
    done(post(web, "/queues/action", {"do": "pause", "queue": "later"}), "/queues?done=pause")
    state = backend.processor.paused_queues()["later"]
    assert state["until"] is None and state["reason"] is None
    line = row(web.get("/queues").text, "queue", "later")
    assert "until resumed" in line and 'value="resume"' in line
    assert row(web.get("/").text, "queue", "later")


# ---------------------------------------------------------------------- rates


def test_a_queue_rate_is_set_changed_and_removed(web: Web, backend: Backend) -> None:
    p = backend.processor
    p.add_records([{"n": 1}], queue="emails")
    done(post(web, "/queues/action", {"do": "rate", "queue": "emails", "n": "6", "per": "2m"}),
         "/queues?done=rate")
    assert p.rates()["queues"] == {"emails": {"n": 6, "per": 120}}  # over shards: 2 a shard, 6 in all
    line = row(web.get("/queues?done=rate").text, "queue", "emails")
    assert "6 per 2m" in line and 'value="unrate"' in line
    assert 'name="n" size="5" inputmode="numeric" placeholder="n" aria-label="records per period of emails" ' \
           'value="6"' in line and 'value="2m"' in line  # the form holds what is set, as it takes it back
    done(post(web, "/queues/action", {"do": "rate", "queue": "emails", "n": "30", "per": ""}), "/queues?done=rate")
    assert p.rates()["queues"] == {"emails": {"n": 30, "per": 1}}  # an empty period is a second
    done(post(web, "/queues/action", {"do": "unrate", "queue": "emails", "n": "junk"}), "/queues?done=unrate")
    assert p.rates()["queues"] == {}
    line = row(web.get("/queues").text, "queue", "emails")
    assert '<td class="rate">-</td>' in line and 'value="unrate"' not in line
    # a queue rated before it has records is listed with its rate
    post(web, "/queues/action", {"do": "rate", "queue": "quiet", "n": "1", "per": "1h"})
    assert "1 per 1h" in row(web.get("/queues").text, "queue", "quiet")


def test_key_rates_are_set_and_removed(web: Web, backend: Backend) -> None:
    p = backend.processor
    pattern = "tenant-<b>*"
    done(post(web, "/queues/key-rates", {"do": "set", "pattern": pattern, "n": "3", "per": "1.5"}),
         "/queues?done=key_rate")
    assert p.rates()["keys"] == {pattern: {"n": 3, "per": 1.5}}
    page = web.get("/queues?done=key_rate").text
    assert "Key rate saved" in page and pattern not in page
    line = row(page, "key-rate", "tenant-&lt;b&gt;*")
    assert "<td>tenant-&lt;b&gt;*</td>" in line and ">3</td>" in line and "1.5s" in line
    done(post(web, "/queues/key-rates", {"do": "remove", "pattern": pattern}), "/queues?done=key_unrate")
    assert p.rates()["keys"] == {}
    assert "data-key-rate" not in web.get("/queues").text


# ---------------------------------------------------------------------- schedules


def test_the_schedules_page_shows_every_schedule(web: Web, backend: Backend) -> None:
    p = backend.processor
    p.schedule("nightly-report", cron="30 2 * * *", timezone="Europe/Paris", queue="reports",
               payload={"html": XSS}, misfire="all", backfill=3600)
    p.schedule("heartbeat", every=90, queue="pings", overlap="skip_if_running")
    p.pause("reports", reason="month end")
    page = web.get("/schedules")
    assert page.status_code == 200
    html = page.text
    assert 'href="/schedules"' in html  # its nav entry
    nightly = row(html, "schedule", "nightly-report")
    assert "<code>30 2 * * *</code>" in nightly and "Europe/Paris" in nightly
    assert 'href="/records?queue=reports"' in nightly and 'class="badge paused"' in nightly
    assert "month end" in nightly and "all" in nightly and "(backfill 1h)" in nightly and ">allow</td>" in nightly
    next_fire = p.list_schedules()[1]["next_fire"]
    assert next_fire.strftime("%Y-%m-%d %H:%M:%S UTC") in nightly and next_fire.minute == 30
    assert ESCAPED in nightly and XSS not in html  # the payload, as text
    heartbeat = row(html, "schedule", "heartbeat")
    assert "every 1m 30s" in heartbeat and "skip_if_running" in heartbeat and "never" in heartbeat
    assert 'class="badge paused"' not in heartbeat
    with client_of(dashboard(p, hide_payloads=True)) as hidden:
        assert "month end" in hidden.get("/schedules").text and "alert(1)" not in hidden.get("/schedules").text


def test_an_empty_schedules_page_says_where_schedules_come_from(web: Web) -> None:
    assert "No schedule: they are declared in code" in web.get("/schedules").text


def fire_until_added(web: Web, backend: Backend) -> int:
    """Fire the due schedules from the page until a tick was due: the fake clock moved past it in memory; a
    bounded poll on a database (an every-second schedule is due within a second)."""
    if backend.advance is not None:
        backend.advance(2)

    def fired() -> int:
        answer = post(web, "/schedules/fire", {"do": "fire"})
        assert answer.status_code == 303 and answer.headers["location"].startswith("/schedules?done=fire&n=")
        return int(answer.headers["location"].rsplit("=", 1)[1])

    return int(wait_until(fired, timeout=15, interval=0.1, message="a schedule fired from the dashboard"))


def test_firing_due_schedules_and_removing_one_confirmed(web: Web, backend: Backend) -> None:
    p = backend.processor
    p.schedule("every-second", every=1, queue="ticks", payload={"tick": True})
    p.schedule("yearly", cron="0 0 1 1 *", queue="ticks")
    assert fire_until_added(web, backend) == 1  # misfire latest: one record however many ticks passed
    assert p.get_queue_status("ticks")["queues"]["ticks"]["pending"] == 1
    page = web.get("/schedules?done=fire&n=1").text
    assert "Fired the due schedules: 1 record(s) added" in page
    line = row(page, "schedule", "every-second")
    last = p.list_schedules()[0]
    assert last["name"] == "every-second" and last["fired"] == 1
    assert f'href="/records/{last["last_record_id"]}"' in line and "never" not in line
    assert re.search(r'<td class="n">1</td>', line)

    confirm = post(web, "/schedules/remove", {"name": "yearly"})
    assert confirm.status_code == 200 and "Remove schedule <strong>yearly</strong>" in confirm.text
    assert [s["name"] for s in p.list_schedules()] == ["every-second", "yearly"]  # not before it is confirmed
    assert '<input type="hidden" name="confirm" value="1">' in confirm.text
    done(post(web, "/schedules/remove", {"name": "yearly", "confirm": "1"}), "/schedules?done=unschedule")
    assert [s["name"] for s in p.list_schedules()] == ["every-second"]
    assert 'data-schedule="yearly"' not in web.get("/schedules").text
    done(post(web, "/schedules/remove", {"name": "yearly", "confirm": "1"}), "/schedules?done=no_schedule")
    unknown = post(web, "/schedules/remove", {"name": "yearly"})
    assert unknown.status_code == 404 and "no schedule named" in unknown.text


# ---------------------------------------------------------------------- refusals

ACTIONS = [
    ("/queues/action", {"do": "pause", "queue": "emails", "reason": "r"}),
    ("/queues/action", {"do": "resume", "queue": "emails"}),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "5"}),
    ("/queues/action", {"do": "unrate", "queue": "emails"}),
    ("/queues/key-rates", {"do": "set", "pattern": "k-*", "n": "5"}),
    ("/queues/key-rates", {"do": "remove", "pattern": "k-*"}),
    ("/schedules/fire", {"do": "fire"}),
    ("/schedules/remove", {"name": "nightly", "confirm": "1"}),
]


def control_state(p: Any) -> tuple[Any, ...]:
    return p.paused_queues(), p.rates(), [(s["name"], s["fired"]) for s in p.list_schedules()]


def set_up_control(p: Any) -> None:
    p.add_records([{"n": 1}], queue="emails")
    p.pause("emails", reason="held")
    p.set_queue_rate("reports", 2)
    p.set_key_rate("k-*", 1)
    p.schedule("nightly", cron="0 3 * * *", queue="emails")


def test_read_only_hides_and_refuses_every_control_action(backend: Backend) -> None:
    p = backend.processor
    set_up_control(p)
    before = control_state(p)
    with client_of(dashboard(p, read_only=True)) as client:
        for path in ("/", "/queues", "/schedules"):
            html = client.get(path).text
            assert 'method="post"' not in html and "<button" not in html, path
            assert "read-only" in html
        assert 'class="badge paused"' in client.get("/queues").text  # the state is still shown
        assert 'data-schedule="nightly"' in client.get("/schedules").text
        for path, form in ACTIONS:
            answer = post(client, path, form)
            assert answer.status_code == 403 and "read-only" in answer.text, path
    assert control_state(p) == before


def test_control_actions_are_refused_cross_origin(web: Web, backend: Backend) -> None:
    p = backend.processor
    set_up_control(p)
    before = control_state(p)
    for path, form in ACTIONS:
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
            answer = web.post(path, data=form, headers=headers, follow_redirects=False)
            assert answer.status_code == 403 and "cross-origin" in answer.text, (path, headers)
    assert web.get("/schedules/fire").status_code == 405  # a GET never acts
    assert control_state(p) == before


BAD = [
    ("/queues/action", {"do": "freeze", "queue": "emails"}, "do must be one of"),
    ("/queues/action", {"do": "pause"}, "queue is required"),
    ("/queues/action", {"do": "pause", "queue": "a\x00b"}, "control characters"),
    ("/queues/action", {"do": "pause", "queue": "q" * 201}, "longer than 200"),
    ("/queues/action", {"do": "pause", "queue": "emails", "until": "soon"}, "until must be a duration"),
    ("/queues/action", {"do": "pause", "queue": "emails", "until": "-5"}, "until must be a duration"),
    ("/queues/action", {"do": "pause", "queue": "emails", "until": "0"}, "until must be above zero"),
    ("/queues/action", {"do": "pause", "queue": "emails", "until": "99999999999d"}, "until must be above zero"),
    ("/queues/action", {"do": "pause", "queue": "emails", "reason": "line\nbreak"}, "control characters"),
    ("/queues/action", {"do": "pause", "queue": "emails", "reason": "r" * 1001}, "longer than 1000"),
    ("/queues/action", {"do": "rate", "queue": "emails"}, "n is required"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "<b>"}, "n must be a positive integer"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "0"}, "n must be between 1 and"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "2.5"}, "n must be a positive integer"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "99999999999"}, "n must be between 1 and"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "5", "per": "0"}, "per must be above zero"),
    ("/queues/action", {"do": "rate", "queue": "emails", "n": "5", "per": "1 fortnight"}, "per must be a duration"),
    ("/queues/key-rates", {"do": "set", "n": "5"}, "pattern is required"),
    ("/queues/key-rates", {"do": "set", "pattern": "k" * 513, "n": "5"}, "longer than 512"),
    ("/queues/key-rates", {"do": "set", "pattern": "k-*", "n": "x"}, "n must be a positive integer"),
    ("/queues/key-rates", {"do": "toggle", "pattern": "k-*"}, "do must be one of"),
    ("/schedules/remove", {"confirm": "1"}, "name is required"),
    ("/schedules/remove", {"name": "n\x01"}, "control characters"),
]


def test_bad_control_values_are_a_400_with_a_message(web: Web, backend: Backend) -> None:
    p = backend.processor
    set_up_control(p)
    before = control_state(p)
    for path, form, message in BAD:
        answer = post(web, path, form)
        assert answer.status_code == 400, (path, form, answer.status_code)
        assert message in answer.text, (path, form, answer.text[-600:])
        assert "<b>" not in answer.text
    assert control_state(p) == before
