"""The completion buffer's policy when the claimer has no room: a plain run writes its finished records at once; a
run over flows lets them wait up to FLOW_COALESCE_SECONDS for the claim that takes their children (then they are
written), telling the claimer how long it may wait. A finished record waiting there is never failed by the
handler timeout. Pure buffer logic: the store only records what it is asked to write."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from core.config import Settings
from core.flows import Flow
from core.flows.dispatch import FlowHandler
from core.metrics import Metrics
from core.record import Record
from core.worker.completer import COALESCE_SECONDS, FLOW_COALESCE_SECONDS, Completer
from core.worker.heartbeat import Heartbeat
from core.worker.state import Held, RunOptions, RunState


class WritesRecorded:
    def __init__(self) -> None:
        self.completed: list[list[int]] = []
        self.failed: list[int] = []
        self.owed_looks = 0
        self.forced: list[bool] = []
        self.looked = threading.Event()

    def complete(self, records: list[Record], keys: list[str]) -> int:
        self.completed.append([r.id for r in records])
        return len(records)

    def fail(self, records: list[Record], err: BaseException, retryable: bool, policy: Any) -> list[Any]:
        self.failed.extend(r.id for r in records)
        return [(r.id, "failed") for r in records]

    def notify_owed(self, *, force: bool = False) -> None:
        self.owed_looks += 1
        self.forced.append(force)
        if self.owed_looks >= 3:
            self.looked.set()


def completer(handler: Any, handler_timeout: float | None = None) -> tuple[Completer, WritesRecorded]:
    store = WritesRecorded()
    options = RunOptions(handler=handler, concurrency=1, queues=["q"], stop_when_empty=True, stop_event=None,
                         transactional=False, handler_timeout=handler_timeout, poll_interval=1.0, listen=False,
                         handle_signals=False, grace_seconds=1.0, prefetch=None, register=False, metadata={},
                         claimers=1)
    state = RunState(store, Settings.build("postgresql://x/y", database=False), Metrics("t"),  # type: ignore[arg-type]
                     options)
    return Completer(state), store


def held(rid: int) -> Held:
    now = datetime.now(timezone.utc)
    h = Held(Record(rid, "q", {}, 0, 1, 5, uuid.uuid4(), now, now, now, now))
    h.started = time.monotonic()
    return h


def test_a_plain_run_without_room_writes_its_finished_records_at_once() -> None:
    c, store = completer(lambda record: None)
    assert c.coalesce == COALESCE_SECONDS
    assert c.flush_for_room() == float("inf")  # nothing to write: the claimer waits as long as it likes
    c.add_done([held(1)])
    assert c.flush_for_room() is None
    assert store.completed == [[1]]


def test_a_run_over_flows_without_room_waits_for_a_claim_then_writes() -> None:
    chain = Flow("buffered")

    @chain.step()
    def only(record: Record) -> None:
        return None

    c, store = completer(FlowHandler([chain], None))
    assert c.coalesce == FLOW_COALESCE_SECONDS > COALESCE_SECONDS
    c.add_done([held(1)])
    left = c.flush_for_room()  # young: left for the claim that comes when room opens
    assert left is not None and 0 < left <= FLOW_COALESCE_SECONDS
    assert store.completed == [] and c.pending() == 1
    c._done_since -= FLOW_COALESCE_SECONDS  # as if it had waited its time
    assert c.flush_for_room() is None
    assert store.completed == [[1]] and c.pending() == 0


def test_a_finished_record_waiting_for_its_completion_is_not_timed_out() -> None:
    c, store = completer(lambda record: None, handler_timeout=0.5)
    beat = Heartbeat(c.s, c)
    h, slow = held(1), held(2)
    h.started = slow.started = time.monotonic() - 10  # both started long ago
    h.finished = True  # its handler returned in time: the success waits in the buffer
    c.s.held.update({1: h, 2: slow})
    c.add_done([h])
    beat._check_timeouts()
    assert store.failed == [2] and not h.abandoned and slow.abandoned
    assert c.flush_for_room() is None and store.completed == [[1]]


def test_the_completer_thread_sends_held_back_wake_ups_with_no_outcome_arriving() -> None:
    """Keyed completions' wake-ups held back for their window (core.claims.KeyNotices) go out from the completer
    thread's loop, which turns every 10 ms whether or not an outcome arrives; at its stop, all of them."""
    c, store = completer(lambda record: None)
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    try:
        assert store.looked.wait(5.0), "the loop looked for held-back wake-ups again and again"
    finally:
        c.s.outcomes.put(None)
        thread.join(5.0)
    assert not thread.is_alive()
    assert not any(store.forced[:-1]) and store.forced[-1], "the loop sends those due; the stop, all of them"
