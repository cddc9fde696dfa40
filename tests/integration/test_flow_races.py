"""Flows under concurrency on a real database: the last two parents of one child completed by two connections in
overlapping transactions (a barrier between them, both orders), a batch completing several parents of one
child, a stale instance completing nothing, and the waiting records' health check and repair."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor, Record
from core.flows import Flow
from tests.support import wait_until


def diamond(name: str) -> Flow:
    flow = Flow(name)

    @flow.step()
    def top(record: Record) -> int:
        return 1

    @flow.step(after=[top])
    def left(record: Record) -> str:
        return "L"

    @flow.step(after=[top])
    def right(record: Record) -> str:
        return "R"

    @flow.step(after=[left, right])
    def bottom(record: Record) -> None:
        return None

    return flow


def with_result(record: Record, value: Any) -> Record:
    return record._replace(result=json.dumps(value))


def claim_step(p: DistributedProcessor, step: str, queue: str) -> list[Record]:
    return [r for r in p.claim_records(100, queues=[queue]) if r.step == step]


def parents_claimed(p: DistributedProcessor, flow: Flow) -> tuple[int, Record, Record]:
    """A diamond run whose top completed, its left and right claimed: (run id, left, right)."""
    run = p.start_flow(flow, {"n": 1})
    (top,) = p.claim_records(10, queues=[flow.name])
    assert top.step == "top" and top.parents == {}
    assert p.mark_completed([with_result(top, 1)]) == 1
    claimed = {r.step: r for r in p.claim_records(10, queues=[flow.name])}
    assert set(claimed) == {"left", "right"}, claimed
    assert claimed["left"].parents == {"top": 1}
    return run.id, claimed["left"], claimed["right"]


def waiting_on(db: Any, record_id: int) -> tuple[str, int]:
    row = db.execute("SELECT status, waiting_on FROM processing_queue WHERE id = %s", (record_id,)).fetchone()
    return row[0], row[1]


def blocked_on_lock(db: Any, pid: int) -> bool:
    row = db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0] == "Lock")


@pytest.mark.parametrize("first", ["left", "right"])
def test_overlapping_completions_of_the_last_two_parents_release_the_child_once(
        dsn: str, db: Any, first: str) -> None:
    flow = diamond(f"race_{first}")
    with DistributedProcessor(dsn) as p:
        run_id, left, right = parents_claimed(p, flow)
        ids = p.flow_status(run_id)["steps"]
        (child_id,) = [r["id"] for r in ids["bottom"]]
        assert waiting_on(db, child_id) == ("waiting", 2)
        one, two = (left, right) if first == "left" else (right, left)
        with psycopg.connect(dsn) as c1, psycopg.connect(dsn) as c2:
            # c1 completes its parent and holds its transaction open: the child is locked, its count 1.
            assert p.complete_on(c1, [with_result(one, one.step)]) == 1
            done2 = threading.Event()
            outcome: dict[str, Any] = {}

            def second() -> None:
                try:
                    outcome["n"] = p.complete_on(c2, [with_result(two, two.step)])
                    c2.commit()
                except BaseException as exc:  # reported by the assertion below
                    outcome["error"] = exc
                finally:
                    done2.set()

            t = threading.Thread(target=second, daemon=True)
            t.start()
            # The barrier: c2's completion waits for the child's row lock c1 holds.
            wait_until(lambda: blocked_on_lock(db, c2.info.backend_pid), 10)
            assert not done2.is_set()
            assert waiting_on(db, child_id) == ("waiting", 2)  # nothing committed yet
            c1.commit()
            assert done2.wait(10)
            t.join(5)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["n"] == 1
        assert waiting_on(db, child_id) == ("pending", 0)
        claimed = p.claim_records(10, queues=[flow.name])
        assert [r.id for r in claimed] == [child_id]
        assert claimed[0].parents == {"left": "left", "right": "right"}
        assert p.claim_records(10, queues=[flow.name]) == []
        assert p.mark_completed(claimed) == 1
        assert p.flow_status(run_id)["status"] == "completed"


def test_one_batch_completing_both_parents_subtracts_both(dsn: str, db: Any) -> None:
    flow = diamond("batch")
    with DistributedProcessor(dsn) as p:
        _, left, right = parents_claimed(p, flow)
        assert p.mark_completed([with_result(left, "l"), with_result(right, "r")]) == 2
        (child,) = p.claim_records(10, queues=[flow.name])
        assert child.step == "bottom" and child.parents == {"left": "l", "right": "r"}
        assert p.claim_records(10, queues=[flow.name]) == []


def test_a_stale_instance_settles_nothing(dsn: str, db: Any) -> None:
    flow = diamond("stale")
    with DistributedProcessor(dsn, lease_seconds=1) as p:
        run_id, left, right = parents_claimed(p, flow)
        # The lease runs out and recovery hands left to another claim: the first holder's token is gone.
        db.execute("UPDATE processing_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                   (left.id,))
        assert p.cleanup_orphaned_records() == 1
        (again,) = claim_step(p, "left", flow.name)
        assert p.mark_completed([with_result(left, "stale")]) == 0  # fenced out
        assert p.mark_completed([with_result(right, "r")]) == 1
        (child_id,) = [r["id"] for r in p.flow_status(run_id)["steps"]["bottom"]]
        assert waiting_on(db, child_id) == ("waiting", 1)  # the stale completion decremented nothing
        assert p.mark_completed([with_result(again, "fresh")]) == 1
        (child,) = p.claim_records(10, queues=[flow.name])
        assert child.parents == {"left": "fresh", "right": "r"}


def test_a_waiting_record_whose_parents_finished_is_reported_and_repaired(dsn: str, db: Any) -> None:
    flow = diamond("defect")
    with DistributedProcessor(dsn, cleanup_interval=0.2) as p:
        run_id, left, right = parents_claimed(p, flow)
        assert p.mark_completed([with_result(left, "l"), with_result(right, "r")]) == 1 + 1
        (child_id,) = [r["id"] for r in p.flow_status(run_id)["steps"]["bottom"]]
        # The defect, made by hand: the child back to waiting as if a settle had been lost.
        db.execute("UPDATE processing_queue SET status = 'waiting', waiting_on = 1 WHERE id = %s", (child_id,))
        health = p.health_check()
        assert health["status"] == "degraded"
        assert health["flows"]["defects"] == 1 and health["flows"]["defect_ids"] == [child_id]
        assert any("flow records wait" in reason for reason in health["reasons"])
        # A worker's maintenance repairs it (and counts it); the child then runs.
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(flow,), kwargs={"stop_event": stop, "handle_signals": False},
                             daemon=True)
        t.start()
        try:
            wait_until(lambda: p.flow_status(run_id)["status"] == "completed", 20)
        finally:
            stop.set()
            t.join(10)
        assert p.health_check()["flows"]["defects"] == 0
        assert b"dp_flow_repairs_total" in p.metrics.render() and b"dp_flow_repairs_total{" in p.metrics.render()
        line = [ln for ln in p.metrics.render().decode().splitlines() if ln.startswith("dp_flow_repairs_total{")]
        assert line and float(line[0].rsplit(" ", 1)[1]) == 1.0
