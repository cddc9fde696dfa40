"""Completing: the buffer of finished records (carried by the next claim statement, or written here within
COALESCE_SECONDS, FLOW_COALESCE_SECONDS in a run over flows), failures through the retry policy, and the keys
whose next record waits for an unblock."""

from __future__ import annotations

import logging
import queue as queue_mod
import time
from collections.abc import Callable, Iterable
from typing import Any

from core.errors import DatabaseUnavailable
from core.flows.dispatch import FlowHandler
from core.record import Record
from core.worker.state import Held, Outcome, RecordCancelled, RunState

log = logging.getLogger("core.worker")

# How long a finished record may wait for the next claim to carry its completion. The claimer is woken as
# soon as a record finishes, so in a plain run this only bounds the wait behind a claim already in flight (with
# no room, the claimer writes the completions at once).
COALESCE_SECONDS = 0.002
# The same for a run over flows, also when the claimer has no room: a flow step's completion carried by a claim
# takes the children it releases (one write each and no announcement, migration 0017); written alone, it only
# releases them (pending, then claimed: two writes). Room opens as handlers start the records already claimed.
FLOW_COALESCE_SECONDS = 0.02


class Completer:
    """The completion buffer and the completer thread, which writes failures and stale successes."""

    def __init__(self, state: RunState) -> None:
        self.s = state
        # Successes waiting to be completed: the next claim statement carries them (one round trip and one
        # commit per batch); the completer writes them itself if no claim comes within COALESCE_SECONDS.
        self._done: list[Held] = []
        self._done_since = 0.0
        # Records with ordering keys claimed by the last statement: the next statement makes each key's next
        # record claimable (it must run in a snapshot taken after that claim committed), and the claim floors
        # come down to them (the key's next record follows them in claim order).
        self._unblock: dict[str, Record] = {}
        self._unblock_since = 0.0
        # A run over flows waits longer for a claim.
        self.coalesce = FLOW_COALESCE_SECONDS if isinstance(state.options.handler, FlowHandler) else COALESCE_SECONDS

    # ------------------------------------------------------------------ unblock buffer

    def take_unblock(self) -> list[Record]:
        with self.s.lock:
            records, self._unblock = self._unblock, {}
        return [records[k] for k in sorted(records)]

    def return_unblock(self, records: Iterable[Record]) -> None:
        keyed = [r for r in records if r.ordering_key is not None]
        if keyed:
            with self.s.lock:
                if not self._unblock:
                    self._unblock_since = time.monotonic()
                for r in keyed:
                    assert r.ordering_key is not None
                    self._unblock.setdefault(r.ordering_key, r)

    def unblocked(self, records: list[Record], done: list[Held]) -> None:
        """A statement made the next records of these keys claimable: the claim floors come down to them."""
        if records or done:
            self.s.floors.lower_records([*records, *(h.record for h in done)])

    def unblock_age(self) -> float | None:
        """Seconds the oldest key waiting for its unblock has waited; None when none waits."""
        with self.s.lock:
            return time.monotonic() - self._unblock_since if self._unblock else None

    def flush_unblock(self) -> None:
        records = self.take_unblock()
        if records:
            self.s.store.unblock([r.ordering_key for r in records if r.ordering_key], announce=False)
            self.unblocked(records, [])

    # ------------------------------------------------------------------ completion buffer

    def pending(self) -> int:
        """Finished records waiting for their completion (they do not take room: the next claim carries them)."""
        return len(self._done)

    def add_done(self, ok: list[Held]) -> None:
        s = self.s
        with s.lock:
            live = [h for h in ok if not h.abandoned]
            for h in ok:
                if h.abandoned:  # released or timed out meanwhile: its late success is not ours to write
                    s.held.pop(h.record.id, None)
            if not live:
                return
            if not self._done:
                self._done_since = time.monotonic()
            self._done.extend(live)
        s.wake.set()  # the claimer carries them with its next claim

    def take_done(self) -> list[Held]:
        with self.s.lock:
            done, self._done = [h for h in self._done if not h.abandoned], []
        for h in done:
            h.completing = True
        return done

    def return_done(self, done: list[Held]) -> None:
        if done:
            with self.s.lock:
                self._done[:0] = done
                self._done_since = time.monotonic()

    def completed(self, done: list[Held], completed: int) -> None:
        s = self.s
        s.count(processed=completed, lost_leases=len(done) - completed)
        s.metrics.completed(completed)
        s.metrics.lost(len(done) - completed)
        if completed < len(done):
            log.warning("lost leases on completion", extra={"lost": len(done) - completed, "batch": len(done)})
        with s.lock:
            for h in done:
                if s.held.get(h.record.id) is h:
                    del s.held[h.record.id]
        s.wake.set()

    def flush_for_room(self) -> float | None:
        """The claimer has no room to claim: write the buffered successes now, but in a run over flows only once
        they have waited ``self.coalesce``: the claim that comes when room opens carries them and takes the
        children they release. Returns None when it wrote some, else how long the claimer may wait before
        looking again (the oldest one's time left; inf when there are none)."""
        if self.coalesce > COALESCE_SECONDS:
            with self.s.lock:
                left = self._done_since + self.coalesce - time.monotonic() if self._done else 0.0
            if left > 0:
                return left
        return None if self.flush_done() else float("inf")

    def flush_done(self) -> bool:
        """Write buffered successes with a plain completion statement; False when there were none."""
        done = self.take_done()
        if not done:
            return False
        unblock = self.take_unblock()
        keys = [r.ordering_key for r in unblock if r.ordering_key]
        completed = self.retrying_write(lambda: self.s.store.complete([h.record for h in done], keys), done)
        if completed is None:  # gave up: the leases ran out, recovery takes them
            self.return_unblock(unblock)
            with self.s.lock:
                for h in done:
                    self.s.held.pop(h.record.id, None)
            return True
        self.unblocked(unblock, done)
        self.completed(done, completed)
        return True

    # ------------------------------------------------------------------ the completer thread

    def run(self) -> None:
        s = self.s
        stopping = False
        while not stopping:
            # Never block for good: records can come back to the buffer (a failed claim returns what it
            # carried) without any new outcome arriving to wake this thread.
            # Successes reach the buffer without passing through here: look at its age often.
            timeout = 0.01
            with s.lock:
                if self._done:
                    timeout = max(0.0, self._done_since + self.coalesce - time.monotonic())
            try:
                batch = [s.outcomes.get(timeout=timeout)]
            except queue_mod.Empty:
                batch = []
            while True:  # take everything that is ready: natural batching under load
                try:
                    batch.append(s.outcomes.get_nowait())
                except queue_mod.Empty:
                    break
            if any(o is None for o in batch):
                stopping = True
            self.write_outcomes([o for o in batch if o is not None])
            with s.lock:
                stale = bool(self._done) and time.monotonic() - self._done_since >= self.coalesce
            if stale or stopping:
                self.flush_done()
            # The wake-ups of keyed completions held back for their window (core.claims.KeyNotices); at the
            # stop, all of them (the last completions' too).
            s.store.notify_owed(force=stopping)

    def write_outcomes(self, outcomes: list[Outcome]) -> None:
        ok = [o.held for o in outcomes if o.error is None]
        bad = [o for o in outcomes if o.error is not None and not o.held.abandoned]
        for o in outcomes:
            if o.error is not None and o.held.abandoned:
                self.s.forget(o.held)
        if ok:
            self.add_done(ok)  # forgets the abandoned ones itself
        for o in bad:
            o.held.completing = True
            err = o.error
            assert err is not None
            self.fail(o.held, err)
        if bad:
            self.s.wake.set()

    def fail(self, held: Held, err: BaseException) -> None:
        s = self.s
        # A flow step may have a retry policy of its own.
        retry_for = getattr(s.options.handler, "retry_for", None)
        policy = retry_for(held.record) if retry_for is not None and held.record.flow_run is not None else None
        retryable = (policy or s.settings.retry).should_retry(err) and not isinstance(err, RecordCancelled)
        rows = self.retrying_write(lambda: s.store.fail([held.record], err, retryable, policy), [held])
        s.forget(held)
        if rows is None:
            return
        if not rows:
            s.count(lost_leases=1)
            s.metrics.lost(1)
            return
        status = rows[0][1]
        if status == "pending":
            s.count(retried=1)
            s.metrics.retried(1)
        elif status == "cancelled":
            s.count(cancelled=1)
        else:
            s.count(failed=1)
            s.metrics.failed(1)
        log.info(
            "record failed",
            extra={"record_id": held.record.id, "outcome": status, "error": f"{type(err).__name__}: {err}"[:500]},
        )

    def retrying_write(self, write: Callable[[], Any], helds: list[Held]) -> Any:
        """Retry an outcome write through database faults until the leases could have run out."""
        deadline = time.monotonic() + self.s.settings.lease_seconds
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
