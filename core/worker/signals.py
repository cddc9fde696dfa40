"""SIGTERM and SIGINT for a run: the first drains (``stop()``), a second aborts the grace (``abort()``).

Shared by :class:`~core.worker.loop.Worker` and :class:`~core.worker.fanout.Fanout`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("core.worker")


class SignalDrain:
    """Mixin: signal handling around a run, for a class with ``stop()``, ``abort()`` and ``options``."""

    signals_seen = 0
    _signal_lock = threading.Lock()  # replaced per instance by handling_signals()

    def stop(self, grace_seconds: float | None = None) -> None: ...

    def abort(self) -> None: ...

    @contextmanager
    def handling_signals(self, enabled: bool, grace_seconds: float) -> Iterator[None]:
        """While the run lasts (from the main thread, when ``enabled``), signals stop it."""
        self._signal_lock = threading.Lock()
        self._grace_seconds = grace_seconds
        previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs in the main thread between two of its bytecodes, perhaps while that thread
        # holds one of the locks stop() takes (the run's state, the wake-up's condition): taking it here
        # would wait for itself forever. The stop runs on a thread of its own instead.
        threading.Thread(target=self._signalled, args=(signum,), name="dp-signal", daemon=True).start()

    def _signalled(self, signum: int) -> None:
        with self._signal_lock:  # two signals close together: two threads, counted one after the other
            self.signals_seen += 1
            first = self.signals_seen == 1
        if first:
            log.info("signal received: draining", extra={"signal": signum, "grace_seconds": self._grace_seconds})
            self.stop()
        else:
            log.warning("second signal: aborting the grace period", extra={"signal": signum})
            self.abort()
