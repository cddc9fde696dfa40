"""A signal arriving while the main thread holds one of the locks stop() takes must not deadlock the worker
(a signal handler runs in the main thread, between two of its bytecodes)."""

from __future__ import annotations

import signal
import threading

from core.testing import InMemoryProcessor
from tests.support import wait_until


def test_a_signal_while_the_main_thread_holds_the_run_lock_still_stops_the_run() -> None:
    p = InMemoryProcessor()
    p.add_records([{}])
    done = threading.Event()
    runner = threading.Thread(target=lambda: (p.run(lambda r: None, handle_signals=False, poll_interval=0.05),
                                              done.set()), daemon=True)
    runner.start()
    wait_until(lambda: p.worker is not None and p.worker.started.is_set(), 10)
    worker = p.worker
    assert worker is not None and not isinstance(worker, type(None))
    state = worker.state  # type: ignore[union-attr]
    returned = threading.Event()
    with state.lock, state.wake._cv:  # as if the signal came in the middle of the claim loop's work
        worker._on_signal(signal.SIGTERM, None)  # type: ignore[union-attr]
        returned.set()
    assert returned.is_set()
    assert done.wait(10), "the run stopped once the locks were free"
    assert worker.signals_seen == 1  # type: ignore[union-attr]
