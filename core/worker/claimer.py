"""Claiming: each claimer thread claims full batches while there is room, carrying finished records' completions
and the pending unblocks in the same statement, and sleeps until a wake-up or the jittered poll."""

from __future__ import annotations

import logging
import random
import time

from core.errors import DatabaseUnavailable
from core.worker.completer import Completer
from core.worker.executor import Executor
from core.worker.state import RunState

log = logging.getLogger("core.worker")

# How long the keys of claimed records may wait for a statement of ours to carry their unblock before it is
# written on its own. The next record of a key with limit 1 cannot run before this instance completes the
# current one anyway (the completion carries the unblock); with higher limits this bounds the delay.
UNBLOCK_SECONDS = 0.05


class Claimer:
    """The claim loop; several threads run it at once (one claim statement each in flight)."""

    def __init__(self, state: RunState, completer: Completer, executor: Executor) -> None:
        self.s = state
        self.completer = completer
        self.executor = executor

    def run(self) -> None:
        s, buf = self.s, self.completer
        batch_size = s.settings.batch_size
        queues = s.options.queues
        consecutive_errors = 0
        while not s.should_stop():
            s.last_tick = time.monotonic()
            # Read before looking for work: a wake-up from here on (a handler finishing, another claimer's
            # statement freeing a key or a slot, a notification) may be one this look or this statement's
            # snapshot did not see, so the idle waits below return at once after one.
            seen = s.wake.generation
            # Finished records waiting for their completion do not take room: this claim carries them.
            with s.lock:
                room = s.capacity() - len(s.held) + buf.pending()
            # Claim full batches: a trickle of small claims costs a round trip each. A partial batch is
            # claimed only when every handler has run dry.
            waiting = len(s.ready)
            if room <= 0 or waiting >= batch_size or (room < batch_size and waiting):
                # No room: write finished records now rather than wait (in a run over flows, once they have
                # waited for the claim that takes their children: look again when that time is up).
                done_wait = buf.flush_for_room()
                if done_wait is not None:
                    # Unblocks ride on our next statement (a claim or a completion comes within moments
                    # while handlers run); only when none has come for UNBLOCK_SECONDS do they go alone.
                    age = buf.unblock_age()
                    if age is not None and age >= UNBLOCK_SECONDS:
                        buf.flush_unblock()
                        age = None
                    self.idle_wait(min(0.5 if age is None else UNBLOCK_SECONDS - age, done_wait), seen)
                continue
            done = buf.take_done()
            unblock = buf.take_unblock()
            keys = [r.ordering_key for r in unblock if r.ordering_key]
            with s.lock:  # stop_when_empty must not stop while another claimer's records are on the way
                s.claiming += 1
            try:
                t0 = time.perf_counter()
                records, completed = s.store.claim(
                    [h.record for h in done], min(room, batch_size), queues, keys, s.floors)
                s.metrics.observe_claim(time.perf_counter() - t0, len(records))
                consecutive_errors = 0
            except DatabaseUnavailable as exc:
                self._claim_ended()
                buf.return_unblock(unblock)
                buf.return_done(done)
                consecutive_errors += 1
                delay = min(10.0, 0.1 * 2**consecutive_errors) * random.uniform(0.8, 1.2)
                log.warning("claim failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
                self.sleep(delay)
                continue
            buf.unblocked(unblock, done)
            if done:
                buf.completed(done, completed)
            if records:
                buf.return_unblock(records)
                self.executor.dispatch(records)
                self._claim_ended()
                continue
            self._claim_ended()
            if unblock or any(h.record.ordering_key is not None for h in done):
                # This statement freed the next record of those keys (an unblock or a keyed completion) but
                # its own snapshot could not see that: one more claim at once, not a poll interval later.
                # The other claimers may have looked with an older snapshot (and a claim locks the records
                # it rejects until it commits, hiding them from ours): wake them to look again too.
                s.wake.set()
                continue
            buf.flush_unblock()
            # Quiet again after the query: another claimer may have claimed the last due records between the
            # first look and the query's snapshot (stopping then, with no grace, would release them unrun).
            if s.options.stop_when_empty and self._quiet() and self._nothing_due() and self._quiet():
                s.stop(0)
                break
            rate_wait = getattr(records, "rate_wait", None)
            if rate_wait is not None:
                # A rate-limited queue or key has no token now: sleep until its next one (new records would
                # only wake us to find none), within the poll interval, a stop ending it at once.
                s.stopping.wait(min(float(rate_wait) + 0.001, s.options.poll_interval))
                continue
            # Idle: sleep until NOTIFY, a freed slot, a stop, or the jittered poll (at once if one of those
            # came since this statement started).
            self.idle_wait(s.options.poll_interval * random.uniform(0.5, 1.0), seen)

    def _claim_ended(self) -> None:
        with self.s.lock:
            self.s.claiming -= 1

    def _quiet(self) -> bool:
        """No record held and no claim statement of another claimer under way."""
        with self.s.lock:
            return not self.s.held and self.s.claiming == 0

    def _nothing_due(self) -> bool:
        try:
            return not self.s.store.any_due(self.s.options.queues)
        except DatabaseUnavailable:
            return False

    def idle_wait(self, seconds: float, seen: int) -> None:
        """Wait for a wake-up after generation ``seen``; a caller's stop_event cannot wake us, so look at it
        every 50 ms."""
        s = self.s
        external = s.options.stop_event is not None
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or s.should_stop():
                break
            if s.wake.wait_since(seen, min(remaining, 0.05) if external else remaining):
                break

    def sleep(self, seconds: float) -> None:
        s = self.s
        deadline = time.monotonic() + seconds
        while not s.stopping.is_set() and time.monotonic() < deadline:
            s.last_tick = time.monotonic()
            s.wake.wait_since(s.wake.generation, min(0.5, max(0.0, deadline - time.monotonic())))
