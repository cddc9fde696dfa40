"""Executing handlers: long-lived handler threads pulling chunks from one queue, coroutine handlers on an
event-loop thread, transactional handlers whose database work commits with the record's completion."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core import tracing
from core.errors import DatabaseUnavailable
from core.flows.dispatch import FlowHandler
from core.record import Record, with_result
from core.worker.completer import Completer
from core.worker.state import Held, LeaseLost, Outcome, RunState, current

log = logging.getLogger("core.worker")

# Handler time one thread runs back to back before other threads get the rest of what it took.
CHUNK_SECONDS = 0.002


class Executor:
    def __init__(self, state: RunState, completer: Completer, spawn: Callable[[str, Callable[[], Any]], None]) -> None:
        self.s = state
        self.completer = completer
        self.spawn = spawn
        handler = state.options.handler
        self.concurrency = state.options.concurrency
        self.transactional = state.options.transactional
        # A run over flows: each record's step says whether it is transactional; a step's result is kept.
        self.flows = handler if isinstance(handler, FlowHandler) else None
        self.is_async = inspect.iscoroutinefunction(handler)
        # With a tracer provider configured, each call in a `process` span (core/tracing.py); else the handler
        # itself: without one nothing on the per-record path changes.
        traced = tracing.traced_handler(handler, is_async=self.is_async, trace_parent=state.options.trace_parent,
                                        instance_id=state.settings.instance_id)
        self.handler = handler if traced is None else traced
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        if self.is_async:
            self._loop = asyncio.new_event_loop()
            self.spawn("dp-asyncio", self._loop.run_forever)
        else:
            # Long-lived handler threads pulling from one deque: no per-record future or executor hop.
            for i in range(self.concurrency):
                self.spawn(f"dp-handler-{i}", self._handler_loop)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def dispatch(self, records: list[Record]) -> None:
        s = self.s
        helds = [Held(r) for r in records]
        with s.lock:
            for h in helds:
                s.held[h.record.id] = h
            s.summary.claimed += len(records)
        if self._loop is not None:
            for h in helds:
                asyncio.run_coroutine_threadsafe(self._execute_async(h), self._loop)
            return
        with s.ready_cv:
            s.ready.extend(helds)
            # Wake as many handler threads as there are chunks to take, not one per record.
            chunk = self._chunk_size(len(s.ready))
            s.ready_cv.notify(min(self.concurrency, -(-len(s.ready) // chunk)))

    # ------------------------------------------------------------------ handler threads

    def _handler_loop(self) -> None:
        s = self.s
        ready, cv = s.ready, s.ready_cv
        while True:
            with cv:
                while not ready:
                    if s.finished.is_set() or s.aborted.is_set():
                        return
                    cv.wait(0.25)
                take = self._chunk_size(len(ready))
                mine = [ready.popleft() for _ in range(take)]
            if self.transactional:
                for held in mine:
                    self._execute_transactional(held)
            elif self.flows is not None and self.flows.any_transactional:
                for held in [h for h in mine if self.flows.transactional(h.record)]:
                    self._execute_transactional(held)
                rest = [h for h in mine if not self.flows.transactional(h.record)]
                if rest:
                    self._execute_chunk(rest)
            else:
                self._execute_chunk(mine)

    def _chunk_size(self, waiting: int) -> int:
        """How many waiting records one handler thread takes: its fair share, or, when handlers are short, as
        many as fit in CHUNK_SECONDS of their measured time (a hand-off between threads costs more than a
        handler that returns in microseconds)."""
        fair = waiting // self.concurrency
        # Nothing measured yet: pessimistic, one record at a time.
        by_time = int(CHUNK_SECONDS / max(self.s.handler_avg or CHUNK_SECONDS, 1e-7))
        return max(1, min(waiting, max(fair, by_time)))

    def _execute_chunk(self, chunk: list[Held]) -> None:
        """Run handlers back to back; successes go straight to the completion buffer, failures to the
        completer. Records not started once the chunk outlives CHUNK_SECONDS go back for other threads."""
        ok: list[Held] = []
        durations: list[float] = []
        handler, outcomes = self.handler, self.s.outcomes
        begin, clock = self.begin, time.monotonic
        chunk_start = t0 = clock()
        for i, held in enumerate(chunk):
            # Started one record at a time: a release at shutdown takes only records not started, and a
            # record waiting in this chunk must not count as running for handler_timeout.
            if not begin(held, t0):
                continue
            token = current.set(held)
            try:
                out = handler(held.record)
            except BaseException as exc:  # the handler's error is the record's outcome
                held.finished = True
                outcomes.put(Outcome(held, exc))
            else:
                if held.record.flow_run is not None:  # a flow step: its completion stores its result
                    held.record = with_result(held.record, out)
                held.finished = True
                ok.append(held)
            finally:
                current.reset(token)
            t1 = clock()
            durations.append(t1 - t0)
            t0 = t1
            if t1 - chunk_start > CHUNK_SECONDS and i + 1 < len(chunk):
                self._give_back(chunk[i + 1:])
                break
        if durations:
            self.s.observe(sum(durations) / len(durations), len(durations))
            self.s.metrics.observe_handlers(durations)
        if ok:
            self.completer.add_done(ok)

    def _give_back(self, rest: list[Held]) -> None:
        s = self.s
        with s.ready_cv:
            s.ready.extendleft(reversed(rest))
            s.ready_cv.notify(min(len(rest), self.concurrency))

    def begin(self, held: Held, now: float | None = None) -> bool:
        """Mark a record started (at ``now``, a monotonic time) unless it was released meanwhile."""
        s = self.s
        if s.aborted.is_set():
            return False
        with s.lock:
            if s.held.get(held.record.id) is not held or held.abandoned:
                return False
            held.started = time.monotonic() if now is None else now
        return True

    # ------------------------------------------------------------------ coroutine handlers

    async def _execute_async(self, held: Held) -> None:
        if self._async_slots is None:
            self._async_slots = asyncio.Semaphore(self.concurrency)
        async with self._async_slots:
            if not self.begin(held):
                return
            current.set(held)  # each task runs in a copy of the context
            error: BaseException | None = None
            t0 = time.perf_counter()
            try:
                await self.handler(held.record)
            except BaseException as exc:
                error = exc
            self.s.observe(time.perf_counter() - t0)
            self.s.metrics.observe_handler(time.perf_counter() - t0)
        held.finished = True
        self.s.outcomes.put(Outcome(held, error))

    # ------------------------------------------------------------------ transactional handlers

    def _execute_transactional(self, held: Held) -> None:
        if not self.begin(held):
            return
        token = current.set(held)
        t0 = time.perf_counter()
        try:
            self._run_transactional(held)  # the transaction writes the outcome itself
        finally:
            current.reset(token)
        self.s.observe(time.perf_counter() - t0)
        self.s.metrics.observe_handler(time.perf_counter() - t0)

    def _run_transactional(self, held: Held) -> None:
        """Handler and completion share one transaction: both commit or neither does.

        A transaction that cannot start, or whose connection breaks, rolled everything back: that is the
        database's fault, not the handler's, so the record is tried again (within half its lease, the
        heartbeats keep it meanwhile), not failed; past that, it is left to recovery."""
        s = self.s
        deadline = time.monotonic() + s.settings.lease_seconds / 2
        delay = 0.1
        while True:
            try:
                with s.store.transaction() as conn:
                    out = self.handler(held.record, conn)
                    held.completing = True
                    record = held.record
                    if record.flow_run is not None:  # a flow step: its result commits with its completion
                        record = with_result(record, out)
                    updated = s.store.complete_in(conn, [record])
                    if updated == 0:
                        raise LeaseLost(f"record {held.record.id}: lease lost before commit; handler work rolled back")
            except LeaseLost:
                s.forget(held)
                s.count(lost_leases=1)
                return
            except DatabaseUnavailable as exc:
                held.completing = False
                if time.monotonic() + delay > deadline or s.aborted.is_set() or held.abandoned:
                    log.warning("transaction of record %s kept failing; left to recovery", held.record.id,
                                extra={"error": str(exc)[:300]})
                    s.forget(held)
                    return
                s.aborted.wait(delay)  # a stop ends the wait at once
                delay = min(delay * 2, 2.0)
                continue
            except BaseException as exc:
                held.finished = True
                s.outcomes.put(Outcome(held, exc))
                return
            break
        s.forget(held)
        s.count(processed=1)
        s.metrics.completed(1)
        if held.record.ordering_key is not None:  # its key's next record is claimable: look there again
            s.floors.lower_records([held.record])


def is_handler_thread(thread: threading.Thread) -> bool:
    return thread.name.startswith("dp-handler")
