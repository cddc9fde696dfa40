"""Heartbeats: the instance's registry row and the leases of every held record, extended in one round trip;
records that come back lost stop being ours; handlers past their timeout are failed. The service loop
(:mod:`.service`) calls :meth:`Heartbeat.beat` every heartbeat interval."""

from __future__ import annotations

import logging
import time

from core.worker.completer import Completer
from core.worker.state import HandlerTimeout, RunState

log = logging.getLogger("core.worker")


class Heartbeat:
    def __init__(self, state: RunState, completer: Completer) -> None:
        self.s = state
        self.completer = completer

    def beat(self) -> None:
        """Extend the leases of every held record; forget those that come back lost; check timeouts."""
        s = self.s
        self._check_timeouts()
        with s.lock:
            helds = [h for h in s.held.values() if not h.abandoned]
        kept, cancels = s.store.heartbeat([h.record for h in helds], registered=s.options.register)
        lost = [h for h in helds if h.record.id not in kept and not h.completing]
        for h in helds:
            if h.record.id in cancels:
                h.cancel_requested = True
        if not lost:
            return
        # Someone else owns these now: stop treating them as ours; a late result will be fenced anyway.
        with s.lock:
            # Our own completion may have landed between the snapshot and the check: not a loss.
            lost = [h for h in lost if s.held.get(h.record.id) is h and not h.completing]
            for h in lost:
                h.abandoned = True
                s.held.pop(h.record.id, None)
        if not lost:
            return
        s.count(lost_leases=len(lost))
        s.metrics.lost(len(lost))
        log.warning("leases lost", extra={"records": [h.record.id for h in lost]})

    def _check_timeouts(self) -> None:
        s = self.s
        timeout = s.options.handler_timeout
        if not timeout:
            return
        now = time.monotonic()
        with s.lock:
            # Not a finished one: its success waits in the completion buffer (a claim carries it), and failing it
            # now would drop a result the handler returned in time.
            expired = [h for h in s.held.values()
                       if h.started is not None and not h.abandoned and not h.finished and now - h.started > timeout]
            for h in expired:
                h.abandoned = True
        for h in expired:
            err = HandlerTimeout(f"handler exceeded {timeout:g}s on record {h.record.id}")
            s.count(timed_out=1)
            self.completer.fail(h, err)
