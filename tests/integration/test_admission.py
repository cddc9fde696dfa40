"""Ordering keys, cancellation in order, failure handling per key, dedupe keys, bounded queues."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from core import DistributedProcessor, QueueFull, RetryPolicy
from core.enqueue import KEY_GAP
from core.floors import start_params
from tests.procs.ledger import ensure_ledger, ledger_handler
from tests.support import wait_until


def _order(db: Any, key: str) -> list[int]:
    return [r[0] for r in db.execute("SELECT record_id FROM ledger WHERE ordering_key = %s ORDER BY seq", (key,))]


def _run_until(p: DistributedProcessor, done: Any, timeout: float = 60, **kwargs: Any) -> Any:
    """Run the ledger handler in a thread until ``done()``; return the summary."""
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        result["summary"] = p.run(ledger_handler(p, p.instance_id), stop_event=stop, poll_interval=0.05, **kwargs)

    t = threading.Thread(target=target)
    t.start()
    try:
        wait_until(done, timeout, interval=0.05)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    return result["summary"]


def _statuses(db: Any, ids: list[int]) -> list[str]:
    rows = dict(db.execute("SELECT id, status FROM processing_queue WHERE id = ANY(%s)", (ids,)).fetchall())
    return [rows[i] for i in ids]


def test_keyed_records_claim_one_at_a_time_in_order(processor: DistributedProcessor) -> None:
    ids = processor.add_records([{"n": i} for i in range(5)], ordering_key="k")
    other = processor.add_records([{"n": 9}], ordering_key="other")
    first = processor.claim_records(10)
    assert [r.id for r in first] == [ids[0], other[0]]  # one per key, keys in parallel
    assert processor.claim_records(10) == []  # the key's head is in flight
    processor.mark_completed(first)
    assert [r.id for r in processor.claim_records(10)] == [ids[1]]


def test_per_key_limit_lets_n_run_and_is_read_from_the_database(make_processor: Any) -> None:
    a = make_processor(instance_id="a")
    b = make_processor(instance_id="b")
    ids = a.add_records([{} for _ in range(6)], ordering_key="acct-7")
    a.set_key_concurrency("acct-*", 3)  # set from one instance ...
    got: list[int] = []
    for _ in range(5):
        got += [r.id for r in b.claim_records(10)]  # ... obeyed by another, with no restart
    assert got == ids[:3]
    a.set_key_concurrency("acct-7", 1)  # exact key wins over the pattern
    a.set_key_concurrency("acct-*", None)
    assert b.claim_records(10) == []


def test_per_key_order_survives_mixed_priorities(processor: DistributedProcessor) -> None:
    first = processor.add_records([{"n": 1}], ordering_key="k", priority=0)
    second = processor.add_records([{"n": 2}], ordering_key="k", priority=100)
    claimed = processor.claim_records(10)
    assert [r.id for r in claimed] == first  # the high-priority later record did not jump its key
    assert processor.claim_records(10) == []
    processor.mark_completed(claimed)
    assert [r.id for r in processor.claim_records(10)] == second


def test_scheduled_head_blocks_its_key(processor: DistributedProcessor) -> None:
    processor.add_records([{"n": 1}], ordering_key="k", delay=60)
    processor.add_records([{"n": 2}], ordering_key="k")  # due, but behind a scheduled head
    free = processor.add_records([{"n": 3}])
    assert [r.id for r in processor.claim_records(10)] == free


def test_cancel_in_the_middle_of_a_key_lets_the_rest_run_in_order(processor: DistributedProcessor, db: Any) -> None:
    ensure_ledger(db)
    ids = processor.add_records([{"n": i} for i in range(10)], ordering_key="order-42")
    cancelled = [ids[3], ids[5], ids[7]]
    assert processor.cancel(cancelled) == {i: "cancelled" for i in cancelled}
    _run_until(processor, lambda: _order(db, "order-42") == [i for i in ids if i not in cancelled])
    assert _statuses(db, ids) == ["cancelled" if i in cancelled else "completed" for i in ids]


def test_cancel_flags_a_processing_record_and_its_outcome_is_cancelled(
    processor: DistributedProcessor, db: Any
) -> None:
    (rid,) = processor.add_records([{}])
    (rec,) = processor.claim_records()
    assert processor.cancel([rid]) == {rid: "processing"}
    kept, cancels = processor.extend_leases([rec])
    assert kept == {rid} and cancels == {rid}
    assert processor.mark_completed([rec]) == 1
    assert _statuses(db, [rid]) == ["cancelled"]


def test_failing_record_with_retries_holds_its_key_until_it_succeeds(make_processor: Any, db: Any) -> None:
    ensure_ledger(db)
    p = make_processor(retry=RetryPolicy(base_delay=0.05, jitter=0), max_attempts=5)
    ids = p.add_records([{"fail_times": 2}, {}, {}], ordering_key="k")
    _run_until(p, lambda: _statuses(db, ids) == ["completed"] * 3)
    assert _order(db, "k") == [ids[0], ids[0], ids[0], ids[1], ids[2]]


def test_exhausted_failure_unblocks_the_key(make_processor: Any, db: Any) -> None:
    ensure_ledger(db)
    p = make_processor(retry=RetryPolicy(base_delay=0.05, jitter=0), max_attempts=2)
    ids = p.add_records([{"fail_times": 99}, {}, {}], ordering_key="k")
    _run_until(p, lambda: _statuses(db, ids) == ["failed", "completed", "completed"])
    assert _order(db, "k") == [ids[0], ids[0], ids[1], ids[2]]


def test_block_on_failure_stops_the_key_until_an_operator_acts(make_processor: Any, db: Any) -> None:
    ensure_ledger(db)
    p = make_processor(retry=RetryPolicy(base_delay=0.05, jitter=0), max_attempts=2, block_on_failure=True)
    ids = p.add_records([{"fail_times": 99}, {}, {}], ordering_key="k")
    free = p.add_records([{}])
    _run_until(p, lambda: _statuses(db, ids + free) == ["failed", "pending", "pending", "completed"])
    assert p.claim_records(10) == []  # the key stays stopped
    # the operator gives up on the failed record: the key continues in order
    assert p.cancel([ids[0]]) == {ids[0]: "cancelled"}
    _run_until(p, lambda: _statuses(db, ids) == ["cancelled", "completed", "completed"])
    assert _order(db, "k") == [ids[0], ids[0], ids[1], ids[2]]


def test_block_on_failure_can_be_set_per_key_in_the_database(make_processor: Any) -> None:
    p = make_processor(max_attempts=1)
    p.set_key_concurrency("strict-*", 1, block_on_failure=True)
    strict = p.add_records([{}, {}], ordering_key="strict-1")
    loose = p.add_records([{}, {}], ordering_key="loose-1")
    recs = p.claim_records(10)
    assert {r.id for r in recs} == {strict[0], loose[0]}
    p.mark_failed(recs, "boom")
    assert [r.id for r in p.claim_records(10)] == [loose[1]]
    # the key no longer blocks on failure: its next record goes at once, not at the next maintenance sweep
    p.set_key_concurrency("strict-1", 1)
    assert [r.id for r in p.claim_records(10)] == [strict[1]]


def test_dedupe_returns_the_existing_id_and_releases_on_claim(processor: DistributedProcessor) -> None:
    first = processor.add_records([{"v": 1}], dedupe_key="sync-user-1")
    again = processor.add_records([{"v": 2}], dedupe_key="sync-user-1")
    assert again == first and again.deduplicated == [0]
    other_queue = processor.add_records([{"v": 3}], dedupe_key="sync-user-1", queue="other")
    assert other_queue.deduplicated == []
    (rec,) = processor.claim_records()
    # default dedupe_while="pending": once claimed, a new one may be queued
    fresh = processor.add_records([{"v": 4}], dedupe_key="sync-user-1")
    assert fresh.deduplicated == [] and fresh[0] != first[0]
    assert rec.id == first[0]


def test_dedupe_while_active_spans_processing_and_survives_retries(make_processor: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=0, jitter=0))
    (_rid,) = p.add_records([{}], dedupe_key="d", dedupe_while="active")
    (rec,) = p.claim_records()
    assert p.add_records([{}], dedupe_key="d", dedupe_while="active").deduplicated == [0]
    p.mark_failed([rec], RuntimeError("retry me"))  # back to pending, still holding the key
    assert p.add_records([{}], dedupe_key="d").deduplicated == [0]
    (rec,) = p.claim_records()
    p.mark_completed([rec])
    assert p.add_records([{}], dedupe_key="d").deduplicated == []


def test_dedupe_under_8_concurrent_producers_keeps_one_active_per_key(dsn: str, db: Any) -> None:
    keys = [f"key-{i}" for i in range(40)]
    start = threading.Barrier(8)
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        try:
            with DistributedProcessor(dsn, instance_id=f"prod-{n}") as p:
                start.wait()
                for round_ in range(3):
                    batch = keys[n % 5 :] + keys[: n % 5]  # different orders per producer
                    ids = p.add_records([{"n": n, "r": round_} for _ in batch], dedupe_key=batch)
                    with lock:
                        results.extend(zip(batch, ids, strict=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    per_key = Counter(k for (k,) in db.execute("SELECT dedupe_key FROM processing_queue WHERE status = 'pending'"))
    assert per_key == Counter({k: 1 for k in keys})
    # every producer was told the id of the one record that holds the key
    ids_per_key: dict[str, set[int]] = {}
    for k, rid in results:
        ids_per_key.setdefault(k, set()).add(rid)
    assert all(len(v) == 1 for v in ids_per_key.values())


def test_queue_limit_under_8_concurrent_producers(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as admin:
        admin.set_queue_limit("bounded", 10)
    start = threading.Barrier(8)
    accepted: list[int] = []
    rejected: list[QueueFull] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        with DistributedProcessor(dsn, instance_id=f"prod-{n}") as p:
            start.wait()
            for _ in range(5):
                try:
                    ids = p.add_records([{"n": n}], queue="bounded")
                    with lock:
                        accepted.extend(ids)
                except QueueFull as exc:
                    with lock:
                        rejected.append(exc)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == 10 and len(rejected) == 30
    row = db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'bounded'").fetchone()
    assert row[0] == 10
    assert all(e.limit == 10 and e.depth == 10 for e in rejected)
    assert "limit 10" in str(rejected[0])


def test_queue_limit_rejects_the_whole_batch_and_other_queues_are_free(
    processor: DistributedProcessor, db: Any
) -> None:
    processor.set_queue_limit("small", 5)
    processor.add_records([{}] * 3, queue="small")
    with pytest.raises(QueueFull) as info:
        processor.add_records([{}] * 3, queue="small")
    assert (info.value.depth, info.value.adding) == (3, 3)
    assert db.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == 3
    processor.add_records([{}] * 20)  # another queue has no limit
    processor.set_queue_limit("small", None)
    processor.add_records([{}] * 3, queue="small")


def test_one_queue_never_blocks_another(processor: DistributedProcessor) -> None:
    processor.add_records([{}] * 500, queue="busy", priority=100)
    quiet = processor.add_records([{}], queue="quiet")
    assert [r.id for r in processor.claim_records(1, queues=["quiet"])] == quiet


def _blocked(db: Any, ids: list[int]) -> list[bool]:
    rows = dict(db.execute("SELECT id, key_blocked FROM processing_queue WHERE id = ANY(%s)", (ids,)).fetchall())
    return [rows[i] for i in ids]


def test_records_behind_a_pending_one_of_their_key_are_inserted_blocked(processor: DistributedProcessor,
                                                                        db: Any) -> None:
    first = processor.add_records([{}, {}, {}], ordering_key="k")
    other = processor.add_records([{}], ordering_key="other")
    later = processor.add_records([{}], ordering_key="k")
    assert _blocked(db, first + other + later) == [False, True, True, False, True]
    (head, other_head) = processor.claim_records(10)
    assert head.id == first[0] and other_head.id == other[0]
    # the claim made the key's next record claimable (it still waits for the head to finish)
    assert _blocked(db, first + later) == [False, False, True, True]
    processor.mark_completed([head])
    assert [r.id for r in processor.claim_records(10)] == [first[1]]


def test_claim_with_every_key_busy_reads_only_key_heads(processor: DistributedProcessor, db: Any) -> None:
    keys = [f"key-{i % 50}" for i in range(5000)]
    processor.add_records([{} for _ in keys], ordering_key=keys)
    assert len(processor.claim_records(100)) == 50  # one per key: every key is now busy
    params = {
        "queues": ["default"], "batch": 100, "instance_id": "x", "lease_seconds": 30, "token": None,
        "done_ids": "{}", "done_tokens": "{}", "done_results": None, "unblock_keys": "{}",
        "channels": [], "nqueues": [],
        "default_key_concurrency": 1, "default_block_on_failure": False, "announce": False,
        **start_params(["default"]),
    }
    with db.transaction(force_rollback=True):  # EXPLAIN ANALYZE really claims: roll it back
        plan = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + processor.q.claim, params).fetchone()

    def scans(node: dict[str, Any]) -> list[dict[str, Any]]:
        # the claim's own scan, under its row locks (the floor's one-row peek is the other use of the index)
        found = [c for c in node.get("Plans", []) if node["Node Type"] == "LockRows"
                 and c.get("Index Name") == "ix_processing_queue_pending"]
        for child in node.get("Plans", []):
            found += scans(child)
        return found

    (scan,) = scans(plan[0][0]["Plan"])
    # not the 4,950 pending records: only the 50 unblocked heads (one per busy key) are read
    assert scan["Actual Rows"] <= 50, scan["Actual Rows"]


def test_sweep_repairs_a_key_left_blocked(processor: DistributedProcessor, db: Any) -> None:
    ids = processor.add_records([{}, {}], ordering_key="k")
    db.execute("UPDATE processing_queue SET key_blocked = true")  # as a crash between claim and unblock might
    assert processor.claim_records(10) == []
    processor.cleanup_orphaned_records()
    assert [r.id for r in processor.claim_records(10)] == ids[:1]


def test_sweep_walks_every_key_in_bounded_slices(
    processor: DistributedProcessor, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.recovery as processor_module

    monkeypatch.setattr(processor_module, "SWEEP_KEYS", 2)
    keys = ["a", "b", "c", "d", "e"]
    ids = processor.add_records([{} for _ in keys], ordering_key=keys)
    db.execute("UPDATE processing_queue SET key_blocked = true")

    def blocked() -> set[str]:
        return {r[0] for r in db.execute("SELECT ordering_key FROM processing_queue WHERE key_blocked")}

    processor.cleanup_orphaned_records()
    assert blocked() == {"c", "d", "e"}  # one slice: the first two keys
    processor.cleanup_orphaned_records()
    assert blocked() == {"e"}
    processor.cleanup_orphaned_records()  # the last, short slice: the next sweep starts from the first key
    assert blocked() == set()
    db.execute("UPDATE processing_queue SET key_blocked = true WHERE ordering_key = 'a'")
    processor.cleanup_orphaned_records()
    assert blocked() == set()
    assert sorted(r.id for r in processor.claim_records(10)) == ids


def test_sweep_skips_a_head_someone_holds(processor: DistributedProcessor, db: Any, dsn: str) -> None:
    import psycopg

    ids = processor.add_records([{}, {}], ordering_key=["held", "free"])
    db.execute("UPDATE processing_queue SET key_blocked = true")
    with psycopg.connect(dsn) as other:  # a transaction holding the head of "held" (as a claim's unblock would)
        other.execute("SELECT 1 FROM processing_queue WHERE id = %s FOR UPDATE", (ids[0],))
        started = time.monotonic()
        processor.cleanup_orphaned_records()
        assert time.monotonic() - started < 5  # never waits for the lock (it used to, and could deadlock)
        rows = dict(db.execute("SELECT ordering_key, key_blocked FROM processing_queue").fetchall())
        assert rows == {"held": True, "free": False}
        other.rollback()
    processor.cleanup_orphaned_records()  # a later sweep gets it
    assert sorted(r.id for r in processor.claim_records(10)) == ids


def test_a_key_whose_record_is_recovered_to_failed_moves_on(
    make_processor: Any, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claimer dies between its claim and its next statement (which would unblock the key's next record),
    # and the record has no attempts left: recovery fails it and must make the next record claimable itself
    # (the sweep, switched off here, would only get there some cleanups later).
    import core.recovery as processor_module

    monkeypatch.setattr(processor_module, "SWEEP_KEYS", 0)
    a = make_processor(lease_seconds=1, max_attempts=1)
    ids = a.add_records([{}, {}], ordering_key="k")
    (first,) = a.claim_records(1)
    assert first.id == ids[0]
    db.execute("UPDATE processing_queue SET key_blocked = true WHERE id = %s", (ids[1],))
    b = make_processor(lease_seconds=1)
    wait_until(lambda: b.cleanup_orphaned_records() > 0, 10, interval=0.2)
    assert _statuses(db, ids) == ["failed", "pending"]
    assert [r.id for r in b.claim_records(10)] == ids[1:]


def test_serial_key_advances_without_waiting_for_a_poll(processor: DistributedProcessor) -> None:
    # No listener and a 5 s poll (jittered to 2.5-5 s): each record of a limit-1 key must start as soon as
    # the previous one's completion commits (the claimer claims again at once after a statement that freed a
    # key), not a poll interval later. A single wait for the poll takes at least 2.5 s.
    ids = processor.add_records([{"n": i} for i in range(20)], ordering_key="serial")
    seen: list[int] = []
    started = time.monotonic()
    summary = processor.run(lambda r: seen.append(r.id), stop_when_empty=True, listen=False, poll_interval=5.0,
                            handle_signals=False, register=False)
    elapsed = time.monotonic() - started
    assert seen == ids
    assert summary.processed == 20
    assert elapsed < 2.5, f"a serial key took {elapsed:.1f}s for 20 records"


def _spread(n_rounds: int) -> list[str]:
    """Keys of ``n_rounds`` rounds over KEY_GAP keys: each key's records exactly KEY_GAP apart."""
    return [f"k{i % KEY_GAP}" for i in range(n_rounds * KEY_GAP)]


def test_spread_out_records_of_a_key_are_inserted_claimable_and_still_wait_their_turn(
    processor: DistributedProcessor, db: Any
) -> None:
    ids = processor.add_records([{} for _ in range(2 * KEY_GAP)], ordering_key=_spread(2))
    later = processor.add_records([{}], ordering_key="k5")  # behind pending records of its key: blocked
    assert not any(_blocked(db, ids)) and _blocked(db, later) == [True]
    heads = processor.claim_records(KEY_GAP)
    assert [r.id for r in heads] == ids[:KEY_GAP]
    assert processor.claim_records(100) == []  # every second record's key is in flight
    processor.mark_completed(heads[:10])
    assert [r.id for r in processor.claim_records(100)] == ids[KEY_GAP:KEY_GAP + 10]


def test_a_retried_failure_blocks_its_keys_later_records_until_it_runs_again(make_processor: Any, db: Any) -> None:
    p = make_processor(retry=RetryPolicy(base_delay=60, jitter=0), max_attempts=3)
    ids = p.add_records([{} for _ in range(3 * KEY_GAP)], ordering_key=_spread(3))
    heads = p.claim_records(KEY_GAP)
    first, k0 = heads[0], ids[0::KEY_GAP]
    assert p.mark_failed([first], RuntimeError("boom")) == 1  # pending again, due in a minute
    # the key's later records were claimable (inserted so): now blocked, so claims neither take nor read them
    assert _blocked(db, k0) == [False, True, True]
    assert not any(_blocked(db, ids[1:KEY_GAP] + ids[KEY_GAP + 1:2 * KEY_GAP]))
    p.mark_completed(heads[1:])
    second = p.claim_records(2 * KEY_GAP)
    assert [r.id for r in second] == ids[KEY_GAP + 1:2 * KEY_GAP]  # every key's next record but k0's
    db.execute("UPDATE processing_queue SET run_at = now() WHERE id = %s", (first.id,))  # its backoff is over
    (again,) = p.claim_records(10)
    assert again.id == first.id and again.attempts == 2
    p.mark_completed([again])
    assert [r.id for r in p.claim_records(10)] == k0[1:2]  # then the key goes on in order
    assert _blocked(db, k0[2:]) == [False]


def test_a_failure_that_stops_its_key_blocks_its_later_records_until_an_operator_acts(
    make_processor: Any, db: Any
) -> None:
    p = make_processor(block_on_failure=True, max_attempts=1)
    ids = p.add_records([{} for _ in range(2 * KEY_GAP)], ordering_key=_spread(2))
    heads = p.claim_records(KEY_GAP)
    assert p.mark_failed([heads[0]], RuntimeError("boom")) == 1
    assert _blocked(db, [ids[KEY_GAP], ids[KEY_GAP + 1]]) == [True, False]
    p.mark_completed(heads[1:])
    assert [r.id for r in p.claim_records(2 * KEY_GAP)] == ids[KEY_GAP + 1:]
    assert p.cancel([ids[0]]) == {ids[0]: "cancelled"}
    assert [r.id for r in p.claim_records(10)] == [ids[KEY_GAP]]


def test_a_failure_that_ends_its_record_leaves_the_key_free(make_processor: Any, db: Any) -> None:
    p = make_processor(max_attempts=1)
    ids = p.add_records([{} for _ in range(2 * KEY_GAP)], ordering_key=_spread(2))
    heads = p.claim_records(KEY_GAP)
    assert p.mark_failed([heads[0]], RuntimeError("boom")) == 1
    assert _statuses(db, ids[:1]) == ["failed"] and _blocked(db, [ids[KEY_GAP]]) == [False]
    assert [r.id for r in p.claim_records(10)] == [ids[KEY_GAP]]


def test_a_later_batch_follows_its_keys_claimable_only_where_claims_reach_it_later(
    processor: DistributedProcessor, db: Any
) -> None:
    keys = [f"k{i}" for i in range(KEY_GAP)]
    first = processor.add_records([{} for _ in keys], ordering_key=keys)
    second = processor.add_records([{} for _ in keys], ordering_key=keys)  # each KEY_GAP ids behind
    assert not any(_blocked(db, first + second))
    close = processor.add_records([{}], ordering_key=keys[-1])  # right behind its key's last record
    urgent = processor.add_records([{}], ordering_key="k0", priority=5)  # claims would reach it first
    elsewhere = processor.add_records([{}], ordering_key="k1", queue="other")  # another queue's claims
    earlier = processor.add_records([{}], ordering_key="k2", run_at=datetime.now(timezone.utc) - timedelta(hours=1))
    later = processor.add_records([{}], ordering_key="k3", delay=3600)  # due after its key's last record
    assert _blocked(db, close + urgent + elsewhere + earlier + later) == [True, True, True, True, False]
    # a claimable record behind a blocked one is blocked too
    assert _blocked(db, processor.add_records([{}], ordering_key="k0", priority=-1)) == [True]
    # every key's first record; the second ones wait for them (their keys are in flight), the rest are blocked
    assert [r.id for r in processor.claim_records(2 * KEY_GAP)] == first
