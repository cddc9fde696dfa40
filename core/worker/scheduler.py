"""Firing schedules: the service loop asks the store to fire the due ticks (once each across instances: the
store's compare and swap decides, core/schedules.py) whenever the next one falls, and at least every second
(a schedule another instance declares meanwhile is seen within it)."""

from __future__ import annotations

import logging
import random
import time

from core.worker.state import RunState

log = logging.getLogger("core.worker")

LOOK_EVERY = 1.0  # seconds: the longest wait between two looks at the schedules


class Scheduler:
    def __init__(self, state: RunState) -> None:
        self.s = state
        self.next_look = time.monotonic() + random.uniform(0.0, LOOK_EVERY)  # instances started together spread

    def step(self) -> None:
        """Fire what is due, then look again when the next tick falls (within a second)."""
        try:
            added = self.s.store.fire_due()
            wait = self.s.store.seconds_to_next_schedule()
        except BaseException:
            self.next_look = time.monotonic() + LOOK_EVERY
            raise
        if added:
            log.info("schedules fired", extra={"records": added})
            self.s.wake.set()  # our own claimers look at once
        self.next_look = time.monotonic() + (LOOK_EVERY if wait is None else min(wait, LOOK_EVERY))
