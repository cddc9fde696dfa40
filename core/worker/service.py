"""The service loop: heartbeats, maintenance, schedules and notifications, on the run's one service connection.

Between its statements it waits for NOTIFY (a hint: the claim loop also polls) at most a quarter of a second
at a time, so a heartbeat is never late by more than that, and never waits behind handler work: the
handlers and the claims have connections of their own.
"""

from __future__ import annotations

import logging
import random
import time

from core.errors import DatabaseUnavailable
from core.worker.heartbeat import Heartbeat
from core.worker.maintainer import Maintainer
from core.worker.scheduler import Scheduler
from core.worker.state import RunState

log = logging.getLogger("core.worker")

WAIT_SLICE = 0.25  # seconds: the longest wait for a notification between two looks at the clock


class Service:
    def __init__(self, state: RunState, heartbeat: Heartbeat, maintainer: Maintainer, scheduler: Scheduler) -> None:
        self.s = state
        self.heartbeat = heartbeat
        self.maintainer = maintainer
        self.scheduler = scheduler

    def run(self) -> None:
        s = self.s
        beat_every = s.settings.heartbeat_interval
        next_beat = time.monotonic() + beat_every * random.uniform(0.9, 1.0)
        failures = 0
        while not s.finished.is_set():
            try:
                # While a maintenance round is under way its next step follows at once; else wait for the
                # next heartbeat or maintenance round, listening meanwhile.
                due = min(next_beat, self.maintainer.next_round, self.scheduler.next_look)
                timeout = 0.0 if self.maintainer.busy else min(WAIT_SLICE, max(0.0, due - time.monotonic()))
                if s.store.listener is None:
                    s.finished.wait(timeout)  # nothing to listen for: the poll finds new records
                elif s.store.wait(timeout):
                    s.wake.set()  # an insert (or a reconnect: notifications may have been missed)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every * random.uniform(0.9, 1.0)
                    self.heartbeat.beat()
                elif time.monotonic() >= self.scheduler.next_look:
                    self.scheduler.step()
                else:
                    self.maintainer.step()  # one statement at most: the next heartbeat is never late for it
                failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("service connection unavailable; retrying", extra={"error": str(exc)[:300]})
                s.finished.wait(min(2.0, 0.05 * 2**failures))
            except Exception:  # keep serving whatever happens
                log.exception("service loop error")
                s.finished.wait(0.5)
