"""The wake-up of the claim loop: set by handlers finishing, claims freeing keys, notifications, stops."""

from __future__ import annotations

import threading


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
