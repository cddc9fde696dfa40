"""Drain a processor through a handler in the calling thread and say what became of every record.

:func:`drain` works the same on :class:`core.DistributedProcessor` and on the in-memory processor: it claims
batches, calls the handler once per record, completes the records it returned for and fails the ones it
raised for (through the processor's retry policy), until nothing claimable is left.

Time: records waiting on a backoff or a ``run_at`` are waited for. On an in-memory processor with a fake
clock, drain moves the clock forward to the moment the next of them is due (``next_due()``) when nothing
else is claimable, so a test with backoffs of minutes takes no time; elsewhere it polls (real time) until
they are due, within ``timeout``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.api import ProcessorAPI
from core.checks import check_queues
from core.record import Record
from core.testing.memory import InMemoryProcessor

__all__ = ["Attempt", "Outcomes", "drain"]


@dataclass(frozen=True)
class Attempt:
    """One handler call: the record's id, its attempt number, what came of it and the error it raised."""

    id: int
    attempt: int
    #: ``completed``, ``retried`` (failed, pending again after its backoff), ``failed`` (for good),
    #: ``cancelled`` (cancel requested while held) or ``lost`` (its lease expired: the outcome was fenced out)
    outcome: str
    error: BaseException | None = None


@dataclass
class Outcomes:
    """What :func:`drain` did. ``attempts`` lists every handler call in order; the rest summarise it."""

    attempts: list[Attempt] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)  #: ids, in the order they completed
    failed: dict[int, BaseException] = field(default_factory=dict)  #: id -> the error that failed it for good
    retries: dict[int, int] = field(default_factory=dict)  #: id -> how many failures were retried
    cancelled: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    #: pending records of the drained queues left when drain returned: past ``max_records``, or due but not
    #: claimable (their key held elsewhere or stopped by ``block_on_failure``)
    pending: int = 0

    @property
    def handled(self) -> int:
        """How many times the handler was called."""
        return len(self.attempts)

    def add(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        if attempt.outcome == "completed":
            self.completed.append(attempt.id)
        elif attempt.outcome == "retried":
            self.retries[attempt.id] = self.retries.get(attempt.id, 0) + 1
        elif attempt.outcome == "failed":
            self.failed[attempt.id] = attempt.error or RuntimeError("failed")
        elif attempt.outcome == "cancelled":
            self.cancelled.append(attempt.id)
        else:
            self.lost.append(attempt.id)


Handler = Callable[[Record], Any]


def drain(
    processor: ProcessorAPI,
    handler: Handler,
    *,
    queues: Sequence[str] | None = None,
    max_records: int | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    poll_interval: float = 0.02,
) -> Outcomes:
    """Claim and handle records of ``queues`` (default: the processor's) until none is left to claim.

    ``handler(record)`` (a coroutine function is run to completion) returning completes the record, raising
    fails it. Stops after ``max_records`` handler calls if given. Raises ``TimeoutError`` if records are still
    pending after ``timeout`` wall-clock seconds; returns the :class:`Outcomes`. Records another process holds
    are not waited for.
    """
    queue_list = check_queues(queues, processor.settings.queue)
    size = processor.batch_size if batch_size is None else batch_size
    deadline = time.monotonic() + timeout
    waiter = _Waiter(processor, queue_list, poll_interval)
    out = Outcomes()
    looked_again = False
    while max_records is None or out.handled < max_records:
        room = size if max_records is None else min(size, max_records - out.handled)
        batch = processor.claim_records(room, queues=queue_list)
        if batch:
            looked_again = False
            _handle(processor, handler, batch, out)
            continue
        pending, due = _pending(processor, queue_list)
        if pending == due and due and not looked_again:
            # A record may have come due between the claim and the count (a backoff ending): claim once more
            # before deciding that what is due cannot be claimed.
            looked_again = True
            continue
        if pending == due:
            # Nothing waits for its run_at: what is left is due yet not claimable (a held or stopped key, a
            # key limit reached by records held elsewhere), and only another outcome can change that.
            out.pending = pending
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain: records still wait for their run_at after {timeout:g}s ({pending} pending)")
        waiter.wait()
    out.pending = _pending(processor, queue_list)[0]
    return out


def _pending(processor: ProcessorAPI, queues: list[str]) -> tuple[int, int]:
    """(pending, due) over ``queues``."""
    status = processor.get_queue_status(statuses=["pending"])["queues"]
    rows = [status[q] for q in queues if q in status]
    return sum(r["pending"] for r in rows), sum(r["due"] for r in rows)


class _Waiter:
    """Lets time pass while nothing is due: an in-memory processor's fake clock is moved to the moment the
    next record comes due (``next_due``); real time is slept in short polls."""

    def __init__(self, processor: ProcessorAPI, queues: list[str], poll_interval: float) -> None:
        self.memory = processor if isinstance(processor, InMemoryProcessor) and processor.clock else None
        self.queues = queues
        self.poll_interval = poll_interval

    def wait(self) -> None:
        clock = self.memory.clock if self.memory is not None else None
        if self.memory is None or clock is None:
            time.sleep(self.poll_interval)
            return
        when = self.memory.next_due(self.queues)
        wait = (when - clock.now()).total_seconds() if when is not None else 0.0
        # At least a microsecond (the clocks' resolution): a clock that did not move would find nothing new.
        clock.advance(max(wait, 1e-6))


def _call(handler: Handler, record: Record) -> None:
    result = handler(record)
    if inspect.isawaitable(result):
        asyncio.run(_awaited(result))


async def _awaited(awaitable: Any) -> None:
    await awaitable


def _handle(processor: ProcessorAPI, handler: Handler, batch: list[Record], out: Outcomes) -> None:
    results: list[tuple[Record, BaseException | None]] = []
    for record in batch:
        try:
            _call(handler, record)
        except Exception as exc:  # the handler's failure is the record's outcome, as in run()
            results.append((record, exc))
        else:
            results.append((record, None))
    # One beat for the batch: a cancel requested while it ran turns its outcome into cancelled.
    _, cancels = processor.extend_leases(batch)
    for record, error in results:
        if error is None:
            done = processor.mark_completed([record])
            outcome = "cancelled" if record.id in cancels else "completed"
        else:
            done = processor.mark_failed([record], error)
            retryable = processor.retry.should_retry(error) and record.attempts < record.max_attempts
            outcome = "cancelled" if record.id in cancels else "retried" if retryable else "failed"
        out.add(Attempt(record.id, record.attempts, outcome if done else "lost", error))
