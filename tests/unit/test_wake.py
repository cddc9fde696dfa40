"""The claim loop's wake-up signal: a set() after a waiter looked is never lost (pure threading, no database)."""

from __future__ import annotations

import threading
import time

from core.worker import Wake


def test_a_set_between_looking_and_waiting_is_not_lost() -> None:
    wake = Wake()
    seen = wake.generation  # a claimer reads the generation, then runs its statement ...
    wake.set()  # ... meanwhile a handler finishes ...
    other = wake.generation
    wake.set()  # ... and another claimer's wake-up comes too (an Event's clear() by that one hid the first)
    started = time.monotonic()
    assert wake.wait_since(seen, 5.0) and wake.wait_since(other, 5.0)
    assert time.monotonic() - started < 1.0
    assert not wake.wait_since(wake.generation, 0.05)  # nothing new: waits out its timeout


def test_a_set_from_another_thread_wakes_every_waiter() -> None:
    wake = Wake()
    seen = wake.generation
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(wake.wait_since(seen, 10.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    wake.set()
    for t in waiters:
        t.join(10)
    assert woken == [True, True, True]
