"""Cancellation seen by a running handler, and fenced late results of timed-out handlers."""

from __future__ import annotations

import threading
import time
from typing import Any

from core import DistributedProcessor
from core.worker import RecordCancelled, current_record_cancelled
from tests.support import wait_until


def test_running_handler_sees_cancel_and_the_outcome_is_cancelled(dsn: str, db: Any) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()

    def handler(record: Any) -> None:
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if current_record_cancelled():
                saw_cancel.set()
                raise RecordCancelled(f"record {record.id} cancelled")
            time.sleep(0.01)

    with DistributedProcessor(dsn, heartbeat_interval=0.2, lease_seconds=5) as p:
        (rid,) = p.add_records([{}])
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(handler,), kwargs={"stop_event": stop}, daemon=True)
        t.start()
        assert started.wait(10)
        assert p.cancel([rid]) == {rid: "processing"}
        assert saw_cancel.wait(5), "the heartbeat delivers the cancel flag to the handler"
        wait_until(lambda: db.execute("SELECT status FROM processing_queue WHERE id = %s", (rid,)).fetchone()
                   == ("cancelled",), 10)
        stop.set()
        t.join(10)
    assert p.worker is not None and p.worker.summary.cancelled == 1


def test_timed_out_handler_late_result_is_fenced(dsn: str, db: Any) -> None:
    release = threading.Event()
    finished_late = threading.Event()

    def handler(record: Any) -> None:
        release.wait(10)
        finished_late.set()

    with DistributedProcessor(dsn, heartbeat_interval=0.1, lease_seconds=3, max_attempts=1) as p:
        (rid,) = p.add_records([{}])
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(handler,), kwargs={"stop_event": stop, "handler_timeout": 0.3},
                             daemon=True)
        t.start()
        wait_until(lambda: db.execute("SELECT status FROM processing_queue WHERE id = %s", (rid,)).fetchone()
                   == ("failed",), 10)
        err = db.execute("SELECT last_error FROM processing_queue WHERE id = %s", (rid,)).fetchone()[0]
        assert "HandlerTimeout" in err
        release.set()  # the abandoned handler now returns "success" ...
        assert finished_late.wait(5)
        time.sleep(0.3)  # give a (wrong) completion the chance to land
        stop.set()
        t.join(10)
    # ... and its late result changed nothing
    assert db.execute("SELECT status FROM processing_queue WHERE id = %s", (rid,)).fetchone() == ("failed",)
    assert p.worker is not None and p.worker.summary.timed_out == 1 and p.worker.summary.processed == 0
