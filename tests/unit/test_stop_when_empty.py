"""stop_when_empty and a second claimer: the last records claimed by one claimer while another looks whether
anything is due are run, not released by a stop with no grace (the interleaving forced on the in-memory
processor, which runs the same worker loop)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from core.record import Record
from core.testing import InMemoryProcessor
from core.testing.records import MemoryRecords


def test_records_claimed_by_another_claimer_during_the_last_look_are_run(monkeypatch: pytest.MonkeyPatch) -> None:
    p = InMemoryProcessor()
    real_any_due = MemoryRecords.any_due
    forced, looked = threading.Event(), threading.Event()
    ran: list[int] = []

    def any_due(self: MemoryRecords, queues: list[str]) -> bool:
        if not forced.is_set():
            forced.set()
            # Between this claimer's first look (nothing held, no claim under way) and the query: a producer
            # adds a record and the other claimer takes it, so the query finds nothing due.
            p.add_records([{"late": True}])
            deadline = time.monotonic() + 10
            while _count(p, "pending") and time.monotonic() < deadline:
                time.sleep(0.005)
            assert not _count(p, "pending"), "the other claimer never took it"
            due = bool(real_any_due(self, queues))
            looked.set()
            return due
        return bool(real_any_due(self, queues))

    monkeypatch.setattr(MemoryRecords, "any_due", any_due)

    def handler(record: Record) -> None:
        # Still running when the first claimer has looked; then up to 1 s for a stop to release the record
        # under it (what happened before the fix), so its success would come too late.
        assert looked.wait(10)
        deadline = time.monotonic() + 1
        while _count(p, "processing") and time.monotonic() < deadline:
            time.sleep(0.01)
        ran.append(record.id)

    summary: Any = p.run(handler, claimers=2, stop_when_empty=True, handle_signals=False, poll_interval=0.05)
    assert forced.is_set()
    assert ran and summary.processed == 1  # run, not released at the stop
    assert _count(p, "completed") == 1 and _count(p, "pending") == 0


def _count(p: InMemoryProcessor, status: str) -> int:
    return int(p.get_queue_status()["queues"].get("default", {}).get(status, 0))
