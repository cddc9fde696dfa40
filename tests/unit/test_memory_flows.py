"""The in-memory flows' paths no public call reaches (tests/conformance/test_flows.py covers the rest on every
backend): a waiting record whose parents all finished without settling it (a defect, made here by moving a
parent behind the twin's back) is found and repaired as dp_flow_repair does, counted by the maintenance
sweep; finished runs go with their edges and results after the retention."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from core.flows import Flow, FlowRun
from core.flows.store import CountedStep
from core.record import Record
from core.testing import FakeClock, InMemoryProcessor

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _noop(record: Record) -> None:
    return None


@pytest.fixture
def p() -> Iterator[InMemoryProcessor]:
    with InMemoryProcessor(clock=FakeClock(T0), retention=60.0) as processor:
        yield processor


def make(spec: dict[str, dict[str, object]]) -> Flow:
    flow = Flow("repairs")
    for name, options in spec.items():
        flow.step(_noop, name=name, **options)
    return flow


def end_unsettled(p: InMemoryProcessor, rid: int, status: str, result: object = None) -> None:
    """Finish a record without the settle its statement would run (the defect a lost settle would leave)."""
    t = p.tables
    with t.lock:
        row = t.rows[rid]
        t.move(row, status)
        row.finished_at = t.now()
        if status == "completed":
            row.result = json.dumps(result)


def sweep(p: InMemoryProcessor) -> int:
    """The maintenance step of a run that repairs defects, called once."""
    run = p.store.for_run(claimers=1, handler_slots=0, listen_to=[])
    (step,) = [s for s in run.maintenance() if isinstance(s, CountedStep)]
    assert step.metric == "flow_repairs"
    return step()


def statuses(p: InMemoryProcessor, run: FlowRun) -> dict[str, list[str]]:
    found = p.flow_status(run.id)
    assert found is not None
    return {k: [r["status"] for r in v] for k, v in found["steps"].items()}


def test_a_waiting_record_whose_parents_finished_is_released(p: InMemoryProcessor) -> None:
    run = p.start_flow(make({"a": {}, "b": {"after": ["a"]}, "c": {"after": ["b"]}}), {})
    assert p.store.flows.defects() == (None, [])
    end_unsettled(p, run.ids["a"], "completed", {"v": 1})
    assert p.store.flows.defects() == (None, [run.ids["b"]])
    assert sweep(p) == 1 and sweep(p) == 0
    (b,) = p.claim_records(10, queues=["repairs"])
    assert (b.id, b.parents) == (run.ids["b"], {"a": {"v": 1}})
    assert statuses(p, run)["c"] == ["waiting"]


def test_a_defect_whose_parent_failed_is_cancelled_and_settles_its_run(p: InMemoryProcessor) -> None:
    run = p.start_flow(make({"a": {}, "b": {"after": ["a"]}, "c": {"after": ["b"]}}), {})
    end_unsettled(p, run.ids["a"], "failed")
    assert sweep(p) == 1
    status = p.flow_status(run.id)
    assert status is not None
    assert statuses(p, run) == {"a": ["failed"], "b": ["cancelled"], "c": ["cancelled"]}
    assert status["steps"]["b"][0]["last_error"] == "dependency failed (repaired)"
    assert status["steps"]["c"][0]["last_error"] == "dependency b cancelled"
    assert (status["status"], status["failed_step"]) == ("failed", "b")  # the repair settles b, as SQL's


def test_a_placeholder_defect_fans_out_from_its_sources_stored_result(p: InMemoryProcessor) -> None:
    run = p.start_flow(make({"split": {}, "each": {"for_each": "split"}, "merge": {"after": ["each"]}}), {})
    end_unsettled(p, run.ids["split"], "completed", ["x", "y"])
    assert sweep(p) == 1
    each = p.claim_records(10, queues=["repairs"])
    assert [(r.step, r.payload) for r in each] == [("each", "x"), ("each", "y")]
    p.mark_completed([r._replace(result=json.dumps(r.payload.upper())) for r in each])
    (merge,) = p.claim_records(10, queues=["repairs"])
    assert merge.parents == {"each": ["X", "Y"]}


def test_finished_runs_go_after_the_retention_unfinished_ones_stay(p: InMemoryProcessor) -> None:
    flow = make({"a": {}})
    done, running = p.start_flow(flow, {}), p.start_flow(flow, {})
    first = p.claim_records(1, queues=["repairs"])
    p.mark_completed([first[0]._replace(result="1")])
    clock = p.clock
    assert clock is not None
    clock.advance(30)
    assert p.store.retain() == 0
    clock.advance(31)
    assert p.store.retain() == 2  # the finished record, then its run
    assert p.flow_status(done.id) is None and p.flow_status(running.id) is not None
    assert [r["id"] for r in p.list_flow_runs()] == [running.id]
