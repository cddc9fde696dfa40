"""Claim order, per-key order, dedupe, queue and key limits: the same on both backends."""

from __future__ import annotations

import pytest

from core import QueueFull
from core.api import ProcessorAPI
from tests.conformance.conftest import Clock, ago, counts, ids


def test_claims_by_priority_then_run_at_then_id(processor: ProcessorAPI, clock: Clock) -> None:
    late = processor.add_records([{"n": 1}, {"n": 2}], run_at=ago(clock, 5))
    early = processor.add_records([{"n": 3}, {"n": 4}], run_at=ago(clock, 10))
    urgent = processor.add_records([{"n": 5}], priority=5, run_at=ago(clock, 1))
    now = processor.add_records([{"n": 6}, {"n": 7}])
    lowest = processor.add_records([{"n": 8}], priority=-1, run_at=ago(clock, 60))
    expected = urgent + early + late + now + lowest
    got: list[int] = []
    for size in (1, 2, 3, 10):  # the order carries on across batches
        got += ids(processor.claim_records(size))
    assert got == expected
    assert processor.claim_records(10) == []


def test_a_claim_returns_the_record_under_a_fresh_lease(processor: ProcessorAPI) -> None:
    (rid,) = processor.add_records([{"x": 1}], max_attempts=4)
    (rec,) = processor.claim_records()
    assert (rec.id, rec.payload, rec.attempts, rec.max_attempts, rec.queue) == (rid, {"x": 1}, 1, 4, "default")
    assert (rec.lease_expires_at - rec.claimed_at).total_seconds() == pytest.approx(processor.lease_seconds)
    assert counts(processor) == {"pending": 0, "processing": 1, "completed": 0, "failed": 0, "cancelled": 0}


def test_future_records_wait_for_their_run_at(processor: ProcessorAPI, clock: Clock) -> None:
    later = processor.add_records([{"later": True}], delay=1.0)
    due = processor.add_records([{"now": True}])
    assert ids(processor.claim_records(10)) == due
    assert processor.claim_records(10) == []
    assert ids(clock.until(lambda: processor.claim_records(10), after=1.0)) == later


def test_several_queues_in_one_claim_keep_one_order(processor: ProcessorAPI) -> None:
    a = processor.add_records([{}] * 3, queue="a")
    b = processor.add_records([{}] * 3, queue="b", priority=1)
    c = processor.add_records([{}] * 3, queue="c")
    assert ids(processor.claim_records(5, queues=["a", "b", "c"])) == b + a[:2]
    assert ids(processor.claim_records(10, queues=["c"])) == c
    assert processor.claim_records(10) == []  # the default queue has none


def test_one_record_per_key_in_flight_in_key_order(processor: ProcessorAPI) -> None:
    keyed = processor.add_records([{"n": i} for i in range(4)], ordering_key="k")
    other = processor.add_records([{}], ordering_key="other")
    free = processor.add_records([{}, {}])
    first = processor.claim_records(10)
    assert ids(first) == [keyed[0], other[0], *free]  # keys run side by side, each one at a time
    assert processor.claim_records(10) == []
    assert processor.mark_completed(first[:1]) == 1
    assert ids(processor.claim_records(10)) == [keyed[1]]


def test_a_later_higher_priority_record_does_not_jump_its_key(processor: ProcessorAPI) -> None:
    first = processor.add_records([{}], ordering_key="k")
    second = processor.add_records([{}], ordering_key="k", priority=100)
    claimed = processor.claim_records(10)
    assert ids(claimed) == first
    assert processor.claim_records(10) == []
    processor.mark_completed(claimed)
    assert ids(processor.claim_records(10)) == second


def test_a_scheduled_head_blocks_its_key(processor: ProcessorAPI, clock: Clock) -> None:
    head = processor.add_records([{}], ordering_key="k", delay=0.8)
    behind = processor.add_records([{}], ordering_key="k")  # due, but behind a head that is not
    free = processor.add_records([{}])
    assert ids(processor.claim_records(10)) == free
    (rec,) = clock.until(lambda: processor.claim_records(10), after=0.8)
    assert rec.id == head[0]
    processor.mark_completed([rec])
    assert ids(processor.claim_records(10)) == behind


def test_dedupe_returns_the_existing_id_while_pending(processor: ProcessorAPI) -> None:
    first = processor.add_records([{"v": 1}], dedupe_key="sync-1")
    again = processor.add_records([{"v": 2}, {"v": 3}], dedupe_key=["sync-1", "sync-2"])
    assert again[0] == first[0] and again.deduplicated == [0] and again[1] != first[0]
    assert processor.add_records([{}], dedupe_key="sync-1", queue="other").deduplicated == []  # per queue
    same_batch = processor.add_records([{}, {}], dedupe_key=["twice", "twice"])
    assert same_batch[0] == same_batch[1] and same_batch.deduplicated == [1]
    assert counts(processor)["pending"] == 3
    claimed = {r.id for r in processor.claim_records(10)}
    assert first[0] in claimed
    # dedupe_while="pending" (the default): once claimed, the key may be queued again
    fresh = processor.add_records([{"v": 4}], dedupe_key="sync-1")
    assert fresh.deduplicated == [] and fresh[0] not in claimed


def test_dedupe_while_active_holds_the_key_through_processing_and_retries(processor: ProcessorAPI) -> None:
    (rid,) = processor.add_records([{}], dedupe_key="d", dedupe_while="active")
    (rec,) = processor.claim_records()
    held = processor.add_records([{}], dedupe_key="d", dedupe_while="active")
    assert list(held) == [rid] and held.deduplicated == [0]
    processor.mark_failed([rec], RuntimeError("again"))  # pending again: still the key's record
    assert processor.add_records([{}], dedupe_key="d").deduplicated == [0]
    assert counts(processor)["pending"] == 1


@pytest.mark.dp_options(max_attempts=1)
def test_dedupe_key_is_free_again_once_its_record_finished(processor: ProcessorAPI) -> None:
    processor.add_records([{}, {}], dedupe_key=["c", "f"], dedupe_while="active")
    done, failed = processor.claim_records(2)
    processor.mark_completed([done])
    processor.mark_failed([failed], RuntimeError("boom"))
    again = processor.add_records([{}, {}], dedupe_key=["c", "f"], dedupe_while="active")
    assert again.deduplicated == [] and not set(again) & {done.id, failed.id}


def test_a_queue_limit_refuses_the_whole_batch_past_it(processor: ProcessorAPI) -> None:
    processor.set_queue_limit("lim", 2)
    with pytest.raises(QueueFull) as full:
        processor.add_records([{}, {}, {}], queue="lim")
    assert (full.value.queue, full.value.limit, full.value.depth, full.value.adding) == ("lim", 2, 0, 3)
    assert counts(processor, "lim")["pending"] == 0  # nothing of the batch was written
    processor.add_records([{}, {}], queue="lim")
    with pytest.raises(QueueFull) as full:
        processor.add_records([{}], queue="lim")
    assert (full.value.depth, full.value.adding) == (2, 1)
    processor.add_records([{}] * 5)  # other queues are not limited
    assert len(processor.claim_records(1, queues=["lim"])) == 1  # the limit counts pending records only
    processor.add_records([{}], queue="lim")
    processor.set_queue_limit("lim", None)
    processor.add_records([{}] * 10, queue="lim")
    assert counts(processor, "lim")["pending"] == 12


def test_a_queue_limit_of_zero_refuses_every_record(processor: ProcessorAPI) -> None:
    processor.set_queue_limit("closed", 0)
    with pytest.raises(QueueFull):
        processor.add_records([{}], queue="closed")
    assert counts(processor, "closed")["pending"] == 0


def claim_all(processor: ProcessorAPI) -> list[int]:
    """Claim until a claim comes back empty (a key's next record is let through by the claim after the one
    that took its predecessor, so a key limit above one is reached over several claims)."""
    got: list[int] = []
    for _ in range(20):
        batch = ids(processor.claim_records(10))
        if not batch:
            return got
        got += batch
    raise AssertionError(f"claims never ran dry: {got}")


def test_key_limits_by_pattern_and_exact_key(processor: ProcessorAPI) -> None:
    acct = processor.add_records([{}] * 5, ordering_key="acct-7")
    other = processor.add_records([{}] * 2, ordering_key="user-1")
    processor.set_key_concurrency("acct-*", 3)
    got = claim_all(processor)
    assert sorted(got) == sorted([*acct[:3], other[0]])  # keys without a setting keep the default of one
    assert [i for i in got if i in acct] == acct[:3]  # in key order
    processor.set_key_concurrency("acct-7", 4)  # an exact key wins over a pattern
    assert claim_all(processor) == [acct[3]]
    processor.set_key_concurrency("acct-7", None)
    processor.set_key_concurrency("acct-*", None)  # back to the default of one: four are in flight already
    assert processor.claim_records(10) == []


def test_a_longer_pattern_wins_over_a_shorter_one(processor: ProcessorAPI) -> None:
    keyed = processor.add_records([{}] * 4, ordering_key="eu-acct-1")
    processor.set_key_concurrency("eu-*", 1)
    processor.set_key_concurrency("eu-acct-*", 3)
    assert claim_all(processor) == keyed[:3]
