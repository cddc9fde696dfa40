"""Retries and backoff, attempts running out, fencing of stale leases: the same on both backends."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from core import RetryPolicy
from core.api import ProcessorAPI
from tests.conformance.conftest import Clock, counts, ids

# Both clocks read microseconds; the fake one is exact, PostgreSQL's now() is its transaction's start.
EPSILON = timedelta(milliseconds=5)


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=30, jitter=0))
def test_a_retryable_failure_goes_back_to_pending_after_its_backoff(processor: ProcessorAPI) -> None:
    processor.add_records([{}])
    (rec,) = processor.claim_records()
    assert processor.mark_failed([rec], ValueError("bad value 42")) == 1
    status = processor.get_queue_status()["queues"]["default"]
    assert (status["pending"], status["due"], status["processing"], status["failed"]) == (1, 0, 0, 0)
    assert processor.claim_records() == []  # waiting on its backoff


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0.3, multiplier=2, jitter=0), max_attempts=3)
def test_the_backoff_grows_with_each_attempt(processor: ProcessorAPI, clock: Clock) -> None:
    (rid,) = processor.add_records([{}])
    (rec,) = processor.claim_records()
    for attempt, delay in ((1, 0.3), (2, 0.6)):
        assert rec.attempts == attempt
        before = clock.now()
        processor.mark_failed([rec], RuntimeError(f"try {attempt}"))
        after = clock.now()
        (rec,) = clock.until(lambda: processor.claim_records(), after=delay)
        wait = timedelta(seconds=delay)
        assert before + wait - EPSILON <= rec.run_at <= after + wait + EPSILON
        assert rec.id == rid
    assert rec.attempts == 3


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0, jitter=0), max_attempts=2)
def test_a_record_out_of_attempts_ends_failed(processor: ProcessorAPI) -> None:
    (rid,) = processor.add_records([{}])
    for attempt in (1, 2):
        (rec,) = processor.claim_records()
        assert (rec.id, rec.attempts, rec.is_last_attempt) == (rid, attempt, attempt == 2)
        assert processor.mark_failed([rec], RuntimeError(f"try {attempt}")) == 1
    assert counts(processor) == {"pending": 0, "processing": 0, "completed": 0, "failed": 1, "cancelled": 0}
    assert processor.claim_records() == []
    processor.add_records([{}], max_attempts=1)  # a batch's own max_attempts wins over the processor's
    (rec,) = processor.claim_records()
    processor.mark_failed([rec], RuntimeError("once"))
    assert counts(processor)["failed"] == 2


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0, jitter=0, no_retry_on=(KeyError,)))
def test_errors_the_policy_does_not_retry_fail_at_once(processor: ProcessorAPI) -> None:
    processor.add_records([{}, {}, {}])
    a, b, c = processor.claim_records(3)
    processor.mark_failed([a], KeyError("missing"))
    processor.mark_failed([b], RuntimeError("transient"))
    processor.mark_failed([c], "explicit", retry=False)
    assert counts(processor) == {"pending": 1, "processing": 0, "completed": 0, "failed": 2, "cancelled": 0}
    assert ids(processor.claim_records(3)) == [b.id]


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0.5, jitter=0), max_attempts=3)
def test_a_failing_head_holds_its_key_until_it_succeeds(processor: ProcessorAPI, clock: Clock) -> None:
    head, behind = processor.add_records([{}, {}], ordering_key="k")
    (rec,) = processor.claim_records(10)
    processor.mark_failed([rec], RuntimeError("retry me"))
    assert processor.claim_records(10) == []  # the head waits for its backoff, its key with it
    (rec,) = clock.until(lambda: processor.claim_records(10), after=0.5)
    assert (rec.id, rec.attempts) == (head, 2)
    processor.mark_completed([rec])
    assert ids(processor.claim_records(10)) == [behind]


@pytest.mark.dp_options(max_attempts=1)
def test_a_head_that_fails_for_good_frees_its_key(processor: ProcessorAPI) -> None:
    head, behind = processor.add_records([{}, {}], ordering_key="k")
    (rec,) = processor.claim_records(10)
    assert rec.id == head
    processor.mark_failed([rec], RuntimeError("boom"))
    assert ids(processor.claim_records(10)) == [behind]


@pytest.mark.dp_options(max_attempts=1)
def test_a_key_that_blocks_on_failure_waits_for_an_operator(processor: ProcessorAPI) -> None:
    processor.set_key_concurrency("strict-*", 1, block_on_failure=True)
    strict = processor.add_records([{}, {}], ordering_key="strict-1")
    loose = processor.add_records([{}, {}], ordering_key="loose-1")
    recs = processor.claim_records(10)
    assert sorted(ids(recs)) == sorted([strict[0], loose[0]])  # ids grow with inserts on one database only
    processor.mark_failed(recs, "boom")
    assert ids(processor.claim_records(10)) == [loose[1]]
    assert processor.cancel([strict[0]]) == {strict[0]: "cancelled"}  # the operator gives up on the head
    assert ids(processor.claim_records(10)) == [strict[1]]


@pytest.mark.dp_options(lease_seconds=0.5)
def test_a_stale_claim_cannot_complete_a_record_claimed_again(processor: ProcessorAPI, clock: Clock) -> None:
    (rid,) = processor.add_records([{"job": 1}])
    (stale,) = processor.claim_records()
    assert processor.cleanup_orphaned_records() == 0  # its lease still runs
    assert clock.until(lambda: processor.cleanup_orphaned_records() == 1, after=0.6)
    (current,) = processor.claim_records()
    assert (current.id, current.attempts) == (rid, 2) and current.lease_token != stale.lease_token
    # The first holder comes back late: every outcome of its claim is fenced out.
    assert processor.mark_completed([stale]) == 0
    assert processor.mark_failed([stale], RuntimeError("late")) == 0
    assert processor.release_records([stale]) == 0
    assert processor.extend_leases([stale]) == (set(), set())
    assert counts(processor)["processing"] == 1
    assert processor.mark_completed([stale, current]) == 1
    assert counts(processor) == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0}


@pytest.mark.dp_options(lease_seconds=0.5, max_attempts=1)
def test_an_expired_lease_on_its_last_attempt_ends_failed(processor: ProcessorAPI, clock: Clock) -> None:
    processor.add_records([{}])
    (rec,) = processor.claim_records()
    assert clock.until(lambda: processor.cleanup_orphaned_records() == 1, after=0.6)
    assert counts(processor)["failed"] == 1
    assert processor.mark_completed([rec]) == 0


def test_a_record_completes_once_and_only_under_its_own_token(processor: ProcessorAPI) -> None:
    processor.add_records([{}, {}])
    first, second = processor.claim_records(2)
    forged = first._replace(lease_token=uuid.uuid4())
    assert processor.mark_completed([forged]) == 0
    assert processor.mark_completed([first, second]) == 2
    assert processor.mark_completed([first, second]) == 0
    assert counts(processor)["completed"] == 2


def test_release_hands_a_record_back_without_charging_the_attempt(processor: ProcessorAPI) -> None:
    (rid,) = processor.add_records([{}])
    (rec,) = processor.claim_records()
    kept, cancels = processor.extend_leases([rec])
    assert (kept, cancels) == ({rid}, set())
    assert processor.release_records([rec]) == 1
    (again,) = processor.claim_records()
    assert (again.id, again.attempts) == (rid, 1)
