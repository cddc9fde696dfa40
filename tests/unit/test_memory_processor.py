"""The in-memory processor (core.testing) and its fake clock: pure logic, no database.

Its behaviour was checked statement by statement against DistributedProcessor on PostgreSQL; these tests
pin it down without one.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from core import DistributedProcessor, InvalidArgument, InvalidPayload, QueueFull, RetryPolicy
from core.errors import ConfigurationError, DatabaseUnavailable
from core.record import Record
from core.testing import FakeClock, InMemoryProcessor, MemoryTables, NoDatabase

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
NO_JITTER = RetryPolicy(base_delay=2.0, multiplier=2.0, jitter=0.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def p(clock: FakeClock) -> Iterator[InMemoryProcessor]:
    with InMemoryProcessor(clock=clock, retry=NO_JITTER, lease_seconds=30.0) as processor:
        yield processor


def ids(records: list[Record]) -> list[int]:
    return [r.id for r in records]


def totals(p: InMemoryProcessor) -> dict[str, int]:
    return dict(p.get_queue_status()["totals"])


# ---------------------------------------------------------------------------------------------- claiming


def test_claims_by_priority_then_run_at_then_id(p: InMemoryProcessor, clock: FakeClock) -> None:
    late = p.add_records([{"n": 1}, {"n": 2}], run_at=T0 - timedelta(seconds=5))
    early = p.add_records([{"n": 3}], run_at=T0 - timedelta(seconds=10))
    urgent = p.add_records([{"n": 4}], priority=5)
    lowest = p.add_records([{"n": 5}], priority=-1, run_at=T0 - timedelta(hours=1))
    assert ids(p.claim_records(2)) == [urgent[0], early[0]]
    assert ids(p.claim_records(10)) == [*late, *lowest]
    assert p.claim_records(10) == []


def test_scheduled_records_wait_for_the_clock(p: InMemoryProcessor, clock: FakeClock) -> None:
    (later,) = p.add_records([{"n": 1}], delay=60)
    assert p.claim_records() == []
    assert p.next_due() == T0 + timedelta(seconds=60)
    assert p.get_queue_status()["queues"]["default"]["due"] == 0
    clock.advance(59.999)
    assert p.claim_records() == []
    clock.advance(0.001)
    assert ids(p.claim_records()) == [later]
    assert p.next_due() is None


def test_a_record_carries_what_was_added(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"n": 1}], queue="q", priority=3, max_attempts=2, ordering_key="k", dedupe_key="d")
    (r,) = p.claim_records(queues=["q"])
    assert (r.queue, r.payload, r.priority, r.attempts, r.max_attempts) == ("q", {"n": 1}, 3, 1, 2)
    assert (r.ordering_key, r.dedupe_key, r.cancel_requested) == ("k", "d", False)
    assert r.claimed_at == r.run_at == r.created_at == T0
    assert r.lease_expires_at == T0 + timedelta(seconds=30)


def test_payloads_come_back_as_jsonb_returns_them(p: InMemoryProcessor) -> None:
    sent = {"zz": 1, "a": 1e20, "bb": -0.0, "t": (1, 2), "é": 1, "ab": {"y": 1, "x": 2}}
    p.add_records([sent])
    (r,) = p.claim_records()
    # keys shorter first, then by their bytes; 1e20 an integer; tuples lists (what PostgreSQL returns)
    assert list(r.payload) == ["a", "t", "ab", "bb", "zz", "é"] and list(r.payload["ab"]) == ["x", "y"]
    assert r.payload["a"] == 10**20 and isinstance(r.payload["a"], int) and r.payload["t"] == [1, 2]
    sent["zz"] = 2  # the stored payload is a copy
    p.release_records([r])
    assert p.claim_records()[0].payload["zz"] == 1


# ---------------------------------------------------------------------------------------------- ordering keys


def test_a_key_runs_its_records_one_at_a_time_in_id_order(p: InMemoryProcessor) -> None:
    a1, a2, b1, free, _ = p.add_records([{"i": i} for i in range(5)], ordering_key=["a", "a", "b", None, "a"])
    first = p.claim_records(10)
    assert ids(first) == [a1, b1, free]
    assert p.claim_records(10) == []  # a2 waits for a1
    assert p.mark_completed([first[0]]) == 1
    assert ids(p.claim_records(10)) == [a2]


def test_a_key_limit_lets_more_run_but_one_per_claim(p: InMemoryProcessor) -> None:
    p.set_key_concurrency("k*", 2)
    k1, k2, _ = p.add_records([{"i": i} for i in range(3)], ordering_key="k1")
    # a claim judges every record by the state before it: the key's second record is still behind a pending one
    assert ids(p.claim_records(10)) == [k1]
    assert ids(p.claim_records(10)) == [k2]
    assert p.claim_records(10) == []  # two in flight: the limit
    p.set_key_concurrency("k1", 3)  # an exact key wins over a pattern
    assert len(p.claim_records(10)) == 1


def test_a_completion_frees_the_keys_next_record_from_the_next_claim_on(p: InMemoryProcessor) -> None:
    _, k2 = p.add_records([{"i": 1}, {"i": 2}], ordering_key="k")
    (first,) = p.claim_records()
    claimed, completed = p.complete_and_claim([first], 10)
    assert (claimed, completed) == ([], 1)
    assert ids(p.claim_records()) == [k2]


def test_block_on_failure_stops_the_key_until_its_failure_is_cancelled(p: InMemoryProcessor) -> None:
    p.set_key_concurrency("k", 1, block_on_failure=True)
    k1, k2 = p.add_records([{"i": 1}, {"i": 2}], ordering_key="k", max_attempts=1)
    (first,) = p.claim_records()
    assert p.mark_failed([first], ValueError("boom")) == 1
    assert p.claim_records() == []
    assert p.cancel([k1]) == {k1: "cancelled"}
    assert ids(p.claim_records()) == [k2]


# ---------------------------------------------------------------------------------------------- admission


def test_a_dedupe_key_is_held_while_pending_or_while_active(p: InMemoryProcessor) -> None:
    (d1,) = p.add_records([{"i": 1}], dedupe_key="d1")
    second = p.add_records([{"i": 2}, {"i": 3}, {"i": 4}], dedupe_key=["d1", "d2", "d2"])
    assert list(second) == [d1, d1 + 2, d1 + 2] and second.deduplicated == [0, 2]
    (active,) = p.add_records([{"i": 5}], dedupe_key="d3", dedupe_while="active")
    p.claim_records(10)
    again = p.add_records([{"i": 6}, {"i": 7}], dedupe_key=["d1", "d3"])
    assert again.deduplicated == [1] and again[1] == active  # d1 freed by its claim, d3 held while active
    assert p.add_records([{"i": 8}], dedupe_key="d3", queue="other").deduplicated == []  # per queue


def test_a_queue_limit_refuses_the_whole_batch(p: InMemoryProcessor) -> None:
    p.set_queue_limit("default", 3)
    p.add_records([{"i": 1}, {"i": 2}])
    with pytest.raises(QueueFull) as info:
        p.add_records([{"i": 3}, {"i": 4}])
    assert (info.value.queue, info.value.limit, info.value.depth, info.value.adding) == ("default", 3, 2, 2)
    assert totals(p)["pending"] == 2  # nothing of the batch was written
    p.add_records([{"i": 5}])
    p.claim_records(1)  # the limit counts pending records only
    p.add_records([{"i": 6}])
    p.set_queue_limit("default", None)
    p.add_records([{"i": n} for n in range(10)])
    assert totals(p)["pending"] == 13


# ---------------------------------------------------------------------------------------------- leases, fencing


def test_a_stale_claim_cannot_touch_a_record_claimed_again(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": 1}])
    (old,) = p.claim_records()
    assert p.cleanup_orphaned_records() == 0
    clock.advance(30.001)
    assert p.cleanup_orphaned_records() == 1
    (new,) = p.claim_records()
    assert new.id == old.id and new.lease_token != old.lease_token and new.attempts == 2
    assert p.mark_completed([old]) == 0
    assert p.mark_failed([old], "late") == 0
    assert p.release_records([old]) == 0
    assert p.extend_leases([old]) == (set(), set())
    assert p.mark_completed([old, new]) == 1
    assert totals(p)["completed"] == 1


def test_a_heartbeat_keeps_the_lease(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": 1}])
    (r,) = p.claim_records()
    clock.advance(20)
    assert p.extend_leases([r]) == ({r.id}, set())
    clock.advance(20)
    assert p.cleanup_orphaned_records() == 0
    assert p.mark_completed([r]) == 1


def test_an_expired_lease_on_its_last_attempt_ends_failed(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": 1}], max_attempts=1)
    p.claim_records()
    clock.advance(31)
    assert p.cleanup_orphaned_records() == 1
    assert totals(p)["failed"] == 1
    assert p.retry_failed(error_pattern=r"^lease of .* expired at 2026-12-01 12:00:30\+00 \(attempt 1 of 1\)$") == 1


def test_a_release_hands_the_record_back_without_charging_the_attempt(p: InMemoryProcessor) -> None:
    p.add_records([{"i": 1}])
    (r,) = p.claim_records()
    assert p.release_records([r], "shutting down") == 1
    assert p.claim_records()[0].attempts == 1


# ---------------------------------------------------------------------------------------------- failures


def test_retries_wait_for_the_policys_backoff(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": 1}], max_attempts=3)
    for attempt, delay in ((1, 2.0), (2, 4.0)):
        (r,) = p.claim_records()
        assert r.attempts == attempt
        assert p.mark_failed([r], ValueError(f"try {attempt}")) == 1
        assert p.next_due() == clock.now() + timedelta(seconds=delay)
        clock.advance(delay - 0.001)
        assert p.claim_records() == []
        clock.advance(0.001)
    (last,) = p.claim_records()
    assert last.is_last_attempt
    p.mark_failed([last], ValueError("try 3"))
    assert totals(p) == {"pending": 0, "processing": 0, "completed": 0, "failed": 1, "cancelled": 0, "waiting": 0}
    assert p.retry_failed(error_pattern="^ValueError: try 3$") == 1
    assert p.claim_records()[0].attempts == 1  # a fresh attempt budget


def test_an_error_the_policy_does_not_retry_fails_at_once(clock: FakeClock) -> None:
    p = InMemoryProcessor(clock=clock, retry=RetryPolicy(base_delay=0, no_retry_on=(KeyError,)))
    p.add_records([{"i": 1}, {"i": 2}])
    a, b = p.claim_records()
    p.mark_failed([a], KeyError("k"))
    p.mark_failed([b], "a string is retried")
    assert (totals(p)["failed"], totals(p)["pending"]) == (1, 1)


def test_cancel_ends_waiting_records_and_flags_running_ones(p: InMemoryProcessor) -> None:
    (waiting,) = p.add_records([{"i": 0}], priority=-1)
    running, failed, done = p.add_records([{"i": i} for i in range(3)], max_attempts=1)
    r, f, d = p.claim_records(3)
    p.mark_failed([f], "x")
    p.mark_completed([d])
    assert p.cancel([waiting, running, failed, done, 999]) == {
        waiting: "cancelled", running: "processing", failed: "cancelled"}
    assert p.extend_leases([r]) == ({running}, {running})
    assert p.claim_records(10) == []
    assert p.mark_completed([r]) == 1
    assert totals(p) == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 3, "waiting": 0}


def test_a_flagged_record_ends_cancelled_whatever_its_handler_did(p: InMemoryProcessor) -> None:
    p.add_records([{"i": 1}, {"i": 2}])
    a, b = p.claim_records()
    assert p.cancel([a.id, b.id]) == {a.id: "processing", b.id: "processing"}
    assert p.extend_leases([a, b]) == ({a.id, b.id}, {a.id, b.id})
    assert p.mark_completed([a]) == 1
    assert p.mark_failed([b], "x") == 1
    assert totals(p)["cancelled"] == 2


def test_retry_failed_by_ids_queue_and_pattern(p: InMemoryProcessor) -> None:
    rs = [p.add_records([{"i": i}], queue=q, max_attempts=1)[0] for i, q in enumerate("aabb")]
    for q in "ab":
        for r in p.claim_records(10, queues=[q]):
            p.mark_failed([r], f"error {r.id}")
    assert p.retry_failed([rs[0]]) == 1
    assert p.retry_failed(queue="b", error_pattern=f"error {rs[3]}$") == 1
    assert p.retry_failed(batch=1) == 2  # batches until one comes back short
    assert p.retry_failed() == 0


def test_purge_deletes_finished_records_older_than_the_cutoff(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": i} for i in range(5)], max_attempts=1)
    rs = p.claim_records(10)
    p.mark_completed(rs[:2])
    p.mark_failed(rs[2:3], "x")
    clock.advance(60)
    p.mark_completed(rs[3:4])
    assert p.purge(30, batch=1, max_batches=2) == 2
    assert p.purge(timedelta(seconds=30)) == 1
    assert totals(p) == {"pending": 0, "processing": 1, "completed": 1, "failed": 0, "cancelled": 0, "waiting": 0}
    clock.advance(1)
    assert p.purge(0) == 1


# ---------------------------------------------------------------------------------------------- observing


def test_status_counts_per_queue(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": i} for i in range(3)], queue="a")
    p.add_records([{"i": 1}], queue="b", delay=10)
    p.claim_records(1, queues=["a"])
    clock.advance(4)
    status = p.get_queue_status()
    assert status["queues"]["a"] == {"pending": 2, "processing": 1, "completed": 0, "failed": 0, "cancelled": 0,
            "waiting": 0,
                                     "due": 2, "oldest_pending_age_seconds": 4.0, "paused": None}
    assert status["queues"]["b"]["due"] == 0
    assert status["totals"]["pending"] == 3 and status["oldest_pending_age_seconds"] == 4.0
    assert p.get_queue_status("b", statuses=["pending"])["queues"] == {
        "b": {"pending": 1, "due": 0, "oldest_pending_age_seconds": 4.0, "paused": None}}


def test_health_check_has_the_real_ones_shape(p: InMemoryProcessor, clock: FakeClock) -> None:
    p.add_records([{"i": 1}])
    clock.advance(100)
    report = p.health_check(pending_age_degraded_s=50)
    assert set(report) == {"status", "instance", "database", "reasons", "checked_at", "queues", "pool", "horizon",
                           "paused", "flows"}
    assert set(report["database"]) == {"reachable", "host", "port", "dbname", "schema", "latency_ms",
                                       "server_version", "migrated"}
    assert set(report["horizon"]) == {"age_seconds", "holder", "holders", "live_tuples", "dead_tuples",
                                      "last_autovacuum"}
    assert report["status"] == "degraded" and report["reasons"] == ["oldest pending record is 100s old"]
    assert p.horizon()["holder"] is None and p.ready() == (True, None)
    p.close()
    closed = p.health_check()
    assert closed["status"] == "unhealthy" and closed["reasons"] == ["DatabaseUnavailable: processor is closed"]
    with pytest.raises(DatabaseUnavailable):
        p.claim_records()


def test_instances_sharing_tables_register_beat_and_die(clock: FakeClock) -> None:
    a = InMemoryProcessor(clock=clock, instance_id="a", lease_seconds=60, dead_after=10, max_attempts=1)
    b = InMemoryProcessor(tables=a.tables, instance_id="b", dead_after=10)
    assert b.clock is clock
    a.register_instance({"role": "worker"})
    a.add_records([{"i": 1}])
    (r,) = b.claim_records()  # one queue: either instance claims
    b.release_records([r])
    (r,) = a.claim_records()
    (row,) = b.list_instances()
    assert (row["instance_id"], row["status"], row["metadata"], row["processing"]) == (
        "a", "running", {"role": "worker"}, 1)
    clock.advance(11)
    a.heartbeat([r])  # in time: the instance beats, its lease is extended
    assert b.cleanup_orphaned_records() == 0
    clock.advance(11)
    assert b.cleanup_orphaned_records() == 1  # no beat for dead_after: dead, its record recovered
    assert b.list_instances(include_stopped=True)[0]["status"] == "dead"
    assert a.mark_completed([r]) == 0
    assert b.retry_failed(error_pattern=r"^instance a was declared dead \(attempt 1 of 1\)$") == 1


# ---------------------------------------------------------------------------------------------- run()


def test_run_drains_through_a_handler_and_retries_after_the_clock_moves(p: InMemoryProcessor,
                                                                       clock: FakeClock) -> None:
    p.add_records([{"i": i} for i in range(50)], max_attempts=2)
    p.add_records([{"i": i} for i in range(20)], ordering_key=[f"k{i % 3}" for i in range(20)])
    seen: list[tuple[str | None, int]] = []
    lock = threading.Lock()

    def handler(record: Record) -> None:
        with lock:
            seen.append((record.ordering_key, record.id))
        if record.ordering_key is None and record.payload["i"] % 10 == 0:
            raise ValueError("every tenth fails")

    first = p.run(handler, concurrency=4, stop_when_empty=True, handle_signals=False)
    assert (first.processed, first.retried) == (65, 5)  # the retries wait for the clock
    clock.advance(2)
    second = p.run(handler, concurrency=4, stop_when_empty=True, handle_signals=False)
    assert (second.claimed, second.failed) == (5, 5)
    assert totals(p) == {"pending": 0, "processing": 0, "completed": 65, "failed": 5, "cancelled": 0, "waiting": 0}
    for key in ("k0", "k1", "k2"):
        order = [rid for k, rid in seen if k == key]
        assert order == sorted(order)
    assert p.list_instances(include_stopped=True)[0]["status"] == "stopped"


def test_a_running_run_is_woken_by_the_clock(p: InMemoryProcessor, clock: FakeClock) -> None:
    started: list[float] = []
    done = threading.Event()
    stop = threading.Event()

    def handler(record: Record) -> None:
        started.append(time.monotonic())
        done.set()

    thread = threading.Thread(target=p.run, args=(handler,),
                              kwargs={"stop_event": stop, "handle_signals": False, "poll_interval": 30})
    thread.start()
    try:
        p.add_records([{"i": 1}], delay=3600)
        time.sleep(0.2)
        assert not done.is_set()
        moved = time.monotonic()
        clock.advance(3600)
        assert done.wait(5) and started[0] - moved < 1.0  # not the 30 s poll
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_what_needs_a_database_is_refused(p: InMemoryProcessor) -> None:
    p.add_records([{"i": 1}])
    with pytest.raises(NoDatabase):
        p.run(lambda record, conn: None, transactional=True, stop_when_empty=True, handle_signals=False)
    assert totals(p)["pending"] == 1  # refused before anything was claimed
    with pytest.raises(NoDatabase):
        p.connection()
    with pytest.raises(NoDatabase):
        p.complete_on(None, [])
    assert isinstance(NoDatabase("x"), ConfigurationError)
    p.migrate()  # nothing to migrate


# ---------------------------------------------------------------------------------------------- bad input


BAD_INPUT: list[tuple[str, Any, type[BaseException]]] = [
    ("payload not a dict", lambda p: p.add_records([[1]]), InvalidPayload),
    ("payload NaN", lambda p: p.add_records([{"a": float("nan")}]), InvalidPayload),
    ("payload NUL", lambda p: p.add_records([{"a": "x\x00"}]), InvalidPayload),
    ("payload too large", lambda p: p.add_records([{"a": "x" * 2**20}]), InvalidPayload),
    ("naive run_at", lambda p: p.add_records([{"a": 1}], run_at=datetime(2026, 1, 1)), InvalidArgument),
    ("run_at and delay", lambda p: p.add_records([{"a": 1}], run_at=T0, delay=1), InvalidArgument),
    ("priority past 32 bits", lambda p: p.add_records([{"a": 1}], priority=2**31), InvalidArgument),
    ("max_attempts 0", lambda p: p.add_records([{"a": 1}], max_attempts=0), InvalidArgument),
    ("one dedupe key, two records", lambda p: p.add_records([{"a": 1}, {"a": 2}], dedupe_key="d"), InvalidArgument),
    ("dedupe_while", lambda p: p.add_records([{"a": 1}], dedupe_key="d", dedupe_while="x"), InvalidArgument),
    ("keys mismatch", lambda p: p.add_records([{"a": 1}], ordering_key=["a", "b"]), InvalidArgument),
    ("batch 0", lambda p: p.claim_records(0), InvalidArgument),
    ("batch too large", lambda p: p.claim_records(10_001), InvalidArgument),
    ("no queues", lambda p: p.claim_records(queues=[]), InvalidArgument),
    ("not a record", lambda p: p.mark_completed([1]), InvalidArgument),
    ("id not an int", lambda p: p.cancel(["1"]), InvalidArgument),
    ("negative older_than", lambda p: p.purge(-1), InvalidArgument),
    ("bad error_pattern", lambda p: p.retry_failed(error_pattern="(("), InvalidArgument),
    ("unknown status", lambda p: p.get_queue_status(statuses=["done"]), InvalidArgument),
    ("key limit 0", lambda p: p.set_key_concurrency("k", 0), InvalidArgument),
    ("empty pattern", lambda p: p.set_key_concurrency("", 1), InvalidArgument),
    ("negative queue limit", lambda p: p.set_queue_limit("q", -1), InvalidArgument),
    ("handler not callable", lambda p: p.run(None), InvalidArgument),
    ("concurrency 0", lambda p: p.run(print, concurrency=0), InvalidArgument),
    # what PostgreSQL cannot store is refused before anything is sent (core.checks)
    ("NUL in a key", lambda p: p.add_records([{"a": 1}], ordering_key="a\x00"), InvalidArgument),
    ("NUL in a queue", lambda p: p.claim_records(queues=["a\x00"]), InvalidArgument),
    ("max_attempts past 32 bits", lambda p: p.add_records([{"a": 1}], max_attempts=2**31), InvalidArgument),
    ("id past 64 bits", lambda p: p.cancel([2**63]), InvalidArgument),
]


@pytest.mark.parametrize(("case", "call", "error"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_what_the_real_one_raises(p: InMemoryProcessor, case: str, call: Any,
                                                   error: type[BaseException]) -> None:
    with pytest.raises(error):
        call(p)
    assert totals(p)["pending"] == 0  # nothing written


def test_bad_settings_are_configuration_errors(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError):
        InMemoryProcessor(batch_size=0)
    with pytest.raises(ConfigurationError):
        InMemoryProcessor(lease_seconds=1, heartbeat_interval=1)
    with pytest.raises(ConfigurationError):
        InMemoryProcessor(tables=MemoryTables(), clock=clock)  # two clocks
    with pytest.raises(TypeError):
        InMemoryProcessor(dsn="postgresql://")  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------- the kit


def test_the_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock(T0)
    assert clock.now() == T0
    assert clock.advance(1.5) == T0 + timedelta(seconds=1.5)
    assert clock.advance(timedelta(minutes=1)) == T0 + timedelta(seconds=61.5)
    for bad in (-1, float("inf"), "1", True):
        with pytest.raises(InvalidArgument):
            clock.advance(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        FakeClock(datetime(2026, 1, 1))
    assert abs((FakeClock().now() - datetime.now(timezone.utc)).total_seconds()) < 5


def test_without_a_clock_time_is_real() -> None:
    p = InMemoryProcessor(retry=RetryPolicy(base_delay=0.05, jitter=0))
    assert p.clock is None
    p.add_records([{"i": 1}])
    p.mark_failed(p.claim_records(), "x")
    assert p.claim_records() == []
    time.sleep(0.06)
    assert len(p.claim_records()) == 1


def test_the_api_is_the_real_ones() -> None:
    real = inspect.signature(DistributedProcessor.__init__).parameters
    mine = inspect.signature(InMemoryProcessor.__init__).parameters
    database = {"dsn", "schema", "pool_min", "pool_max", "connect_timeout", "statement_timeout", "pooling",
                "application_name", "copy_threshold", "horizon_warning_seconds", "shards"}
    assert set(mine) - {"clock", "tables"} == set(real) - database
    for name in set(mine) - {"self", "clock", "tables"}:
        assert mine[name].default == real[name].default, name
    public = {n for n in dir(DistributedProcessor) if not n.startswith("_")}
    assert public - set(dir(InMemoryProcessor)) == {"dsn", "q"}
