"""Claiming, FIFO order, fenced completion, retries and bad input against a real PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor, InvalidPayload, RetryPolicy
from core.errors import DatabaseUnavailable, InvalidArgument
from tests.support import wait_until


def status_of(db: psycopg.Connection[Any], rid: int) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT status, attempts, claimed_by, last_error, run_at FROM processing_queue WHERE id = %s", (rid,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def count(db: psycopg.Connection[Any], where: str = "true") -> int:
    row = db.execute(f"SELECT count(*) FROM processing_queue WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def test_add_records_returns_ids_in_input_order_for_statement_and_copy(make_processor: Any, db: Any) -> None:
    p = make_processor(copy_threshold=50)
    small = p.add_records([{"i": i} for i in range(10)])
    big = p.add_records([{"i": i} for i in range(200)])  # goes through COPY
    for ids in (small, big):
        rows = db.execute("SELECT id, payload->>'i' FROM record_payloads WHERE id = ANY(%s)", (list(ids),))
        by_id = {rid: int(i) for rid, i in rows}
        assert [by_id[rid] for rid in ids] == list(range(len(ids)))
    assert big[0] > small[-1]


def test_fifo_within_equal_priority_single_claimer(processor: DistributedProcessor) -> None:
    ids: list[int] = []
    for chunk in range(5):  # several producer calls, as in real life
        ids += processor.add_records([{"n": chunk * 100 + i} for i in range(100)])
    got: list[int] = []
    for size in (1, 7, 50, 500):
        got += [r.id for r in processor.claim_records(size)]
    got += [r.id for r in processor.claim_records(500)]
    assert got == ids


def test_higher_priority_first_then_fifo(processor: DistributedProcessor) -> None:
    low = processor.add_records([{"p": 0}] * 3)
    high = processor.add_records([{"p": 10}] * 3, priority=10)
    mid = processor.add_records([{"p": 5}] * 3, priority=5)
    got = [r.id for r in processor.claim_records(9)]
    assert got == high + mid + low


def test_future_run_at_is_not_claimed_until_due(processor: DistributedProcessor) -> None:
    later = processor.add_records([{"later": True}], run_at=datetime.now(timezone.utc) + timedelta(seconds=1.5))
    now_ids = processor.add_records([{"now": True}])
    assert [r.id for r in processor.claim_records(10)] == now_ids
    assert processor.claim_records(10) == []
    deadline = time.monotonic() + 5
    claimed: list[int] = []
    while not claimed and time.monotonic() < deadline:
        claimed = [r.id for r in processor.claim_records(10)]
        time.sleep(0.05)
    assert claimed == later


def test_claim_sets_lease_and_counts_attempt(processor: DistributedProcessor, db: Any) -> None:
    (rid,) = processor.add_records([{"x": 1}])
    (rec,) = processor.claim_records()
    row = db.execute(
        "SELECT status, claimed_by, attempts, lease_token, lease_expires_at - claimed_at FROM processing_queue"
    ).fetchone()
    assert row[0] == "processing" and row[1] == "test-a" and row[2] == 1
    assert row[3] == rec.lease_token
    assert abs(row[4].total_seconds() - processor.lease_seconds) < 0.01
    assert rec.id == rid and rec.payload == {"x": 1} and rec.attempts == 1


def test_each_claim_gets_a_fresh_lease_token(make_processor: Any, db: Any) -> None:
    p = make_processor(lease_seconds=0.2, heartbeat_interval=0.05)
    p.add_records([{"x": 1}])
    (first,) = p.claim_records()
    time.sleep(0.3)
    assert p.cleanup_orphaned_records() == 1
    (second,) = p.claim_records()
    assert first.id == second.id and first.lease_token != second.lease_token
    assert second.attempts == 2


def test_fencing_stale_instance_cannot_complete(make_processor: Any, db: Any) -> None:
    a = make_processor(instance_id="a", lease_seconds=0.3, heartbeat_interval=0.1)
    b = make_processor(instance_id="b")
    (rid,) = a.add_records([{"job": 1}])
    (rec_a,) = a.claim_records()
    time.sleep(0.4)  # the lease must really expire in wall time
    assert b.cleanup_orphaned_records() == 1
    assert "lease of a expired" in status_of(db, rid)[3]
    (rec_b,) = b.claim_records()
    assert rec_b.id == rid
    assert b.mark_completed([rec_b]) == 1
    # The first instance wakes up late: its completion and its failure are both fenced out.
    assert a.mark_completed([rec_a]) == 0
    assert a.mark_failed([rec_a], RuntimeError("late")) == 0
    status, attempts, claimed_by, *_ = status_of(db, rid)
    assert (status, attempts, claimed_by) == ("completed", 2, "b")


def test_fencing_pairs_each_id_with_its_own_token_in_any_order(processor: DistributedProcessor, db: Any) -> None:
    # Two claims, two tokens. A record offered with the other claim's token (a token the batch does hold)
    # is fenced out; the statements find each id's own token whatever order the records come in.
    processor.add_records([{"n": i} for i in range(6)])
    first, second = processor.claim_records(3), processor.claim_records(3)
    assert first[0].lease_token != second[0].lease_token
    forged = [first[1]._replace(lease_token=second[0].lease_token),
              second[1]._replace(lease_token=first[0].lease_token)]
    mixed = [second[2], forged[0], first[0], forged[1], first[2], second[0]]
    kept, _ = processor.extend_leases(mixed)
    assert kept == {first[0].id, first[2].id, second[0].id, second[2].id}
    assert processor.mark_completed(mixed) == 4
    statuses = dict(db.execute("SELECT id, status FROM processing_queue").fetchall())
    assert statuses == {r.id: ("processing" if r.id in (first[1].id, second[1].id) else "completed")
                        for r in first + second}
    assert processor.release_records(forged) == 0
    assert processor.mark_failed(forged, RuntimeError("forged")) == 0
    assert processor.release_records([second[1], first[1]]) == 2


def test_a_stale_copy_of_a_reclaimed_record_does_not_hide_the_current_one(make_processor: Any) -> None:
    # The same id offered twice in one call, its old claim after its re-claim: the re-claim's token wins.
    p = make_processor(lease_seconds=0.2, heartbeat_interval=0.05)
    p.add_records([{"x": 1}])
    (old,) = p.claim_records()
    wait_until(lambda: p.cleanup_orphaned_records() == 1, timeout=5)
    (new,) = p.claim_records()
    assert new.id == old.id and new.lease_token != old.lease_token
    assert p.mark_completed([new, old]) == 1


def test_failures_of_one_batch_get_each_record_its_own_backoff(make_processor: Any, db: Any) -> None:
    quick = make_processor(retry=RetryPolicy(base_delay=0, jitter=0))
    slow = make_processor(retry=RetryPolicy(base_delay=100, multiplier=2, jitter=0))
    low, high = quick.add_records([{"n": 1}, {"n": 2}])
    first = {r.id: r for r in quick.claim_records(2)}
    assert quick.mark_failed([first[high]], RuntimeError("once")) == 1  # pending again, attempt 1 charged
    assert quick.release_records([first[low]]) == 1  # pending again, the attempt not charged
    held = {r.id: r for r in slow.claim_records(2)}
    assert (held[low].attempts, held[high].attempts) == (1, 2)
    before = datetime.now(timezone.utc)
    assert slow.mark_failed([held[high], held[low]], RuntimeError("again")) == 2  # not in id order
    waits = {rid: (status_of(db, rid)[4] - before).total_seconds() for rid in (low, high)}
    assert 99 < waits[low] < 101 and 199 < waits[high] < 201, waits


def test_completed_record_is_not_completed_twice(processor: DistributedProcessor) -> None:
    processor.add_records([{"x": 1}, {"x": 2}])
    recs = processor.claim_records()
    assert processor.mark_completed(recs) == 2
    assert processor.mark_completed(recs) == 0


def test_failure_with_retry_goes_back_to_pending_with_backoff(make_processor: Any, db: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=10, jitter=0))
    (rid,) = p.add_records([{"x": 1}])
    (rec,) = p.claim_records()
    before = datetime.now(timezone.utc)
    assert p.mark_failed([rec], ValueError("bad value 42")) == 1
    status, attempts, _, last_error, run_at = status_of(db, rid)
    assert status == "pending" and attempts == 1
    assert last_error == "ValueError: bad value 42"
    assert timedelta(seconds=9) < run_at - before < timedelta(seconds=11)
    assert p.claim_records() == []  # waiting on its backoff


def test_max_attempts_is_enforced(make_processor: Any, db: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=0, jitter=0), max_attempts=3)
    (rid,) = p.add_records([{"x": 1}])
    for attempt in range(1, 4):
        (rec,) = p.claim_records()
        assert rec.attempts == attempt
        p.mark_failed([rec], RuntimeError(f"try {attempt}"))
    assert status_of(db, rid)[:2] == ("failed", 3)
    assert p.claim_records() == []
    # a per-batch max_attempts overrides the processor default
    (rid2,) = p.add_records([{"y": 1}], max_attempts=1)
    (rec,) = p.claim_records()
    p.mark_failed([rec], RuntimeError("once"))
    assert status_of(db, rid2)[0] == "failed"


def test_non_retryable_errors_fail_at_once(make_processor: Any, db: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=0, no_retry_on=(KeyError,)))
    a, b = p.add_records([{"a": 1}, {"b": 1}])
    ra, rb = p.claim_records()
    p.mark_failed([ra], KeyError("missing"))
    p.mark_failed([rb], RuntimeError("transient"))
    assert status_of(db, a)[0] == "failed"
    assert status_of(db, b)[0] == "pending"
    (rb2,) = p.claim_records()
    p.mark_failed([rb2], "explicit", retry=False)
    assert status_of(db, b)[0] == "failed"


def test_long_error_text_is_truncated(processor: DistributedProcessor, db: Any) -> None:
    (rid,) = processor.add_records([{"x": 1}])
    (rec,) = processor.claim_records()
    processor.mark_failed([rec], RuntimeError("x" * 100_000), retry=False)
    assert len(status_of(db, rid)[3]) <= 2000


@pytest.mark.parametrize(
    "bad",
    [
        [{"ok": 1}, ["not", "a", "dict"]],
        [{"ok": 1}, {"when": datetime.now()}],
        [{"ok": 1}, {"nan": float("nan")}],
        [{"ok": 1}, None],
    ],
)
def test_bad_payload_writes_nothing_of_the_batch(processor: DistributedProcessor, db: Any, bad: list[Any]) -> None:
    with pytest.raises(InvalidPayload) as info:
        processor.add_records(bad)
    assert info.value.index == 1
    assert count(db) == 0


def test_bad_arguments_raise_typed_errors(processor: DistributedProcessor, db: Any) -> None:
    with pytest.raises(InvalidArgument, match="batch_size"):
        processor.claim_records(-1)
    with pytest.raises(InvalidArgument, match="batch_size"):
        processor.claim_records(0)
    with pytest.raises(InvalidArgument, match="unknown status"):
        processor.get_queue_status(statuses=["done"])
    with pytest.raises(InvalidArgument, match="timezone"):
        processor.add_records([{"x": 1}], run_at=datetime.now())
    with pytest.raises(InvalidArgument, match="dedupe_key"):
        processor.add_records([{"x": 1}, {"x": 2}], dedupe_key="one")
    with pytest.raises(InvalidArgument, match="ordering_key"):
        processor.add_records([{"x": 1}, {"x": 2}], ordering_key=["only-one"])
    assert count(db) == 0


def test_unreachable_database_raises_database_unavailable_within_timeout() -> None:
    p = DistributedProcessor("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        p.add_records([{"x": 1}])
    with pytest.raises(DatabaseUnavailable):
        p.claim_records()
    assert time.monotonic() - started < 20
    p.close()


def test_health_check_unhealthy_for_unreachable_database_within_timeout() -> None:
    # 10.255.255.1 is never routed here: a blackholed host, the case that hangs naive clients.
    p = DistributedProcessor("host=127.0.0.1 port=1 dbname=x user=x password=topsecret", connect_timeout=2)
    started = time.monotonic()
    report = p.health_check(timeout=2)
    elapsed = time.monotonic() - started
    assert report["status"] == "unhealthy"
    assert report["database"]["reachable"] is False
    assert report["reasons"] and "DatabaseUnavailable" in report["reasons"][0]
    assert elapsed < 5
    assert "topsecret" not in repr(report)
    p.close()


def test_health_check_healthy_reports_facts(processor: DistributedProcessor) -> None:
    processor.add_records([{"x": 1}] * 3)
    report = processor.health_check()
    assert report["status"] == "healthy", report["reasons"]
    db = report["database"]
    assert db["reachable"] and db["migrated"] and db["latency_ms"] > 0 and db["server_version"]
    inst = report["instance"]
    assert inst["instance_id"] == "test-a" and inst["pid"] > 0 and inst["rss_bytes"] > 0
    assert report["queues"]["queues"]["default"]["pending"] == 3
    assert "pool_size" in report["pool"]


def test_health_check_unhealthy_when_not_migrated(empty_dsn: str) -> None:
    with DistributedProcessor(empty_dsn) as p:
        report = p.health_check()
    assert report["status"] == "unhealthy"
    assert report["database"]["reachable"] is True
    assert "not migrated" in report["reasons"][0]


def test_queue_status_counts_per_status_and_queue(make_processor: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=0, jitter=0), max_attempts=1)
    p.add_records([{"x": i} for i in range(6)], queue="a")
    p.add_records([{"x": i} for i in range(2)], queue="b")
    recs = p.claim_records(4, queues=["a"])
    p.mark_completed(recs[:2])
    p.mark_failed(recs[2:3], "boom")
    p.cancel([recs[3].id])  # processing: flagged only
    status = p.get_queue_status()
    a = status["queues"]["a"]
    assert (a["pending"], a["processing"], a["completed"], a["failed"]) == (2, 1, 2, 1)
    assert status["queues"]["b"]["pending"] == 2
    assert status["totals"]["pending"] == 4
    assert status["oldest_pending_age_seconds"] >= 0
    only_b = p.get_queue_status("b")
    assert set(only_b["queues"]) == {"b"}
    # purge keeps the finished counters honest
    assert p.purge(0) == 3
    assert p.get_queue_status("a")["queues"]["a"]["completed"] == 0


def test_several_queues_in_one_claim_respect_global_order(processor: DistributedProcessor) -> None:
    a = processor.add_records([{"q": "a"}] * 3, queue="a")
    b = processor.add_records([{"q": "b"}] * 3, queue="b", priority=1)
    c = processor.add_records([{"q": "c"}] * 3, queue="c")
    got = [r.id for r in processor.claim_records(5, queues=["a", "b", "c"])]
    assert got == b + a[:2]
    assert [r.id for r in processor.claim_records(10, queues=["c"])] == c


def test_copy_path_round_trips_awkward_text(make_processor: Any, db: Any) -> None:
    p = make_processor(copy_threshold=2)
    tricky = [{"s": "back\\slash\ttab\nnewline\r", "u": "é😀"}, {"n": None}, {"q": "\\N"}]
    ids = p.add_records(tricky, ordering_key=["k\\1\t", None, "\\N"], queue="q\tx")
    rows = db.execute("SELECT p.payload, ordering_key, queue FROM processing_queue JOIN record_payloads p USING (id)"
                      " WHERE id = ANY(%s) ORDER BY id",
                      (list(ids),)).fetchall()
    assert [r[0] for r in rows] == tricky
    assert [r[1] for r in rows] == ["k\\1\t", None, "\\N"]
    assert {r[2] for r in rows} == {"q\tx"}


@pytest.mark.parametrize("bad_at", [0, 1500])
def test_bad_payload_in_a_copy_batch_writes_nothing(make_processor: Any, db: Any, bad_at: int) -> None:
    # The COPY path encodes as it streams: a bad payload in a later chunk aborts the COPY and the transaction.
    p = make_processor(copy_threshold=2)
    items: list[Any] = [{"n": i} for i in range(2500)]
    items[bad_at] = {"when": datetime.now()}
    with pytest.raises(InvalidPayload) as info:
        p.add_records(items)
    assert info.value.index == bad_at
    assert count(db) == 0
    items[bad_at] = {"nul": "a\x00b"}
    with pytest.raises(InvalidPayload, match="NUL"):
        p.add_records(items)
    assert count(db) == 0
    assert len(p.add_records([{"n": 1}, {"n": 2}])) == 2  # the pooled connection came back usable


def test_copy_path_keeps_run_at_priority_and_attempts(make_processor: Any, db: Any) -> None:
    p = make_processor(copy_threshold=2)
    when = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=123456)
    later = list(p.add_records([{"a": 1}, {"a": 2}], run_at=when, priority=7, max_attempts=3))
    now = list(p.add_records([{"a": 3}, {"a": 4}], ordering_key=["k", "k"]))
    rows = db.execute("SELECT id, run_at, priority, max_attempts, ordering_key, key_blocked, run_at <= now()"
                      " FROM processing_queue ORDER BY id").fetchall()
    assert [r[0] for r in rows] == later + now
    assert [r[1:4] for r in rows[:2]] == [(when, 7, 3)] * 2
    assert [r[4:] for r in rows[2:]] == [("k", False, True), ("k", True, True)]
