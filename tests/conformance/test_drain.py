"""core.testing.drain on both backends: outcomes per record, retries waited for, what it leaves behind."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from core import Record, RetryPolicy
from core.api import ProcessorAPI
from core.testing.drain import drain
from tests.conformance.conftest import Clock, counts


def test_drain_completes_every_record_in_claim_order(processor: ProcessorAPI) -> None:
    low = processor.add_records([{"n": 1}, {"n": 2}])
    high = processor.add_records([{"n": 3}], priority=9)
    other = processor.add_records([{"n": 4}], queue="other")
    seen: list[dict[str, Any]] = []
    out = drain(processor, lambda r: seen.append(r.payload))
    assert out.completed == high + low and seen == [{"n": 3}, {"n": 1}, {"n": 2}]
    assert (out.handled, out.failed, out.retries, out.pending) == (3, {}, {}, 0)
    assert drain(processor, lambda r: None, queues=["other"]).completed == other
    assert counts(processor)["completed"] == 3


@pytest.mark.dp_options(retry=RetryPolicy(base_delay=0.2, multiplier=2, jitter=0), max_attempts=3)
def test_drain_waits_out_backoffs_and_fails_records_out_of_attempts(processor: ProcessorAPI, clock: Clock) -> None:
    ok, flaky, bad = processor.add_records([{"fail": 0}, {"fail": 2}, {"fail": 99}])

    def handler(record: Record) -> None:
        if record.attempts <= record.payload["fail"]:
            raise ValueError(f"attempt {record.attempts} of {record.id}")

    started = clock.now()
    out = drain(processor, handler)
    assert out.completed == [ok, flaky]
    assert out.retries == {flaky: 2, bad: 2}
    assert list(out.failed) == [bad] and str(out.failed[bad]) == f"attempt 3 of {bad}"
    assert [(a.attempt, a.outcome) for a in out.attempts if a.id == flaky] == [
        (1, "retried"), (2, "retried"), (3, "completed")]
    assert out.handled == 7
    assert clock.now() - started >= timedelta(seconds=0.6)  # two backoffs, 0.2 s and 0.4 s, passed
    assert counts(processor) == {"pending": 0, "processing": 0, "completed": 2, "failed": 1, "cancelled": 0}


def test_drain_stops_after_max_records(processor: ProcessorAPI) -> None:
    first = processor.add_records([{}] * 5)
    out = drain(processor, lambda r: None, max_records=2)
    assert out.completed == first[:2] and out.pending == 3
    assert counts(processor)["pending"] == 3


@pytest.mark.dp_options(max_attempts=1)
def test_drain_returns_when_what_is_left_is_a_stopped_key(processor: ProcessorAPI) -> None:
    processor.set_key_concurrency("strict-*", 1, block_on_failure=True)
    head, behind = processor.add_records([{"fail": True}, {}], ordering_key="strict-1")
    free = processor.add_records([{}])

    def handler(record: Record) -> None:
        if record.payload.get("fail"):
            raise RuntimeError("boom")

    out = drain(processor, handler, timeout=5)
    assert list(out.failed) == [head] and out.completed == free
    assert out.pending == 1 and behind not in out.completed


def test_drain_reports_a_cancel_requested_while_its_handler_ran(processor: ProcessorAPI) -> None:
    keep, drop = processor.add_records([{}, {"cancel": True}])

    def handler(record: Record) -> None:
        if record.payload.get("cancel"):
            assert processor.cancel([record.id]) == {record.id: "processing"}

    out = drain(processor, handler)
    assert out.completed == [keep] and out.cancelled == [drop]
    assert counts(processor)["cancelled"] == 1


@pytest.mark.dp_options(lease_seconds=0.5)
def test_drain_reports_an_outcome_fenced_out_by_a_lost_lease(processor: ProcessorAPI, clock: Clock) -> None:
    (rid,) = processor.add_records([{}])
    stolen: list[Record] = []

    def slow_handler(record: Record) -> None:
        # Outlives its lease: recovered and claimed again (by the test) before it returns.
        assert clock.until(lambda: processor.cleanup_orphaned_records() == 1, after=0.6)
        stolen.extend(processor.claim_records())

    out = drain(processor, slow_handler)
    assert out.lost == [rid] and out.completed == [] and [r.id for r in stolen] == [rid]
    assert counts(processor)["processing"] == 1
    assert processor.mark_completed(stolen) == 1


def test_drain_runs_a_coroutine_handler(processor: ProcessorAPI) -> None:
    ids = processor.add_records([{}, {}])
    seen: list[int] = []

    async def handler(record: Record) -> None:
        seen.append(record.id)

    assert drain(processor, handler).completed == ids == seen


def test_drain_waits_for_scheduled_records_within_its_timeout(
        processor: ProcessorAPI, clock: Clock, backend: str) -> None:
    later = processor.add_records([{}], delay=60)
    if backend == "memory":
        # A fake clock is moved to the record's run_at: a minute passes at once.
        started = clock.now()
        assert drain(processor, lambda r: None, timeout=1).completed == later
        assert clock.now() - started >= timedelta(seconds=60)
    else:
        with pytest.raises(TimeoutError, match=r"still wait for their run_at after 0.3s \(1 pending\)"):
            drain(processor, lambda r: None, timeout=0.3)
        assert counts(processor)["pending"] == 1
