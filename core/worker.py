"""The worker loop behind :meth:`DistributedProcessor.run`.

One module per role, each a thread with its own stop condition:

* the claimer (the calling thread) claims while there is room and hands records to the executor;
* the executor runs handlers on a thread pool (coroutine handlers on one event-loop thread);
* the completer writes outcomes in batches, one fenced statement per batch;
* the heartbeat extends the leases of every held record and the instance's heartbeat, in one round trip;
* the maintainer recovers orphaned records on a jittered interval;
* the listener (core.notifier) turns NOTIFY into wake-ups; a jittered poll runs regardless.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import queue as queue_mod
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from core.errors import DatabaseUnavailable, ProcessorError
from core.record import Record

if TYPE_CHECKING:
    from core.processor import DistributedProcessor

log = logging.getLogger("core.worker")

Handler = Callable[..., Any]

# How long a finished record may wait for the next claim to carry its completion. The claimer is woken as
# soon as a record finishes, so this only bounds the wait behind a claim already in flight.
COALESCE_SECONDS = 0.002
# Handler time one thread runs back to back before other threads get the rest of what it took.
CHUNK_SECONDS = 0.002
# How long the keys of claimed records may wait for a statement of ours to carry their unblock before it is
# written on its own. The next record of a key with limit 1 cannot run before this instance completes the
# current one anyway (the completion carries the unblock); with higher limits this bounds the delay.
UNBLOCK_SECONDS = 0.05


class Wake:
    """A wake-up that no waiter can miss: each ``set`` advances a generation, and a waiter waits for the
    generation to move past the one it read *before* looking for work. A shared Event lost wake-ups: one
    claimer's ``clear`` hid a ``set`` from the other, which had already looked and then slept a poll
    interval (a serial key stalled for seconds when the two claimers' statements overlapped)."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self.generation = 0

    def set(self) -> None:
        with self._cv:
            self.generation += 1
            self._cv.notify_all()

    def wait_since(self, generation: int, timeout: float) -> bool:
        """Wait until something was set after ``generation`` (at most ``timeout`` seconds); whether it was."""
        with self._cv:
            return self._cv.wait_for(lambda: self.generation != generation, max(0.0, timeout))


class HandlerTimeout(ProcessorError, TimeoutError):
    """A handler ran longer than its per-record timeout; the record was failed and its late result fenced."""


class LeaseLost(ProcessorError):
    """The record's lease was lost before its completion could be written."""


class RecordCancelled(ProcessorError):
    """Raised by :meth:`RunContext.raise_if_cancelled` when ``cancel()`` flagged the running record."""


@dataclass
class RunSummary:
    """What a ``run()`` did."""

    claimed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    lost_leases: int = 0
    released: int = 0
    timed_out: int = 0
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Held:
    """A record this instance holds, with its local state (plain slots: this is on the per-record path)."""

    __slots__ = ("abandoned", "cancel_requested", "completing", "finished", "record", "started")

    def __init__(self, record: Record) -> None:
        self.record = record
        self.started: float | None = None
        self.cancel_requested = record.cancel_requested
        self.abandoned = False  # timed out or released: a late result must be ignored
        self.completing = False  # our own outcome write is under way: a heartbeat miss is not a lost lease
        self.finished = False  # the handler returned: its outcome is queued, never release it


class _Outcome:
    __slots__ = ("error", "held")

    def __init__(self, held: _Held, error: BaseException | None) -> None:
        self.held = held
        self.error = error


# The record a handler is running: a context variable, so it works for threads and asyncio tasks alike.
_current: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("dp_current_record", default=None)


def current_record_cancelled() -> bool:
    """Inside a handler: whether ``cancel()`` flagged the record it is running (seen at the next heartbeat)."""
    held = _current.get()
    return bool(held and held.cancel_requested)


class Worker:
    """Runs ``handler`` over claimed records until stopped. Use through ``DistributedProcessor.run``."""

    def __init__(
        self,
        processor: DistributedProcessor,
        handler: Handler,
        *,
        concurrency: int,
        queues: list[str],
        stop_when_empty: bool,
        stop_event: threading.Event | None,
        transactional: bool,
        handler_timeout: float | None,
        poll_interval: float,
        listen: bool,
        handle_signals: bool,
        grace_seconds: float,
        prefetch: int | None,
        register: bool,
        metadata: dict[str, Any] | None,
        claimers: int = 2,
    ) -> None:
        self.p = processor
        # Claim statements in flight at once. One claimer waits a full round trip (and a commit) per batch;
        # a second one overlaps them, which is where most of a fast drain's time goes.
        self.claimers = max(1, claimers)
        self.handler = handler
        self.concurrency = concurrency
        self.queues = queues
        self.stop_when_empty = stop_when_empty
        self.external_stop = stop_event
        self.transactional = transactional
        self.handler_timeout = handler_timeout
        self.poll_interval = poll_interval
        self.listen = listen
        self.handle_signals = handle_signals
        self.grace_seconds = grace_seconds
        self.register = register
        self.metadata = metadata or {}
        # Hold at most what is running plus a prefetch (default one batch per claimer in flight, one being
        # handed to handlers and one whose outcomes are being written). Every held record is heartbeated, so
        # none expires while it waits; and no new claim starts while a whole batch still waits for a handler,
        # so slow handlers never hoard records that idle instances could take.
        self.capacity = concurrency + ((2 + max(1, claimers)) * processor.batch_size if prefetch is None else prefetch)
        self.is_async = inspect.iscoroutinefunction(handler)
        self.summary = RunSummary()
        self.stopping = threading.Event()  # no new claims
        self.aborted = threading.Event()  # grace over: release what is still held
        self.wake = Wake()
        self.last_tick = time.monotonic()
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()
        self._outcomes: queue_mod.SimpleQueue[_Outcome | None] = queue_mod.SimpleQueue()
        # Successes waiting to be completed: the next claim statement carries them (one round trip and one
        # commit per batch); the completer writes them itself if no claim comes within COALESCE_SECONDS.
        self._done: list[_Held] = []
        self._done_since = 0.0
        # Ordering keys of records claimed by the last statement: the next statement makes each key's next
        # record claimable (it must run in a snapshot taken after that claim committed).
        self._unblock: set[str] = set()
        self._unblock_since = 0.0
        self._claiming = 0  # claim statements under way whose records are not dispatched yet
        self._threads: list[threading.Thread] = []
        # Records claimed and waiting for a handler thread, in claim order.
        self._ready: deque[_Held] = deque()
        self._ready_cv = threading.Condition(threading.Lock())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_slots: asyncio.Semaphore | None = None
        # Moving average of handler time (seconds), for chunk sizes; starts pessimistic: one record at a time.
        self._handler_avg = CHUNK_SECONDS
        self._grace_deadline: float | None = None
        self.metrics = processor.metrics
        self.listener: Any = None
        self.signals_seen = 0
        self.started = threading.Event()
        self.finished = threading.Event()

    # ------------------------------------------------------------------ public

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop claiming; let in-flight records finish for ``grace_seconds``, then release the rest."""
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            if self._grace_deadline is None:
                self._grace_deadline = time.monotonic() + grace
        self.stopping.set()
        self.wake.set()

    def abort(self) -> None:
        """End the grace period now: release held records at once."""
        self.stopping.set()
        self.aborted.set()
        self.wake.set()

    def held_count(self) -> int:
        with self._lock:
            return len(self._held)

    def ticked_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_tick <= seconds

    # ------------------------------------------------------------------ signal handling

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals_seen += 1
        if self.signals_seen == 1:
            log.info("signal received: draining", extra={"signal": signum, "grace_seconds": self.grace_seconds})
            self.stop()
        else:
            log.warning("second signal: aborting the grace period", extra={"signal": signum})
            self.abort()

    # ------------------------------------------------------------------ run

    def run(self) -> RunSummary:
        started = time.monotonic()
        previous: dict[signal.Signals, Any] = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            self._start_services()
            self.started.set()
            extra = [
                threading.Thread(target=self._claim_loop, name=f"dp-claimer-{i}-{self.p.instance_id}", daemon=True)
                for i in range(1, self.claimers)
            ]
            for t in extra:
                t.start()
            self._claim_loop()
            for t in extra:
                t.join(30)
            self._drain()
            self._flush_unblock()
        finally:
            self._shutdown()
            for signum, old in previous.items():
                signal.signal(signum, old)
            self.summary.elapsed = time.monotonic() - started
            self.finished.set()
        return self.summary

    def _start_services(self) -> None:
        if self.register:
            self.p.register_instance(self.metadata)
        if self.is_async:
            self._loop = asyncio.new_event_loop()
            self._spawn("dp-asyncio", self._loop.run_forever)
        else:
            # Long-lived handler threads pulling from one deque: no per-record future or executor hop.
            for i in range(self.concurrency):
                self._spawn(f"dp-handler-{i}", self._handler_loop)
        self._spawn("dp-completer", self._completer)
        self._spawn("dp-heartbeat", self._heartbeat)
        self._spawn("dp-maintenance", self._maintenance)
        if self.listen and self.p.notify:
            from core.notifier import Listener

            self.listener = Listener(self.p, self.queues, self.wake)
            self.listener.start()

    def _spawn(self, name: str, target: Callable[[], Any]) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.p.instance_id}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _should_stop(self) -> bool:
        if self.external_stop is not None and self.external_stop.is_set() and not self.stopping.is_set():
            self.stop()
        return self.stopping.is_set()

    def _claim_loop(self) -> None:
        consecutive_errors = 0
        while not self._should_stop():
            self.last_tick = time.monotonic()
            # Read before looking for work: a wake-up from here on (a handler finishing, another claimer's
            # statement freeing a key or a slot, a notification) may be one this look or this statement's
            # snapshot did not see, so the idle waits below return at once after one.
            seen = self.wake.generation
            # Finished records waiting for their completion do not take room: this claim carries them.
            with self._lock:
                room = self.capacity - len(self._held) + len(self._done)
            # Claim full batches: a trickle of small claims costs a round trip each. A partial batch is
            # claimed only when every handler has run dry.
            waiting = len(self._ready)
            if room <= 0 or waiting >= self.p.batch_size or (room < self.p.batch_size and waiting):
                if not self._flush_done():  # no room: write finished records now rather than wait
                    # Unblocks ride on our next statement (a claim or a completion comes within moments
                    # while handlers run); only when none has come for UNBLOCK_SECONDS do they go alone.
                    age = self._unblock_age()
                    if age is not None and age >= UNBLOCK_SECONDS:
                        self._flush_unblock()
                        age = None
                    self._idle_wait(0.5 if age is None else UNBLOCK_SECONDS - age, seen)
                continue
            done = self._take_done()
            unblock = self._take_unblock()
            with self._lock:  # stop_when_empty must not stop while another claimer's records are on the way
                self._claiming += 1
            try:
                t0 = time.perf_counter()
                records, completed = self.p.complete_and_claim(
                    [h.record for h in done], min(room, self.p.batch_size), queues=self.queues,
                    unblock=unblock, defer_unblock=True,
                )
                self.metrics.observe_claim(time.perf_counter() - t0, len(records))
                consecutive_errors = 0
            except DatabaseUnavailable as exc:
                self._claim_ended()
                self._return_unblock(unblock)
                self._return_done(done)
                consecutive_errors += 1
                delay = min(10.0, 0.1 * 2**consecutive_errors) * random.uniform(0.8, 1.2)
                log.warning("claim failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
                self._sleep(delay)
                continue
            if done:
                self._completed(done, completed)
            if records:
                self._return_unblock({r.ordering_key for r in records if r.ordering_key is not None})
                self._dispatch(records)
                self._claim_ended()
                continue
            self._claim_ended()
            if unblock or any(h.record.ordering_key is not None for h in done):
                # This statement freed the next record of those keys (an unblock or a keyed completion) but
                # its own snapshot could not see that: one more claim at once, not a poll interval later.
                # The other claimers may have looked with an older snapshot (and a claim locks the records
                # it rejects until it commits, hiding them from ours): wake them to look again too.
                self.wake.set()
                continue
            self._flush_unblock()
            if self.stop_when_empty and self._quiet() and self._nothing_due():
                self.stop(0)
                break
            # Idle: sleep until NOTIFY, a freed slot, a stop, or the jittered poll (at once if one of those
            # came since this statement started).
            self._idle_wait(self.poll_interval * random.uniform(0.5, 1.0), seen)

    # ------------------------------------------------------------------ completion buffer

    def _take_unblock(self) -> list[str]:
        with self._lock:
            keys, self._unblock = self._unblock, set()
        return sorted(keys)

    def _return_unblock(self, keys: Iterable[str]) -> None:
        if keys:
            with self._lock:
                if not self._unblock:
                    self._unblock_since = time.monotonic()
                self._unblock.update(keys)

    def _claim_ended(self) -> None:
        with self._lock:
            self._claiming -= 1

    def _quiet(self) -> bool:
        """No record held and no claim statement of another claimer under way."""
        with self._lock:
            return not self._held and self._claiming == 0

    def _unblock_age(self) -> float | None:
        """Seconds the oldest key waiting for its unblock has waited; None when none waits."""
        with self._lock:
            return time.monotonic() - self._unblock_since if self._unblock else None

    def _flush_unblock(self) -> None:
        keys = self._take_unblock()
        if keys:
            self.p._followups(set(keys))

    def _take_done(self) -> list[_Held]:
        with self._lock:
            done, self._done = [h for h in self._done if not h.abandoned], []
        for h in done:
            h.completing = True
        return done

    def _return_done(self, done: list[_Held]) -> None:
        if done:
            with self._lock:
                self._done[:0] = done
                self._done_since = time.monotonic()

    def _completed(self, done: list[_Held], completed: int) -> None:
        self._count(processed=completed, lost_leases=len(done) - completed)
        self.metrics.completed(completed)
        self.metrics.lost(len(done) - completed)
        if completed < len(done):
            log.warning("lost leases on completion", extra={"lost": len(done) - completed, "batch": len(done)})
        with self._lock:
            for h in done:
                if self._held.get(h.record.id) is h:
                    del self._held[h.record.id]
        self.wake.set()

    def _flush_done(self) -> bool:
        """Write buffered successes with a plain completion statement; False when there were none."""
        done = self._take_done()
        if not done:
            return False
        self._write_completions(done)
        return True

    def _write_completions(self, done: list[_Held]) -> None:
        unblock = self._take_unblock()
        completed = self._retrying_write(
            lambda: self.p.mark_completed([h.record for h in done], unblock=unblock), done
        )
        if completed is None:
            self._return_unblock(unblock)
        if completed is None:  # gave up: the leases ran out, recovery takes them
            with self._lock:
                for h in done:
                    self._held.pop(h.record.id, None)
            return
        self._completed(done, completed)

    def _idle_wait(self, seconds: float, seen: int) -> None:
        """Wait for a wake-up after generation ``seen``; a caller's stop_event cannot wake us, so look at it
        every 50 ms."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._should_stop():
                break
            if self.wake.wait_since(seen, min(remaining, 0.05) if self.external_stop is not None else remaining):
                break

    def _nothing_due(self) -> bool:
        try:
            return not self.p._any_due(self.queues)
        except DatabaseUnavailable:
            return False

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self.last_tick = time.monotonic()
            self.wake.wait_since(self.wake.generation, min(0.5, max(0.0, deadline - time.monotonic())))

    def _dispatch(self, records: list[Record]) -> None:
        helds = [_Held(r) for r in records]
        with self._lock:
            for h in helds:
                self._held[h.record.id] = h
            self.summary.claimed += len(records)
        if self._loop is not None:
            for h in helds:
                asyncio.run_coroutine_threadsafe(self._execute_async(h), self._loop)
            return
        with self._ready_cv:
            self._ready.extend(helds)
            # Wake as many handler threads as there are chunks to take, not one per record.
            chunk = self._chunk_size(len(self._ready))
            self._ready_cv.notify(min(self.concurrency, -(-len(self._ready) // chunk)))

    # ------------------------------------------------------------------ executor

    def _handler_loop(self) -> None:
        ready, cv = self._ready, self._ready_cv
        while True:
            with cv:
                while not ready:
                    if self.finished.is_set() or self.aborted.is_set():
                        return
                    cv.wait(0.25)
                take = self._chunk_size(len(ready))
                mine = [ready.popleft() for _ in range(take)]
            if self.transactional:
                for held in mine:
                    self._execute_transactional(held)
            else:
                self._execute_chunk(mine)

    def _chunk_size(self, waiting: int) -> int:
        """How many waiting records one handler thread takes: its fair share, or, when handlers are short, as
        many as fit in CHUNK_SECONDS of their measured time (a hand-off between threads costs more than a
        handler that returns in microseconds)."""
        fair = waiting // self.concurrency
        by_time = int(CHUNK_SECONDS / max(self._handler_avg, 1e-7))
        return max(1, min(waiting, max(fair, by_time)))

    def _execute_chunk(self, chunk: list[_Held]) -> None:
        """Run handlers back to back; successes go straight to the completion buffer, failures to the
        completer. Records not started once the chunk outlives CHUNK_SECONDS go back for other threads."""
        ok: list[_Held] = []
        durations: list[float] = []
        handler = self.handler
        begin, clock = self._begin, time.monotonic
        chunk_start = t0 = clock()
        for i, held in enumerate(chunk):
            # Started one record at a time: a release at shutdown takes only records not started, and a
            # record waiting in this chunk must not count as running for handler_timeout.
            if not begin(held, t0):
                continue
            token = _current.set(held)
            try:
                handler(held.record)
            except BaseException as exc:  # the handler's error is the record's outcome
                held.finished = True
                self._outcomes.put(_Outcome(held, exc))
            else:
                held.finished = True
                ok.append(held)
            finally:
                _current.reset(token)
            t1 = clock()
            durations.append(t1 - t0)
            t0 = t1
            if t1 - chunk_start > CHUNK_SECONDS and i + 1 < len(chunk):
                self._give_back(chunk[i + 1:])
                break
        if durations:
            self._handler_avg = 0.7 * self._handler_avg + 0.3 * (sum(durations) / len(durations))
            self.metrics.observe_handlers(durations)
        if ok:
            self._add_done(ok)

    def _give_back(self, rest: list[_Held]) -> None:
        with self._ready_cv:
            self._ready.extendleft(reversed(rest))
            self._ready_cv.notify(min(len(rest), self.concurrency))

    def _add_done(self, ok: list[_Held]) -> None:
        with self._lock:
            live = [h for h in ok if not h.abandoned]
            for h in ok:
                if h.abandoned:  # released or timed out meanwhile: its late success is not ours to write
                    self._held.pop(h.record.id, None)
            if not live:
                return
            if not self._done:
                self._done_since = time.monotonic()
            self._done.extend(live)
        self.wake.set()  # the claimer carries them with its next claim

    def _begin(self, held: _Held, now: float | None = None) -> bool:
        """Mark a record started (at ``now``, a monotonic time) unless it was released meanwhile."""
        if self.aborted.is_set():
            return False
        with self._lock:
            if self._held.get(held.record.id) is not held or held.abandoned:
                return False
            held.started = time.monotonic() if now is None else now
        return True

    def _execute_transactional(self, held: _Held) -> None:
        if not self._begin(held):
            return
        token = _current.set(held)
        t0 = time.perf_counter()
        try:
            self._run_transactional(held)  # the transaction writes the outcome itself
        finally:
            _current.reset(token)
        self.metrics.observe_handler(time.perf_counter() - t0)

    async def _execute_async(self, held: _Held) -> None:
        if self._async_slots is None:
            self._async_slots = asyncio.Semaphore(self.concurrency)
        async with self._async_slots:
            if not self._begin(held):
                return
            _current.set(held)  # each task runs in a copy of the context
            error: BaseException | None = None
            t0 = time.perf_counter()
            try:
                await self.handler(held.record)
            except BaseException as exc:
                error = exc
            self.metrics.observe_handler(time.perf_counter() - t0)
        held.finished = True
        self._outcomes.put(_Outcome(held, error))

    def _run_transactional(self, held: _Held) -> None:
        """Handler and completion share one transaction: both commit or neither does."""
        p = self.p
        try:
            with p.connection() as conn, conn.transaction():
                self.handler(held.record, conn)
                held.completing = True
                # Our completion statement with its generic plan; the handler's own statements ran with the
                # session's defaults (LOCAL: back to them at commit).
                p._set_plan_mode(conn, generic=True, local=True)
                updated = p.complete_on(conn, [held.record])
                if updated == 0:
                    raise LeaseLost(f"record {held.record.id}: lease lost before commit; handler work rolled back")
        except LeaseLost:
            self._forget(held)
            self._count(lost_leases=1)
            return
        except BaseException as exc:
            held.finished = True
            self._outcomes.put(_Outcome(held, exc))
            return
        self._forget(held)
        self._count(processed=1)
        self.metrics.completed(1)

    # ------------------------------------------------------------------ completer

    def _completer(self) -> None:
        stopping = False
        while not stopping:
            # Never block for good: records can come back to the buffer (a failed claim returns what it
            # carried) without any new outcome arriving to wake this thread.
            # Successes reach the buffer without passing through here: look at its age often.
            timeout = 0.01
            with self._lock:
                if self._done:
                    timeout = max(0.0, self._done_since + COALESCE_SECONDS - time.monotonic())
            try:
                batch = [self._outcomes.get(timeout=timeout)]
            except queue_mod.Empty:
                batch = []
            while True:  # take everything that is ready: natural batching under load
                try:
                    batch.append(self._outcomes.get_nowait())
                except queue_mod.Empty:
                    break
            if any(o is None for o in batch):
                stopping = True
            self._write_outcomes([o for o in batch if o is not None])
            with self._lock:
                stale = bool(self._done) and time.monotonic() - self._done_since >= COALESCE_SECONDS
            if stale or stopping:
                self._flush_done()

    def _write_outcomes(self, outcomes: list[_Outcome]) -> None:
        ok = [o.held for o in outcomes if o.error is None]
        bad = [o for o in outcomes if o.error is not None and not o.held.abandoned]
        for o in outcomes:
            if o.error is not None and o.held.abandoned:
                self._forget(o.held)
        if ok:
            self._add_done(ok)  # forgets the abandoned ones itself
        for o in bad:
            o.held.completing = True
            err = o.error
            assert err is not None
            self._fail(o.held, err)
        if bad:
            self.wake.set()

    def _fail(self, held: _Held, err: BaseException) -> None:
        rows = self._retrying_write(lambda: self._mark_failed_status(held.record, err), [held])
        self._forget(held)
        if rows is None:
            return
        if not rows:
            self._count(lost_leases=1)
            self.metrics.lost(1)
            return
        status = rows[0]
        if status == "pending":
            self._count(retried=1)
            self.metrics.retried(1)
        elif status == "cancelled":
            self._count(cancelled=1)
        else:
            self._count(failed=1)
            self.metrics.failed(1)
        log.info(
            "record failed",
            extra={"record_id": held.record.id, "outcome": status, "error": f"{type(err).__name__}: {err}"[:500]},
        )

    def _mark_failed_status(self, record: Record, err: BaseException) -> list[str]:
        p = self.p
        retryable = p.retry.should_retry(err) and not isinstance(err, RecordCancelled)
        params = p._fail_params([record], err, retryable)
        rows = p._with_retry(lambda conn: conn.execute(p.q.fail, params).fetchall())
        return [str(r[1]) for r in rows]

    def _retrying_write(self, write: Callable[[], Any], helds: list[_Held]) -> Any:
        """Retry an outcome write through database faults until the leases could have run out."""
        deadline = time.monotonic() + self.p.lease_seconds
        delay = 0.1
        while True:
            try:
                return write()
            except DatabaseUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "could not write outcomes before the lease ran out; left to recovery",
                        extra={"records": [h.record.id for h in helds], "error": str(exc)},
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _forget(self, held: _Held) -> None:
        with self._lock:
            self._held.pop(held.record.id, None)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self.summary, name, getattr(self.summary, name) + n)

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        interval = self.p.heartbeat_interval
        while not self.finished.is_set():
            if self.finished.wait(interval * random.uniform(0.9, 1.0)):
                return
            try:
                self.beat()
            except DatabaseUnavailable as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            except Exception:  # keep beating whatever happens
                log.exception("heartbeat error")

    def beat(self) -> None:
        """Extend the leases of every held record; forget those that come back lost; check timeouts."""
        self._check_timeouts()
        with self._lock:
            helds = [h for h in self._held.values() if not h.abandoned]
        kept, cancels = self.p.heartbeat([h.record for h in helds], registered=self.register)
        lost = [h for h in helds if h.record.id not in kept and not h.completing]
        for h in helds:
            if h.record.id in cancels:
                h.cancel_requested = True
        if lost:
            # Someone else owns these now: stop treating them as ours; a late result will be fenced anyway.
            with self._lock:
                # Our own completion may have landed between the snapshot and the check: not a loss.
                lost = [h for h in lost if self._held.get(h.record.id) is h and not h.completing]
                for h in lost:
                    h.abandoned = True
                    self._held.pop(h.record.id, None)
            if not lost:
                return
            self._count(lost_leases=len(lost))
            self.metrics.lost(len(lost))
            log.warning("leases lost", extra={"records": [h.record.id for h in lost]})

    def _check_timeouts(self) -> None:
        if not self.handler_timeout:
            return
        now = time.monotonic()
        with self._lock:
            expired = [
                h for h in self._held.values()
                if h.started is not None and not h.abandoned and now - h.started > self.handler_timeout
            ]
            for h in expired:
                h.abandoned = True
        for h in expired:
            err = HandlerTimeout(f"handler exceeded {self.handler_timeout:g}s on record {h.record.id}")
            self._count(timed_out=1)
            self._fail(h, err)

    # ------------------------------------------------------------------ maintenance

    def _maintenance(self) -> None:
        interval = self.p.cleanup_interval
        # A random first delay spreads the cleaners of instances started together.
        wait = interval * random.uniform(0.1, 1.0)
        while not self.finished.wait(wait):
            try:
                self.p.cleanup_orphaned_records()
            except DatabaseUnavailable as exc:
                log.warning("cleanup failed", extra={"error": str(exc)})
            except Exception:
                log.exception("cleanup error")
            wait = interval * random.uniform(0.8, 1.2)

    # ------------------------------------------------------------------ shutdown

    def _drain(self) -> None:
        """Release records not yet started at once; let running handlers finish until the grace deadline;
        then release whatever is still held (its late result is fenced out)."""
        with self._lock:
            deadline = self._grace_deadline if self._grace_deadline is not None else time.monotonic()
        self._release(unstarted_only=True)
        while not self.aborted.is_set() and self.held_count() and time.monotonic() < deadline:
            self.last_tick = time.monotonic()
            # No claim will carry finished records any more: write them here.
            seen = self.wake.generation
            self._flush_done()
            self.wake.wait_since(seen, 0.05)
        self.aborted.set()
        self._release(unstarted_only=False)

    def _release(self, *, unstarted_only: bool) -> None:
        with self._lock:
            helds = [
                h for h in self._held.values()
                if not h.abandoned and not h.finished and not h.completing
                and (not unstarted_only or h.started is None)
            ]
            for h in helds:
                h.abandoned = True
                self._held.pop(h.record.id, None)
        if not helds:
            return
        try:
            n = self.p.release_records([h.record for h in helds], reason="released on shutdown")
            self._count(released=n)
            log.info("released records on shutdown", extra={"released": n})
        except DatabaseUnavailable as exc:
            log.error("could not release records; recovery will", extra={"error": str(exc)})

    def _shutdown(self) -> None:
        self.stopping.set()
        self._outcomes.put(None)
        with self._ready_cv:
            self._ready.clear()
            self._ready_cv.notify_all()
        for t in self._threads:
            if t.name.startswith("dp-completer"):
                t.join(timeout=10)
        self.finished.set()
        with self._ready_cv:
            self._ready_cv.notify_all()
        if self.listener is not None:
            self.listener.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        for t in self._threads:
            if t.name.startswith("dp-handler"):
                continue  # a handler that ignored the grace period keeps its (daemon) thread; do not wait
            t.join(timeout=5)
        if self.register:
            try:
                self.p.deregister_instance()
            except DatabaseUnavailable as exc:
                log.warning("could not deregister", extra={"error": str(exc)})


__all__ = [
    "HandlerTimeout",
    "LeaseLost",
    "RecordCancelled",
    "RunSummary",
    "Worker",
    "current_record_cancelled",
]
