"""Flows on every backend: chains, diamonds, for_each fan-out and fan-in, results passed to children, failure
policies, on_failure, retries, cancel_flow, dedupe, template versions, invalid templates, observation,
start_flow in the application's transaction, and run(flow) end to end.

Records are driven through the manual API (claim_records, mark_completed with ``record._replace(result=...)``,
mark_failed), so each test decides the order things happen in; ``run(flow)`` drives the end-to-end ones. The
flow methods go through the asyncio API on the async backend (see ``call``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from core import RetryPolicy
from core.api import ProcessorAPI
from core.errors import FlowDefinitionChanged, FlowDefinitionError
from core.flows import Flow, FlowRun
from core.record import Record
from core.testing import NoDatabase
from tests.conformance.conftest import AsyncBacked, Clock, ids

STEP_KEYS = {"id", "status", "attempts", "max_attempts", "last_error", "result", "index", "queue", "created_at",
             "finished_at"}
RUN_KEYS = {"id", "flow", "version", "status", "input", "dedupe_key", "unfinished", "failed_step", "error",
            "on_failure_id", "created_at", "updated_at", "finished_at", "steps"}


def _noop(record: Record) -> None:
    return None


def call(processor: ProcessorAPI, name: str) -> Callable[..., Any]:
    """The processor's flow method ``name``: on the async backend the asyncio API's, awaited on its loop."""
    if isinstance(processor, AsyncBacked):
        method = getattr(processor._aio, name)
        loop = processor._loop
        return lambda *a, **kw: asyncio.run_coroutine_threadsafe(method(*a, **kw), loop).result(60)
    return getattr(processor, name)  # type: ignore[no-any-return]


def start(processor: ProcessorAPI, flow: Flow, run_input: dict[str, Any] | None = None, **kw: Any) -> FlowRun:
    run: FlowRun = call(processor, "start_flow")(flow, {} if run_input is None else run_input, **kw)
    return run


def status(processor: ProcessorAPI, run_id: int) -> dict[str, Any]:
    found: dict[str, Any] | None = call(processor, "flow_status")(run_id)
    assert found is not None, f"no run {run_id}"
    return found


def steps(processor: ProcessorAPI, run_id: int) -> dict[str, list[str]]:
    """Each step's records' statuses."""
    return {k: [r["status"] for r in v] for k, v in status(processor, run_id)["steps"].items()}


def make(name: str, spec: dict[str, dict[str, Any]], *, version: int = 1, on_failure: bool = False) -> Flow:
    """A template of steps named by ``spec`` (step name: its options), functions that do nothing."""
    flow = Flow(name, version=version)
    for step, options in spec.items():
        flow.step(_noop, name=step, **options)
    if on_failure:
        flow.on_failure(_noop, name="refund")
    return flow


def claim(processor: ProcessorAPI, queue: str, n: int = 500) -> list[Record]:
    return processor.claim_records(n, queues=[queue])


def complete(processor: ProcessorAPI, *pairs: tuple[Record, Any]) -> int:
    """Complete records with their results (what the worker does with a step's return value)."""
    return processor.mark_completed([rec._replace(result=json.dumps(value)) for rec, value in pairs])


def waiting(processor: ProcessorAPI, queue: str) -> dict[str, int]:
    row = processor.get_queue_status(queue)["queues"].get(queue, {})
    return {s: row.get(s, 0) for s in ("pending", "processing", "waiting", "completed", "failed", "cancelled")}


# ---------------------------------------------------------------------- shapes of runs


def test_a_chain_releases_each_step_when_its_parent_completes(processor: ProcessorAPI) -> None:
    flow = make("chain", {"a": {}, "b": {"after": ["a"]}, "c": {"after": ["b"]}})
    run = start(processor, flow, {"order": 7})
    assert not run.deduplicated and set(run.ids) == {"a", "b", "c"}
    assert waiting(processor, "chain") == {"pending": 1, "processing": 0, "waiting": 2, "completed": 0,
                                           "failed": 0, "cancelled": 0}
    assert processor.get_queue_status()["totals"]["waiting"] == 2
    (a,) = claim(processor, "chain")
    assert (a.id, a.step, a.flow_run, a.parents, a.payload) == (run.ids["a"], "a", run.id, {}, {"order": 7})
    assert claim(processor, "chain") == []  # b waits for a
    result = {"z": 1, "a": [1.5, None, "x", True], "nested": {"k": "v"}}
    assert complete(processor, (a, result)) == 1
    (b,) = claim(processor, "chain")
    assert (b.id, b.step, b.payload, b.parents) == (run.ids["b"], "b", {"order": 7}, {"a": result})
    assert claim(processor, "chain") == []
    complete(processor, (b, None))
    (c,) = claim(processor, "chain")
    assert (c.step, c.parents) == ("c", {"b": None})
    assert status(processor, run.id)["status"] == "running"
    complete(processor, (c, "done"))
    st = status(processor, run.id)
    assert (st["status"], st["unfinished"], st["failed_step"], st["error"]) == ("completed", 0, None, None)
    assert st["finished_at"] is not None
    assert {k: [(r["status"], r["attempts"], r["result"]) for r in v] for k, v in st["steps"].items()} == {
        "a": [("completed", 1, result)], "b": [("completed", 1, None)], "c": [("completed", 1, "done")]}
    assert waiting(processor, "chain")["waiting"] == 0


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "one-batch"])
def test_a_diamond_joins_when_both_branches_completed(processor: ProcessorAPI, together: bool) -> None:
    flow = make("diamond", {"a": {}, "b": {"after": ["a"]}, "c": {"after": ["a"]}, "d": {"after": ["b", "c"]}})
    run = start(processor, flow, {"n": 1})
    (a,) = claim(processor, "diamond")
    complete(processor, (a, 1))
    b, c = claim(processor, "diamond")
    assert (b.step, c.step, b.parents, c.parents) == ("b", "c", {"a": 1}, {"a": 1})
    if together:  # one statement completes both parents of d: both are subtracted
        assert complete(processor, (b, "B"), (c, "C")) == 2
    else:
        complete(processor, (c, "C"))
        assert claim(processor, "diamond") == []  # d still waits for b
        assert waiting(processor, "diamond")["waiting"] == 1
        complete(processor, (b, "B"))
    (d,) = claim(processor, "diamond")
    assert (d.id, d.parents) == (run.ids["d"], {"b": "B", "c": "C"})
    assert claim(processor, "diamond") == []  # released once
    complete(processor, (d, None))
    assert status(processor, run.id)["status"] == "completed"


@pytest.mark.parametrize("n", [0, 1, 100])
def test_for_each_fans_out_per_element_and_fans_in_in_element_order(processor: ProcessorAPI, n: int) -> None:
    flow = make("fan", {"split": {}, "each": {"for_each": "split"}, "merge": {"after": ["each"]}})
    run = start(processor, flow, {"file": "f"})
    assert set(run.ids) == {"split", "each", "merge"}
    assert "each" not in status(processor, run.id)["steps"]  # its placeholder: records come with the source
    (split,) = claim(processor, "fan")
    elements = [{"part": i} for i in range(n)]
    complete(processor, (split, elements))
    if n == 0:  # no element: the fan-in is released at once with []
        (merge,) = claim(processor, "fan")
        assert (merge.step, merge.parents) == ("merge", {"each": []})
        complete(processor, (merge, "merged"))
        st = status(processor, run.id)
        assert st["status"] == "completed"
        assert [r["status"] for r in st["steps"]["each"]] == ["completed"]
        return
    assert waiting(processor, "fan")["pending"] == n and waiting(processor, "fan")["waiting"] == 1
    each = claim(processor, "fan")
    assert [r.step for r in each] == ["each"] * n
    assert [r.payload for r in each] == elements  # claim order is element order
    assert all(r.parents == {"split": elements} for r in each)
    assert each[0].id == run.ids["each"]  # the first element is the placeholder's record
    # Completed in reverse, the last one alone: the fan-in waits for every element.
    for rec in reversed(each[1:]):
        complete(processor, (rec, rec.payload["part"] * 10))
    assert claim(processor, "fan") == []
    complete(processor, (each[0], 0))
    (merge,) = claim(processor, "fan")
    assert merge.parents == {"each": [i * 10 for i in range(n)]}
    complete(processor, (merge, None))
    st = status(processor, run.id)
    assert st["status"] == "completed" and st["unfinished"] == 0
    assert [(r["index"], r["result"]) for r in st["steps"]["each"]] == [(i, i * 10) for i in range(n)]


@pytest.mark.parametrize(("result", "kind"), [({"a": 1}, "object"), ("x", "string"), (None, "missing")])
def test_a_for_each_source_whose_result_is_no_list_fails_the_run(processor: ProcessorAPI, result: Any,
                                                                  kind: str) -> None:
    flow = make("nolist", {"split": {}, "each": {"for_each": "split"}, "merge": {"after": ["each"]}})
    run = start(processor, flow)
    (split,) = claim(processor, "nolist")
    if result is None:  # completed with no result at all (the worker always gives one)
        assert processor.mark_completed([split]) == 1
    else:
        complete(processor, (split, result))
    st = status(processor, run.id)
    error = f"for_each: the result its source gave is {kind}, not a list"
    assert {k: [(r["status"], r["last_error"]) for r in v] for k, v in st["steps"].items()} == {
        "split": [("completed", None)], "each": [("failed", error)],
        "merge": [("cancelled", "dependency each failed")]}
    assert (st["status"], st["failed_step"], st["error"], st["unfinished"]) == ("failed", "each", error, 0)
    assert claim(processor, "nolist") == []


# ---------------------------------------------------------------------- failure


def test_a_failed_step_cancels_its_waiting_descendants_and_fails_the_run(processor: ProcessorAPI) -> None:
    flow = make("cascade", {"a": {}, "b": {"after": ["a"], "max_attempts": 1}, "c": {"after": ["b"]},
                            "d": {"after": ["c"]}, "e": {"after": ["a"]}})
    run = start(processor, flow)
    (a,) = claim(processor, "cascade")
    complete(processor, (a, 1))
    b, e = claim(processor, "cascade")
    assert (b.step, e.step) == ("b", "e")
    assert processor.mark_failed([b], RuntimeError("boom")) == 1
    st = status(processor, run.id)
    assert {k: [(r["status"], r["last_error"]) for r in v] for k, v in st["steps"].items() if k != "e"} == {
        "a": [("completed", None)], "b": [("failed", "RuntimeError: boom")],
        "c": [("cancelled", "dependency b failed")], "d": [("cancelled", "dependency c cancelled")]}
    assert (st["status"], st["failed_step"], st["error"]) == ("failed", "b", "RuntimeError: boom")
    ended = st["finished_at"]
    assert ended is not None and st["unfinished"] == 1  # the run ended at its failure; e still runs
    assert waiting(processor, "cascade") == {"pending": 0, "processing": 1, "waiting": 0, "completed": 1,
                                             "failed": 1, "cancelled": 2}
    complete(processor, (e, "E"))
    st = status(processor, run.id)
    assert (st["status"], st["unfinished"], st["finished_at"]) == ("failed", 0, ended)
    assert st["steps"]["e"][0]["result"] == "E"


def test_on_dependency_failure_run_lets_a_child_run_without_the_failed_parent(processor: ProcessorAPI) -> None:
    flow = make("tolerant", {
        "a": {}, "b": {"after": ["a"], "max_attempts": 1},
        "c": {"after": ["a", "b"], "on_dependency_failure": "run"},
        "each": {"for_each": "b", "on_dependency_failure": "run"},
        "merge": {"after": ["each"]}})
    run = start(processor, flow)
    (a,) = claim(processor, "tolerant")
    complete(processor, (a, {"x": 1}))
    (b,) = claim(processor, "tolerant")
    processor.mark_failed([b], "gave up", retry=False)
    c, merge = claim(processor, "tolerant")
    assert (c.step, c.parents) == ("c", {"a": {"x": 1}})  # b failed: no result of it
    assert (merge.step, merge.parents) == ("merge", {"each": []})  # for_each over a failed source: no element
    complete(processor, (c, None), (merge, None))
    st = status(processor, run.id)
    assert steps(processor, run.id) == {"a": ["completed"], "b": ["failed"], "c": ["completed"],
                                        "each": ["completed"], "merge": ["completed"]}
    assert (st["status"], st["failed_step"], st["unfinished"]) == ("failed", "b", 0)


def test_a_fan_in_that_runs_without_a_failed_element_gets_null_in_its_place(processor: ProcessorAPI) -> None:
    flow = make("holes", {"split": {}, "each": {"for_each": "split", "max_attempts": 1},
                          "merge": {"after": ["each"], "on_dependency_failure": "run"},
                          "strict": {"after": ["each"]}})
    run = start(processor, flow)
    (split,) = claim(processor, "holes")
    complete(processor, (split, ["p", "q", "r"]))
    p, q, r = claim(processor, "holes")
    assert [x.payload for x in (p, q, r)] == ["p", "q", "r"]
    processor.mark_failed([q], RuntimeError("bad part"))
    assert steps(processor, run.id)["strict"] == ["cancelled"]
    complete(processor, (r, "R"))
    assert claim(processor, "holes") == []  # merge still waits for p
    complete(processor, (p, "P"))
    (merge,) = claim(processor, "holes")
    assert (merge.step, merge.parents) == ("merge", {"each": ["P", None, "R"]})
    complete(processor, (merge, None))
    st = status(processor, run.id)
    assert (st["status"], st["failed_step"], st["unfinished"]) == ("failed", "each", 0)


def test_on_failure_runs_once_with_the_results_of_the_finished_steps(processor: ProcessorAPI) -> None:
    flow = make("refunds", {"a": {}, "b": {"after": ["a"], "max_attempts": 1},
                            "c": {"after": ["a"], "max_attempts": 1}, "d": {"after": ["a"]},
                            "e": {"after": ["b"]}}, on_failure=True)
    run = start(processor, flow, {"order": 3})
    assert "refund" not in run.ids
    (a,) = claim(processor, "refunds")
    complete(processor, (a, "A"))
    b, c, d = claim(processor, "refunds")
    complete(processor, (d, "D"))
    processor.mark_failed([b], RuntimeError("first"))
    processor.mark_failed([c], RuntimeError("second"))  # the run failed already: no second on_failure
    (refund,) = claim(processor, "refunds")
    assert (refund.step, refund.flow_run, refund.payload) == ("refund", run.id, {"order": 3})
    assert refund.parents == {"a": "A", "d": "D"}
    assert claim(processor, "refunds") == []
    st = status(processor, run.id)
    assert (st["status"], st["failed_step"], st["error"]) == ("failed", "b", "RuntimeError: first")
    assert st["on_failure_id"] == refund.id and len(st["steps"]["refund"]) == 1
    assert st["steps"]["e"][0]["last_error"] == "dependency b failed"
    assert st["finished_at"] is not None and st["unfinished"] == 1  # ended at its failure; refund to run
    complete(processor, (refund, "refunded"))
    st = status(processor, run.id)
    assert (st["status"], st["unfinished"]) == ("failed", 0)
    assert st["steps"]["refund"][0]["result"] == "refunded"


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0, jitter=0))
def test_a_retried_step_does_not_rerun_its_parents_or_touch_its_children(processor: ProcessorAPI) -> None:
    flow = make("retry", {"a": {}, "b": {"after": ["a"], "max_attempts": 3}, "c": {"after": ["b"]}})
    run = start(processor, flow)
    (a,) = claim(processor, "retry")
    complete(processor, (a, 7))
    for attempt in (1, 2):
        (b,) = claim(processor, "retry")
        assert (b.step, b.attempts, b.parents) == ("b", attempt, {"a": 7})
        assert processor.mark_failed([b], RuntimeError(f"try {attempt}")) == 1
        assert waiting(processor, "retry")["waiting"] == 1  # c still waits: a retry settles nothing
        assert steps(processor, run.id)["c"] == ["waiting"]
    (b,) = claim(processor, "retry")
    assert (b.step, b.attempts) == ("b", 3)
    complete(processor, (b, 8))
    (c,) = claim(processor, "retry")
    assert c.parents == {"b": 8}
    complete(processor, (c, 9))
    st = status(processor, run.id)
    assert {k: [(r["status"], r["attempts"]) for r in v] for k, v in st["steps"].items()} == {
        "a": [("completed", 1)], "b": [("completed", 3)], "c": [("completed", 1)]}
    assert st["status"] == "completed"


@pytest.mark.dp_options(lease_seconds=0.5)
def test_a_stale_holder_settles_nothing(processor: ProcessorAPI, clock: Clock) -> None:
    flow = make("stale", {"a": {}, "b": {"after": ["a"]}})
    start(processor, flow)
    (stale,) = claim(processor, "stale")
    assert clock.until(lambda: processor.cleanup_orphaned_records() == 1, after=0.6)
    (current,) = claim(processor, "stale")
    assert (current.id, current.attempts) == (stale.id, 2)
    assert complete(processor, (stale, "stale")) == 0
    assert claim(processor, "stale") == [] and waiting(processor, "stale")["waiting"] == 1
    assert complete(processor, (current, "current")) == 1
    (b,) = claim(processor, "stale")
    assert b.parents == {"a": "current"}


@pytest.mark.dp_options(lease_seconds=0.5, max_attempts=1)
def test_a_step_recovered_to_failed_cancels_its_children(processor: ProcessorAPI, clock: Clock) -> None:
    flow = make("lost", {"a": {}, "b": {"after": ["a"]}})
    run = start(processor, flow)
    (a,) = claim(processor, "lost")
    assert clock.until(lambda: processor.cleanup_orphaned_records() == 1, after=0.6)
    assert steps(processor, run.id) == {"a": ["failed"], "b": ["cancelled"]}
    st = status(processor, run.id)
    assert (st["status"], st["failed_step"], st["unfinished"]) == ("failed", "a", 0)
    assert "expired" in st["error"]
    assert complete(processor, (a, 1)) == 0


def test_cancelling_a_waiting_step_settles_its_run(processor: ProcessorAPI) -> None:
    flow = make("opcancel", {"a": {}, "b": {"after": ["a"]}, "c": {"after": ["b"]}})
    run = start(processor, flow)
    assert processor.cancel([run.ids["b"]]) == {run.ids["b"]: "cancelled"}
    assert steps(processor, run.id) == {"a": ["pending"], "b": ["cancelled"], "c": ["cancelled"]}
    st = status(processor, run.id)
    assert (st["status"], st["failed_step"], st["error"]) == ("failed", "b", "step b cancelled")
    assert st["steps"]["c"][0]["last_error"] == "dependency b cancelled"
    (a,) = claim(processor, "opcancel")
    complete(processor, (a, None))
    assert status(processor, run.id)["unfinished"] == 0


# ---------------------------------------------------------------------- operator actions


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0, jitter=0))
def test_cancel_flow_cancels_what_has_not_finished(processor: ProcessorAPI) -> None:
    flow = make("stop", {"a": {}, "x": {}, "y": {}, "b": {"after": ["a"]}, "c": {"after": ["b"]}},
                on_failure=True)
    run = start(processor, flow)
    a, x = processor.claim_records(2, queues=["stop"])
    assert (a.step, x.step) == ("a", "x")
    assert call(processor, "cancel_flow")(run.id) == "cancelled"
    st = status(processor, run.id)
    cancelled = ("cancelled", "flow run cancelled")
    assert {k: [(r["status"], r["last_error"]) for r in v] for k, v in st["steps"].items()} == {
        "a": [("processing", None)], "x": [("processing", None)], "y": [cancelled], "b": [cancelled],
        "c": [cancelled]}
    assert (st["status"], st["unfinished"]) == ("cancelled", 2) and st["finished_at"] is not None
    assert waiting(processor, "stop") == {"pending": 0, "processing": 2, "waiting": 0, "completed": 0,
                                          "failed": 0, "cancelled": 3}
    assert processor.extend_leases([a, x]) == ({a.id, x.id}, {a.id, x.id})  # the holders are told
    assert complete(processor, (a, 1)) == 1  # its outcome is cancelled
    assert processor.mark_failed([x], RuntimeError("retryable, but cancelled")) == 1
    st = status(processor, run.id)
    assert (st["steps"]["a"][0]["status"], st["steps"]["x"][0]["status"]) == ("cancelled", "cancelled")
    assert (st["status"], st["unfinished"]) == ("cancelled", 0)
    assert "refund" not in st["steps"] and claim(processor, "stop") == []  # no on_failure
    assert call(processor, "cancel_flow")(run.id) == "cancelled"
    assert call(processor, "cancel_flow")(run.id + 10_000) is None
    assert [r["id"] for r in call(processor, "list_flow_runs")(status="cancelled")] == [run.id]


def test_cancel_flow_leaves_a_finished_run_alone(processor: ProcessorAPI) -> None:
    flow = make("over", {"a": {}})
    run = start(processor, flow)
    (a,) = claim(processor, "over")
    complete(processor, (a, 1))
    assert call(processor, "cancel_flow")(run.id) == "completed"
    assert steps(processor, run.id) == {"a": ["completed"]}


def test_a_running_run_holds_its_dedupe_key(processor: ProcessorAPI) -> None:
    flow = make("dedupe", {"a": {}, "b": {"after": ["a"]}})
    first = start(processor, flow, {"n": 1}, dedupe_key="order-1")
    again = start(processor, flow, {"n": 2}, dedupe_key="order-1")
    assert (again.id, again.ids, again.deduplicated, first.deduplicated) == (first.id, first.ids, True, False)
    assert status(processor, first.id)["input"] == {"n": 1}
    other = start(processor, flow, {"n": 3}, dedupe_key="order-2")
    keyless = start(processor, flow, {"n": 4})
    assert len({first.id, other.id, keyless.id}) == 3 and not other.deduplicated
    assert waiting(processor, "dedupe")["pending"] == 3  # the duplicate wrote nothing
    assert len(call(processor, "list_flow_runs")(flow="dedupe")) == 3
    for _ in range(2):  # every run to its end
        complete(processor, *[(r, None) for r in claim(processor, "dedupe")])
    assert status(processor, first.id)["status"] == "completed"
    after = start(processor, flow, {"n": 5}, dedupe_key="order-1")  # a finished run holds no key
    assert not after.deduplicated and after.id not in (first.id, other.id, keyless.id)
    assert call(processor, "cancel_flow")(after.id) == "cancelled"
    last = start(processor, flow, {"n": 6}, dedupe_key="order-1")
    assert not last.deduplicated and last.id != after.id


def test_a_changed_definition_under_the_same_version_is_refused(processor: ProcessorAPI, backend: str,
                                                               request: pytest.FixtureRequest) -> None:
    flow = make("versioned", {"a": {}, "b": {"after": ["a"]}})
    run = start(processor, flow)
    same = make("versioned", {"a": {}, "b": {"after": ["a"]}})  # other functions, the same definition
    assert start(processor, same).id != run.id
    changes = [make("versioned", {"a": {}, "b": {"after": ["a"]}, "c": {"after": ["a"]}}),
               make("versioned", {"a": {}, "b": {}}),
               make("versioned", {"a": {"priority": 5}, "b": {"after": ["a"]}}),
               make("versioned", {"a": {}, "b": {"after": ["a"]}}, on_failure=True)]
    for changed in changes:
        with pytest.raises(FlowDefinitionChanged) as err:
            start(processor, changed)
        assert (err.value.flow, err.value.version) == ("versioned", 1)
    assert len(call(processor, "list_flow_runs")(flow="versioned")) == 2  # nothing written
    assert waiting(processor, "versioned") == {"pending": 2, "processing": 0, "waiting": 2, "completed": 0,
                                               "failed": 0, "cancelled": 0}
    v2 = make("versioned", {"a": {}, "b": {}}, version=2)
    run2 = start(processor, v2)
    assert (run2.version, status(processor, run2.id)["version"]) == (2, 2)
    assert status(processor, run.id)["version"] == 1  # a run keeps the version it started with


def test_invalid_templates_are_refused_where_they_are_defined(processor: ProcessorAPI) -> None:
    flow = Flow("bad")
    flow.step(_noop, name="a")
    refused: list[Callable[[], Any]] = [
        lambda: flow.step(_noop, name="a"),  # duplicate
        lambda: flow.step(_noop, name="b", after=["nope"]),  # unknown
        lambda: flow.step(_noop, name="c", after=["c"]),  # a cycle on itself
        lambda: flow.step(_noop, name="d", for_each="d"),
        lambda: flow.step(_noop, name="e", for_each="nope"),
        lambda: flow.step(_noop, name="f", after="a"),  # a string, not a list
        lambda: flow.step(_noop, name="g", on_dependency_failure="maybe"),
        lambda: flow.step(_noop, name="h", priority="high"),
        lambda: flow.step(_noop, name="i", max_attempts=0),
        lambda: flow.step(_noop, name="j", queue=""),
        lambda: flow.step(_noop, name="k", retry="fast"),
        lambda: flow.step(_noop, name="l", transactional="yes"),
        lambda: flow.step(_noop, name="m", ordering_key=5),
        lambda: flow.step(_noop, name=""),
        lambda: flow.on_failure(_noop, name="a"),  # the name of a step
        lambda: Flow("bad", version=0),
        lambda: Flow(""),
    ]
    for define in refused:
        with pytest.raises(FlowDefinitionError):
            define()
    assert list(flow.steps) == ["a"]  # nothing refused was added
    flow.on_failure(_noop, name="undo")
    with pytest.raises(FlowDefinitionError):
        flow.on_failure(_noop, name="undo2")  # defined twice
    with pytest.raises(FlowDefinitionError):
        start(processor, Flow("empty"))  # no step
    assert call(processor, "list_flow_runs")() == []


# ---------------------------------------------------------------------- observation and options


def test_flow_status_and_list_flow_runs_shapes(processor: ProcessorAPI) -> None:
    flow = make("shape", {"a": {}, "b": {"after": ["a"]}})
    run = start(processor, flow, {"k": [1, 2]})
    st = status(processor, run.id)
    assert set(st) == RUN_KEYS
    assert (st["id"], st["flow"], st["version"], st["status"], st["input"], st["unfinished"]) == (
        run.id, "shape", 1, "running", {"k": [1, 2]}, 2)
    assert set(st["steps"]) == {"a", "b"}
    for rows in st["steps"].values():
        (row,) = rows
        assert set(row) == STEP_KEYS
    assert (st["steps"]["a"][0]["status"], st["steps"]["b"][0]["status"]) == ("pending", "waiting")
    assert st["steps"]["a"][0]["id"] == run.ids["a"] and st["steps"]["a"][0]["attempts"] == 0
    assert call(processor, "flow_status")(run.id + 10_000) is None
    later = start(processor, make("shape2", {"a": {}}))
    runs = call(processor, "list_flow_runs")()
    assert [r["id"] for r in runs] == [later.id, run.id]  # newest first
    assert {"id", "flow", "version", "status", "failed_step", "error", "created_at", "finished_at"} <= set(runs[0])
    assert [r["id"] for r in call(processor, "list_flow_runs")(flow="shape")] == [run.id]
    assert [r["id"] for r in call(processor, "list_flow_runs")(limit=1)] == [later.id]
    assert call(processor, "list_flow_runs")(status="completed") == []


def test_a_step_takes_its_own_queue_priority_attempts_and_key(processor: ProcessorAPI) -> None:
    flow = make("opts", {"a": {"queue": "side", "priority": 5, "max_attempts": 2,
                               "ordering_key": lambda run_input: f"customer-{run_input['c']}"},
                         "b": {"after": ["a"]}})
    run = start(processor, flow, {"c": 7})
    assert claim(processor, "opts") == []
    assert waiting(processor, "opts")["waiting"] == 1 and waiting(processor, "side")["pending"] == 1
    (a,) = claim(processor, "side")
    assert (a.id, a.queue, a.priority, a.max_attempts, a.ordering_key) == (run.ids["a"], "side", 5, 2,
                                                                           "customer-7")
    complete(processor, (a, 1))
    (b,) = claim(processor, "opts")
    assert (b.queue, b.priority, b.ordering_key, b.parents) == ("opts", 0, None, {"a": 1})


def test_retention_keeps_the_records_of_unfinished_runs(processor: ProcessorAPI, clock: Clock) -> None:
    flow = make("kept", {"a": {}, "b": {"after": ["a"]}})
    run = start(processor, flow)
    (a,) = claim(processor, "kept")
    complete(processor, (a, "A"))
    clock.advance(0.15)
    assert processor.purge(0.1) == 0  # its run has not finished: b's parents read it
    (b,) = claim(processor, "kept")
    assert b.parents == {"a": "A"}
    complete(processor, (b, None))
    purged: list[int] = []
    assert clock.until(lambda: purged.append(processor.purge(0.1)) or sum(purged) >= 2, after=0.15)
    assert sum(purged) == 2 and status(processor, run.id)["steps"] == {}


def test_start_flow_in_the_application_transaction(processor: ProcessorAPI, backend: str) -> None:
    flow = make("tx", {"a": {}, "b": {"after": ["a"]}})
    if backend == "memory":
        with pytest.raises(NoDatabase):
            start(processor, flow, conn=object())
        assert call(processor, "list_flow_runs")() == []
        return
    dsn = processor.shards[0] if backend == "shards" else processor.dsn  # type: ignore[attr-defined]
    if backend == "async":
        assert isinstance(processor, AsyncBacked)

        async def in_transaction(commit: bool) -> tuple[FlowRun, Any]:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                run = await processor._aio.start_flow(flow, {"tx": commit}, conn=conn)
                outside = await processor._aio.flow_status(run.id)
                await (conn.commit() if commit else conn.rollback())
                return run, outside

        def started(commit: bool) -> tuple[FlowRun, Any]:
            return asyncio.run_coroutine_threadsafe(in_transaction(commit), processor._loop).result(60)
    else:
        def started(commit: bool) -> tuple[FlowRun, Any]:
            with psycopg.connect(dsn) as conn:
                run = start(processor, flow, {"tx": commit}, conn=conn)
                outside = call(processor, "flow_status")(run.id)
                if commit:
                    conn.commit()
                else:
                    conn.rollback()
                return run, outside

    rolled_back, outside = started(False)
    assert outside is None  # nobody sees it before the commit
    assert call(processor, "flow_status")(rolled_back.id) is None and claim(processor, "tx") == []
    kept, outside = started(True)
    assert outside is None
    assert status(processor, kept.id)["status"] == "running"
    (a,) = claim(processor, "tx")
    assert (a.id, a.payload) == (kept.ids["a"], {"tx": True})
    assert waiting(processor, "tx")["waiting"] == 1


# ---------------------------------------------------------------------- run(flow)


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0, jitter=0))
def test_run_works_a_flow_end_to_end(processor: ProcessorAPI) -> None:
    order = Flow("order", version=1)
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def note(record: Record) -> None:
        with lock:
            calls[record.step or ""] = calls.get(record.step or "", 0) + 1
            seen.setdefault(record.step or "", []).append(record.parents)

    @order.step()
    def validate(record: Record) -> list[int]:
        note(record)
        return [1, 2, 3]

    @order.step(after=[validate])
    def charge(record: Record) -> dict[str, int]:
        note(record)
        if calls["charge"] == 1:
            raise RuntimeError("card declined once")
        return {"charged": record.payload["amount"]}

    @order.step(after=[validate])
    def reserve(record: Record) -> str:
        note(record)
        return "reserved"

    @order.step(after=[charge, reserve])
    def ship(record: Record) -> None:
        note(record)

    @order.step(for_each=validate)
    def label(record: Record) -> int:
        note(record)
        return int(record.payload) * 10

    @order.step(after=[label])
    def pack(record: Record) -> None:
        note(record)

    @order.on_failure
    def refund(record: Record) -> None:
        note(record)

    run = start(processor, order, {"amount": 10})
    summary = processor.run(order, stop_when_empty=True, handle_signals=False)
    assert (summary.claimed, summary.processed, summary.retried, summary.failed) == (9, 8, 1, 0)
    assert calls == {"validate": 1, "charge": 2, "reserve": 1, "ship": 1, "label": 3, "pack": 1}
    assert seen["charge"] == [{"validate": [1, 2, 3]}] * 2
    assert seen["ship"] == [{"charge": {"charged": 10}, "reserve": "reserved"}]
    assert sorted(seen["label"], key=str) == [{"validate": [1, 2, 3]}] * 3
    assert seen["pack"] == [{"label": [10, 20, 30]}]
    st = status(processor, run.id)
    assert st["status"] == "completed"
    assert {k: [(r["status"], r["attempts"]) for r in v] for k, v in st["steps"].items()} == {
        "validate": [("completed", 1)], "charge": [("completed", 2)], "reserve": [("completed", 1)],
        "ship": [("completed", 1)], "label": [("completed", 1)] * 3, "pack": [("completed", 1)]}


def test_run_fails_a_flow_and_runs_its_on_failure_step_once(processor: ProcessorAPI) -> None:
    flow = Flow("failing", version=1)
    seen: dict[str, Any] = {}

    @flow.step()
    def a(record: Record) -> int:
        return 1

    @flow.step(after=[a], max_attempts=1)
    def b(record: Record) -> None:
        raise RuntimeError("boom")

    @flow.step(after=[a])
    def c(record: Record) -> int:
        return 3

    @flow.step(after=[b, c])
    def d(record: Record) -> None:
        seen["d"] = record.parents

    @flow.step(after=[a, b], on_dependency_failure="run")
    def e(record: Record) -> None:
        seen["e"] = record.parents

    @flow.on_failure
    def undo(record: Record) -> None:
        seen.setdefault("undo", []).append(record.parents)

    run = start(processor, flow, {"x": 1})
    processor.run(flow, stop_when_empty=True, handle_signals=False)
    st = status(processor, run.id)
    assert (st["status"], st["failed_step"], st["error"], st["unfinished"]) == (
        "failed", "b", "RuntimeError: boom", 0)
    assert steps(processor, run.id) == {"a": ["completed"], "b": ["failed"], "c": ["completed"],
                                        "d": ["cancelled"], "e": ["completed"], "undo": ["completed"]}
    assert "d" not in seen and seen["e"] == {"a": 1}
    (parents,) = seen["undo"]  # once; it sees what had completed when it was claimed
    assert parents["a"] == 1 and set(parents) <= {"a", "c", "e"}


def test_transactional_steps_commit_their_result_with_their_completion(processor: ProcessorAPI,
                                                                      backend: str) -> None:
    flow = Flow("txsteps", version=1)

    @flow.step(transactional=True)
    def ask(record: Record, conn: Any) -> int:
        return int(conn.execute("SELECT 41 + 1").fetchone()[0])

    @flow.step(after=[ask])
    def use(record: Record) -> Any:
        return record.parents

    run = start(processor, flow)
    if backend == "memory":  # a transactional step needs a database connection, as a transactional handler
        with pytest.raises(NoDatabase):
            processor.run(flow, stop_when_empty=True, handle_signals=False)
        assert steps(processor, run.id) == {"ask": ["pending"], "use": ["waiting"]}
        return
    processor.run(flow, stop_when_empty=True, handle_signals=False)
    st = status(processor, run.id)
    assert st["status"] == "completed"
    assert (st["steps"]["ask"][0]["result"], st["steps"]["use"][0]["result"]) == (42, {"ask": 42})


def test_get_queue_status_counts_waiting_records(processor: ProcessorAPI) -> None:
    flow = make("counted", {"a": {}, "b": {"after": ["a"]}, "c": {"after": ["a"], "queue": "other"}})
    start(processor, flow)
    start(processor, flow)
    status_now = processor.get_queue_status()
    assert status_now["queues"]["counted"]["waiting"] == 2 and status_now["queues"]["counted"]["pending"] == 2
    assert status_now["queues"]["other"]["waiting"] == 2 and status_now["queues"]["other"]["pending"] == 0
    assert status_now["totals"]["waiting"] == 4
    assert ids(claim(processor, "other")) == []
