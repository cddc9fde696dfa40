"""The clocks of the in-memory processor: the system's, and :class:`FakeClock`, which a test moves by hand.

The clock stands for the database's ``now()``: it dates inserts, makes scheduled records and retries due,
expires leases, ages finished records for ``purge`` and instances for ``dead_after``. The worker loop's own
pacing (poll interval, heartbeat interval, grace period, ``handler_timeout``) is the loop's, in real time,
as it is for the real processor.
"""

from __future__ import annotations

import math
import threading
import weakref
from datetime import datetime, timedelta, timezone
from typing import Protocol

from core.errors import InvalidArgument


class Clock(Protocol):
    """What the in-memory tables read the time from (the database's ``now()``)."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class Watcher(Protocol):
    def clock_moved(self) -> None: ...


class SystemClock:
    """Real time (what an in-memory processor without a ``clock`` uses)."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that stands still until :meth:`advance` moves it. Thread-safe.

    Pass it as ``InMemoryProcessor(clock=clock)``; ``clock.advance(30)`` then makes a retry or a scheduled
    record due, or a lease expire, without sleeping. It starts at ``start`` (default: the real time when it
    is made) and never goes back.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now(timezone.utc)
        elif not isinstance(start, datetime) or start.tzinfo is None:
            raise InvalidArgument("start must be a timezone-aware datetime")
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()
        # Tables waiting for time to move (a run's idle claimers look again at once); weak: a clock may
        # outlive many processors in a test session.
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move the clock forward by ``seconds`` (a number or a timedelta, >= 0); returns the new time."""
        if isinstance(seconds, timedelta):
            delta = seconds
        elif isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise InvalidArgument(f"seconds must be a finite number or a timedelta, got {seconds!r}")
        else:
            delta = timedelta(seconds=seconds)
        if delta < timedelta(0):
            raise InvalidArgument(f"a clock does not go back: advance({seconds!r})")
        with self._lock:
            self._now += delta
            now = self._now
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.clock_moved()
        return now

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher.clock_moved()`` after every advance (held weakly)."""
        with self._lock:
            self._watchers.add(watcher)

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()!r})"
