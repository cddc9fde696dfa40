"""The dashboard's flow pages over every kind of processor (one database, three shards, the in-memory one): the
runs page (filters, keyset pages), a run's page (its steps as a graph with their states, its records, results
and input), cancelling a run (confirmed), the records page by flow run and waiting state, the record page's run,
the overview's waiting counts and failed runs; every refusal (read-only, cross-origin, bad values)."""

from __future__ import annotations

import html as htmllib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from core.web import dashboard
from tests.web.conftest import Web, client_of, post
from tests.web.flowseed import Runs, record_ids, run_status, seed_runs
from tests.web.seed import XSS
from tests.web.test_control import ESCAPED, Backend, done, row
from tests.web.test_routes import ids_on


@pytest.fixture(params=["one", "shards", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "one":
        return Backend("one", request.getfixturevalue("processor"))
    if request.param == "shards":
        return Backend("shards", request.getfixturevalue("dp_shards"))
    return Backend("memory", request.getfixturevalue("dp_memory"))


@pytest.fixture
def web(backend: Backend) -> Iterator[Web]:
    with client_of(dashboard(backend.processor)) as client:
        yield client


@pytest.fixture
def runs(backend: Backend) -> Runs:
    return seed_runs(backend.processor)


def runs_on(page: str) -> list[int]:
    """The run ids a flows page lists, in order."""
    return [int(i) for i in re.findall(r'<tr data-run="(\d+)"', page)]


def nodes(page: str) -> dict[str, str]:
    """The graph's steps with their classes (``state-failed failed-step``)."""
    return {htmllib.unescape(step): cls for cls, step in re.findall(r'<g class="node ([^"]*)" data-step="([^"]*)"',
                                                                   page)}


def older(page: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" rel="next">', page)
    return None if found is None else htmllib.unescape(found.group(1))


# ---------------------------------------------------------------------- the runs page


def test_the_runs_page_lists_the_latest_runs_filtered_by_flow_and_status(web: Web, runs: Runs) -> None:
    newest = [runs.running.id, runs.failed.id, runs.done.id]
    page = web.get("/flows").text
    assert runs_on(page) == newest and 'href="/flows"' in page  # the nav entry
    line = row(page, "run", str(runs.failed.id))
    assert "failed" in line and "charge" in line and ESCAPED in line and XSS not in page
    assert runs_on(web.get("/flows", params={"flow": "shop"}).text) == newest
    assert runs_on(web.get("/flows", params={"flow": "other"}).text) == []
    assert runs_on(web.get("/flows", params={"status": "failed"}).text) == [runs.failed.id]
    assert runs_on(web.get("/flows", params={"status": "running", "flow": "shop"}).text) == [runs.running.id]
    assert runs_on(web.get("/flows", params={"status": "cancelled"}).text) == []
    assert '<option value="shop">' in page  # the flows that ran, suggested in the filter


@pytest.mark.parametrize("query", [{}, {"flow": "shop"}, {"status": "completed"}, {"flow": "shop",
                                                                                      "status": "completed"}])
def test_runs_are_paged_by_keyset(web: Web, backend: Backend, query: dict[str, str]) -> None:
    p = backend.processor
    started = [p.start_flow(seed_flow(), {"items": [i]}).id for i in range(7)]
    if query.get("status") == "completed":
        p.run(seed_flow(), stop_when_empty=True, handle_signals=False)
    seen: list[int] = []
    url: str | None = "/flows?" + "&".join(f"{k}={v}" for k, v in {**query, "limit": "2"}.items())
    while url is not None:
        page = web.get(url)
        assert page.status_code == 200, page.text[-500:]
        got = runs_on(page.text)
        assert len(got) <= 2
        seen += got
        url = older(page.text)
        assert url is None or "newest" in web.get(url).text
    assert seen == sorted(started, reverse=True)


def seed_flow() -> Any:
    from tests.web.flowseed import shop

    return shop


# ---------------------------------------------------------------------- a run's page


def test_a_failed_run_shows_its_failed_step_in_the_graph(web: Web, runs: Runs) -> None:
    page = web.get(f"/flows/{runs.failed.id}")
    assert page.status_code == 200
    text = page.text
    assert nodes(text) == {"validate": "state-completed", "charge": "state-failed failed-step",
                           "reserve": "state-completed", "ship": "state-cancelled", "label": "state-completed",
                           "pack": "state-completed", "refund": "state-completed"}
    assert text.count('<path class="edge') == 6 and text.count('<path class="edge each"') == 1
    assert 'id="failed-step">charge<' in text
    assert f"ValueError: card declined {ESCAPED}" in text and XSS not in text  # the error, as text
    assert text.count("<script") == 2  # the dashboard's own two, from its static files
    assert ESCAPED in re.search(r'id="run-input">(.*?)</pre>', text, re.S).group(1)  # type: ignore[union-attr]
    assert "Cancel run" not in text  # it ended, nothing unfinished
    charge = row(text, "step", "charge")
    assert re.findall(r'<td class="n">(\d+)</td>', charge) == ["0", "0", "0", "0", "1", "0"]


def test_a_completed_run_shows_each_step_its_records_and_results(web: Web, runs: Runs) -> None:
    text = web.get(f"/flows/{runs.done.id}").text
    assert set(nodes(text).values()) == {"state-completed", "state-not-run"}
    assert nodes(text)["refund"] == "state-not-run"
    assert "3 elements completed" in text  # the for_each step's elements counted
    label = re.search(r'<section class="step" id="step-\d+" data-step="label">(.*?)</section>', text, re.S)
    assert label is not None and label.group(1).count("<tr data-record=") == 3
    assert "&#34;label for ink&#34;" in label.group(1) or "&quot;label for ink&quot;" in label.group(1)
    charge = re.search(r'<section class="step" id="step-\d+" data-step="charge">(.*?)</section>', text, re.S)
    assert charge is not None and f'&#34;note&#34;: &#34;{ESCAPED}&#34;' in charge.group(1).replace(
        "&quot;", "&#34;")  # the result pretty-printed, as text
    assert XSS not in text


def test_a_running_run_shows_what_waits(web: Web, runs: Runs) -> None:
    text = web.get(f"/flows/{runs.running.id}").text
    assert nodes(text) == {"validate": "state-pending", "charge": "state-waiting", "reserve": "state-waiting",
                           "ship": "state-waiting", "label": "state-waiting", "pack": "state-waiting",
                           "refund": "state-not-run"}
    assert "elements not known yet" in text and 'id="cancel-run"' in text


def test_unknown_and_bad_runs(web: Web, runs: Runs) -> None:
    missing = web.get(f"/flows/{runs.running.id + 1000}")
    assert missing.status_code == 404 and "no flow run" in missing.text
    for bad in ("abc", "0", "-1", "99999999999999999999", "cancel"):
        answer = web.get(f"/flows/{bad}")
        assert answer.status_code == 400 and "run must be" in answer.text, bad


# ---------------------------------------------------------------------- records, a record, the overview


def test_records_by_flow_run_and_the_waiting_state(web: Web, backend: Backend, runs: Runs) -> None:
    p = backend.processor
    expected = sorted(record_ids(p, runs.done), reverse=True)
    page = web.get("/records", params={"run": runs.done.id}).text
    assert ids_on(page) == expected and f'href="/flows/{runs.done.id}"' in page
    waiting = ids_on(web.get("/records", params={"state": "waiting"}).text)
    assert waiting == sorted(i for s, i in runs.running.ids.items() if s != "validate")[::-1]
    assert ids_on(web.get("/records", params={"run": runs.running.id, "state": "pending"}).text) == [
        runs.running.ids["validate"]]
    record = web.get(f"/records/{runs.failed.ids['charge']}").text
    found = re.search(r'id="flow-run">(.*?)</dd>', record, re.S)
    assert found is not None and f'href="/flows/{runs.failed.id}"' in found.group(1)
    assert "<strong>charge</strong>" in found.group(1)
    result = web.get(f"/records/{runs.done.ids['charge']}").text
    assert ESCAPED in re.search(r'id="result">(.*?)</pre>', result, re.S).group(1)  # type: ignore[union-attr]
    overview = web.get("/").text
    line = row(overview, "queue", "shop")
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", line, re.S)]
    assert cells[1:4] == ["1", "0", "5"]  # pending, processing, waiting
    failed = re.search(r'id="failed-runs">(.*?)</p>', overview, re.S)
    assert failed is not None and re.sub(r"<[^>]+>", "", failed.group(1)).split(":")[1].strip() == "1"


def test_payloads_hidden_hide_the_input_and_results(backend: Backend, runs: Runs) -> None:
    with client_of(dashboard(backend.processor, hide_payloads=True)) as client:
        text = client.get(f"/flows/{runs.done.id}").text
        assert "run-input" not in text and "label for" not in text and "reserved" not in text
        assert "Hidden (the dashboard runs with --hide-payloads)" in text
        record = client.get(f"/records/{runs.done.ids['reserve']}").text
        assert 'id="result"' not in record and "reserved" not in record


# ---------------------------------------------------------------------- cancel a run


def test_cancel_a_running_run_once_confirmed(web: Web, backend: Backend, runs: Runs) -> None:
    p = backend.processor
    confirm = post(web, "/flows/cancel", {"run": str(runs.running.id)})
    assert confirm.status_code == 200 and f"Cancel run <strong>{runs.running.id}</strong>" in confirm.text
    assert "6 unfinished record(s)" in confirm.text
    assert p.flow_status(runs.running.id)["status"] == "running"  # not before it is confirmed
    done(post(web, "/flows/cancel", {"run": str(runs.running.id), "confirm": "1"}),
         f"/flows/{runs.running.id}?done=flow_cancel")
    status = p.flow_status(runs.running.id)
    assert status["status"] == "cancelled"
    assert {r["status"] for rs in status["steps"].values() for r in rs} == {"cancelled"}
    page = web.get(f"/flows/{runs.running.id}?done=flow_cancel").text
    assert "Run cancelled" in page and 'id="cancel-run"' not in page
    assert set(nodes(page).values()) == {"state-cancelled", "state-not-run"}
    again = post(web, "/flows/cancel", {"run": str(runs.done.id), "confirm": "1"})
    done(again, f"/flows/{runs.done.id}?done=flow_ended")
    assert p.flow_status(runs.done.id)["status"] == "completed"
    unknown = post(web, "/flows/cancel", {"run": str(runs.running.id + 1000)})
    assert unknown.status_code == 404
    assert post(web, "/flows/cancel", {"run": str(runs.running.id + 1000), "confirm": "1"}).status_code == 404


def test_cancel_is_refused_read_only_and_cross_origin(web: Web, backend: Backend, runs: Runs) -> None:
    p = backend.processor
    form = {"run": str(runs.running.id), "confirm": "1"}
    with client_of(dashboard(p, read_only=True)) as client:
        for path in ("/flows", f"/flows/{runs.running.id}", f"/records?run={runs.running.id}"):
            page = client.get(path).text
            assert 'method="post"' not in page and 'name="do"' not in page and "Cancel run" not in page, path
        answer = post(client, "/flows/cancel", form)
        assert answer.status_code == 403 and "read-only" in answer.text
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
        answer = web.post("/flows/cancel", data=form, headers=headers, follow_redirects=False)
        assert answer.status_code == 403 and "cross-origin" in answer.text, headers
    assert web.get("/flows/cancel").status_code == 400  # a GET never acts (it reads run "cancel": a bad id)
    assert p.flow_status(runs.running.id)["status"] == "running"


BAD_PAGES = [
    ("/flows?status=%3Cx%3E", "unknown run status"),
    ("/flows?status=waiting", "unknown run status"),
    ("/flows?after=abc", "after must be a positive integer"),
    ("/flows?at=123", "at is only a cursor within one flow"),
    ("/flows?flow=shop&after=5", "after and at go together"),
    ("/flows?flow=shop&at=5", "after and at go together"),
    ("/flows?flow=shop&after=5&at=abc", "at must be a time"),
    ("/flows?flow=a%01b", "control characters"),
    ("/flows?flow=" + "f" * 201, "longer than 200"),
    ("/flows?limit=0", "limit must be between"),
    ("/flows?limit=501", "limit must be at most 500"),
    ("/records?run=abc", "run must be a positive integer"),
    ("/records?run=0", "run must be between"),
    ("/records?state=asleep", "unknown state"),
]


def test_bad_values_are_a_400_with_a_message(web: Web, runs: Runs) -> None:
    for path, message in BAD_PAGES:
        answer = web.get(path)
        assert answer.status_code == 400, (path, answer.status_code)
        assert message in answer.text, (path, answer.text[-600:])
    for form, message in (({}, "run must be a positive integer"), ({"run": "x<b>"}, "run must be a positive"),
                          ({"run": "-3", "confirm": "1"}, "run must be a positive integer")):
        answer = post(web, "/flows/cancel", form)
        assert answer.status_code == 400 and message in answer.text and "<b>" not in answer.text, form
    assert backend_unchanged(web, runs)


def backend_unchanged(web: Web, runs: Runs) -> bool:
    return 'id="cancel-run"' in web.get(f"/flows/{runs.running.id}").text


# ---------------------------------------------------------------------- a processor without flows


def test_a_store_without_flows_makes_the_pages_say_so(dp_memory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'MemoryStore' object has no attribute 'list_flow_runs'")

    for method in ("list_flow_runs", "flow_status"):
        monkeypatch.setattr(dp_memory, method, missing)
    dp_memory.add_records([{"n": 1}], queue="emails")
    with client_of(dashboard(dp_memory)) as client:
        page = client.get("/flows")
        assert page.status_code == 200 and "No flow runs to show" in page.text
        assert client.get("/flows/1").status_code == 404
        overview = client.get("/")
        assert overview.status_code == 200 and 'id="failed-runs"' not in overview.text
        assert client.get("/records/1").status_code == 200


def test_a_waiting_step_is_cancelled_from_its_record_page(web: Web, backend: Backend, runs: Runs) -> None:
    p = backend.processor
    rid = runs.running.ids["ship"]
    page = web.get(f"/records/{rid}").text
    assert 'value="cancel"' in page and 'value="retry"' not in page  # waiting: cancel is offered
    done(post(web, "/records/bulk", {"do": "cancel", "scope": "selected", "id": str(rid), "back": "record"}),
         f"/records/{rid}?done=cancel&n=1")
    steps = p.flow_status(runs.running.id)["steps"]
    assert [r["status"] for r in steps["ship"]] == ["cancelled"]
    assert run_status(p, runs.running.id) == "failed"  # a step cancelled fails its run, as cancel() does
    assert 'state-cancelled failed-step" data-step="ship"' in web.get(f"/flows/{runs.running.id}").text


@pytest.mark.parametrize("query", [{"status": "completed"}, {"flow": "shop", "status": "completed"}])
def test_a_walk_out_of_time_links_to_where_it_stopped(web: Web, backend: Backend, query: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import core.web.flowdata
    import core.web.pgflows

    p = backend.processor
    started = [p.start_flow(seed_flow(), {"items": [i]}).id for i in range(5)]
    p.run(seed_flow(), stop_when_empty=True, handle_signals=False)
    monkeypatch.setattr(core.web.pgflows, "RUN_WINDOW", 2)  # a window of two runs per statement
    monkeypatch.setattr(core.web.flowdata, "RUNS_BUDGET", -1.0)  # and no time for a second one
    seen: list[int] = []
    url: str | None = "/flows?" + "&".join(f"{k}={v}" for k, v in query.items())
    for _ in range(20):
        if url is None:
            break
        page = web.get(url)
        assert page.status_code == 200, page.text[-500:]
        seen += runs_on(page.text)
        url = older(page.text)
        if url is not None and backend.kind != "memory":
            assert "Searched down to" in page.text
    assert seen == sorted(started, reverse=True)
