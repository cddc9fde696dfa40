"""Operator actions (cancel, retry_failed, purge) and what the processor reports (queue status, health)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from core import RetryPolicy
from core.api import ProcessorAPI
from core.errors import InvalidArgument
from tests.conformance.conftest import Clock, counts, ids

STATUS_KEYS = {"pending", "processing", "completed", "failed", "cancelled", "waiting", "due",
               "oldest_pending_age_seconds", "paused"}


def test_cancel_ends_pending_records_at_once(processor: ProcessorAPI) -> None:
    a, b, c = processor.add_records([{}, {}, {}])
    assert processor.cancel([a, c]) == {a: "cancelled", c: "cancelled"}
    assert ids(processor.claim_records(10)) == [b]
    assert counts(processor) == {"pending": 0, "processing": 1, "completed": 0, "failed": 0, "cancelled": 2}
    assert processor.cancel([a, 999_999]) == {}  # already cancelled, and unknown: left alone


def test_cancel_flags_a_held_record_whose_outcome_becomes_cancelled(processor: ProcessorAPI) -> None:
    done, failing = processor.add_records([{}, {}])
    recs = processor.claim_records(2)
    assert processor.cancel([done, failing]) == {done: "processing", failing: "processing"}
    kept, cancels = processor.extend_leases(recs)
    assert kept == cancels == {done, failing}
    assert processor.mark_completed(recs[:1]) == 1
    assert processor.mark_failed(recs[1:], RuntimeError("gave up")) == 1
    assert counts(processor) == {"pending": 0, "processing": 0, "completed": 0, "failed": 0, "cancelled": 2}


@pytest.mark.dp_options(max_attempts=1)
def test_cancel_leaves_completed_records_and_ends_failed_ones(processor: ProcessorAPI) -> None:
    ok, bad = processor.add_records([{}, {}])
    a, b = processor.claim_records(2)
    processor.mark_completed([a])
    processor.mark_failed([b], RuntimeError("boom"))
    assert processor.cancel([ok, bad]) == {bad: "cancelled"}
    assert counts(processor) == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 1}


def test_cancel_in_the_middle_of_a_key_lets_the_rest_run_in_order(processor: ProcessorAPI) -> None:
    keyed = processor.add_records([{"n": i} for i in range(6)], ordering_key="order-42")
    cancelled = [keyed[0], keyed[2], keyed[3]]
    processor.cancel(cancelled)
    order: list[int] = []
    for _ in range(10):
        batch = processor.claim_records(10)
        order += ids(batch)
        processor.mark_completed(batch)
    assert order == [i for i in keyed if i not in cancelled]


@pytest.mark.dp_options(max_attempts=1)
def test_retry_failed_gives_failed_records_a_fresh_budget(processor: ProcessorAPI, clock: Clock) -> None:
    a = processor.add_records([{}, {}], queue="a")
    b = processor.add_records([{}], queue="b")
    for rec, error in zip(processor.claim_records(3, queues=["a", "b"]),
                          (TimeoutError("slow"), ValueError("bad"), TimeoutError("slow")), strict=True):
        processor.mark_failed([rec], error)
    assert counts(processor, "a")["failed"] == 2 and counts(processor, "b")["failed"] == 1
    assert processor.retry_failed([a[1]]) == 1
    clock.advance(0.01)
    assert processor.retry_failed(queue="b") == 1
    clock.advance(0.01)
    assert processor.retry_failed(error_pattern="^TimeoutError") == 1  # a[0]; a[1] is pending already
    assert processor.retry_failed() == 0
    retried = processor.claim_records(10, queues=["a", "b"])
    assert ids(retried) == [a[1], b[0], a[0]]  # due from the moment each was retried
    assert [r.attempts for r in retried] == [1, 1, 1]
    with pytest.raises(InvalidArgument):
        processor.retry_failed(error_pattern="(")


@pytest.mark.dp_options(max_attempts=1)
def test_purge_deletes_finished_records_older_than_asked(processor: ProcessorAPI, clock: Clock) -> None:
    processor.add_records([{}] * 5)
    recs = processor.claim_records(4)
    processor.mark_completed(recs[:2])
    processor.mark_failed(recs[2:3], RuntimeError("boom"))
    processor.cancel([recs[3].id])  # held: flagged; it ends cancelled on its outcome
    processor.mark_completed(recs[3:])
    clock.advance(0.2)
    assert processor.purge(3600) == 0  # none is an hour old
    assert processor.purge(0.1, batch=1, max_batches=2) == 2  # bounded: two batches of one
    assert processor.purge(0.1) == 2
    assert counts(processor) == {"pending": 1, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}
    with pytest.raises(InvalidArgument):
        processor.purge(-1)


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=60, jitter=0))
def test_queue_status_counts_per_status_and_queue(processor: ProcessorAPI, clock: Clock) -> None:
    processor.add_records([{}] * 6, queue="a")
    processor.add_records([{}] * 2, queue="b")
    processor.add_records([{}], queue="b", delay=60)  # pending, not due
    recs = processor.claim_records(5, queues=["a"])
    processor.mark_completed(recs[:2])
    processor.mark_failed(recs[2:3], "boom", retry=False)
    processor.mark_failed(recs[3:4], RuntimeError("later"))  # pending again, due in a minute
    processor.cancel([recs[4].id])  # held: still processing
    clock.advance(0.2)
    status = shared(processor.get_queue_status())
    assert set(status) == {"queues", "totals", "oldest_pending_age_seconds", "paused"}
    assert set(status["queues"]) == {"a", "b"}
    a, b = status["queues"]["a"], status["queues"]["b"]
    assert set(a) == set(b) == STATUS_KEYS
    assert {k: a[k] for k in STATUS_KEYS - {"oldest_pending_age_seconds"}} == {
        "pending": 2, "processing": 1, "completed": 2, "failed": 1, "cancelled": 0, "waiting": 0, "due": 1,
        "paused": None}
    assert (b["pending"], b["due"], b["processing"]) == (3, 2, 0)
    assert status["totals"] == {"pending": 5, "processing": 1, "completed": 2, "failed": 1, "cancelled": 0,
                                "waiting": 0}
    assert 0.2 <= a["oldest_pending_age_seconds"] < 30
    assert status["oldest_pending_age_seconds"] == max(a["oldest_pending_age_seconds"],
                                                       b["oldest_pending_age_seconds"])
    only_b = processor.get_queue_status("b", statuses=["pending", "failed"])
    assert set(only_b["queues"]) == {"b"} and set(only_b["totals"]) == {"pending", "failed"}
    assert set(only_b["queues"]["b"]) == {"pending", "failed", "due", "oldest_pending_age_seconds", "paused"}
    with pytest.raises(InvalidArgument):
        processor.get_queue_status(statuses=["done"])


def shared(status: dict[str, Any]) -> dict[str, Any]:
    """The status every backend gives; a sharded processor adds each shard's own (``shards``), which must
    add up to the totals."""
    per_shard = status.pop("shards", None)
    if per_shard is not None:
        for s in status["totals"]:
            assert sum(part["totals"][s] for part in per_shard.values()) == status["totals"][s], s
    return status


def test_queue_status_of_an_empty_queue(processor: ProcessorAPI) -> None:
    assert shared(processor.get_queue_status()) == {
        "queues": {},
        "totals": dict.fromkeys(("pending", "processing", "completed", "failed", "cancelled", "waiting"), 0),
        "oldest_pending_age_seconds": None, "paused": {}}
    (rid,) = processor.add_records([{}])
    processor.mark_completed(processor.claim_records())
    queue = processor.get_queue_status()["queues"]["default"]
    assert (queue["completed"], queue["pending"], queue["oldest_pending_age_seconds"]) == (1, 0, None)
    assert rid > 0


def test_health_check_reports_healthy_with_the_queue_counts(processor: ProcessorAPI) -> None:
    processor.add_records([{}] * 3)
    processor.claim_records(1)
    report = processor.health_check()
    assert report["status"] == "healthy" and report["reasons"] == []
    assert {"status", "instance", "database", "reasons", "checked_at", "queues"} <= set(report)
    assert report["instance"]["instance_id"] == processor.instance_id
    assert report["database"]["reachable"] is True
    datetime.fromisoformat(report["checked_at"])
    queue = report["queues"]["queues"]["default"]
    assert (queue["pending"], queue["processing"], queue["due"]) == (2, 1, 2)
    assert report["queues"]["totals"] == processor.get_queue_status()["totals"]


def test_health_check_is_degraded_by_an_old_backlog(processor: ProcessorAPI, clock: Clock) -> None:
    processor.add_records([{}])
    clock.advance(0.3)
    assert processor.health_check(pending_age_degraded_s=3600)["status"] == "healthy"
    report = processor.health_check(pending_age_degraded_s=0.2)
    assert report["status"] == "degraded"
    assert len(report["reasons"]) == 1 and "oldest pending record" in report["reasons"][0]


def test_retry_failed_in_batches_takes_every_id_it_is_given(processor: ProcessorAPI) -> None:
    rids = processor.add_records([{"n": i} for i in range(7)], max_attempts=1)
    recs = processor.claim_records(7)
    assert processor.mark_failed(recs, "boom") == 7
    assert processor.retry_failed(rids, batch=2) == 7  # four statements of at most two
    assert counts(processor)["pending"] == 7 and counts(processor)["failed"] == 0
    recs = processor.claim_records(7)
    processor.mark_failed(recs, "boom")
    assert processor.retry_failed(batch=3) == 7


def test_an_error_message_with_a_nul_is_stored(processor: ProcessorAPI) -> None:
    processor.add_records([{}], max_attempts=1)
    (rec,) = processor.claim_records()
    assert processor.mark_failed([rec], RuntimeError("bad\x00byte")) == 1  # the failure itself does not fail
    assert counts(processor)["failed"] == 1
    assert processor.retry_failed(error_pattern="bad") == 1
