"""Start/stop stress and graceful shutdown with real signals."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

from core import DistributedProcessor
from tests.chaos.conftest import Fleet
from tests.support import wait_until


def _processor_threads() -> list[str]:
    prefixes = ("dp-", "pool-")
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes) and t.is_alive()]


def _backends(db: Any) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'distributed-processor%%'"
    ).fetchone()
    return int(row[0])


def test_twenty_rapid_start_stop_cycles_leave_nothing_behind(dsn: str, db: Any) -> None:
    before = set(_processor_threads())
    with DistributedProcessor(dsn) as producer:
        producer.add_records([{"n": i} for i in range(200)])
    for cycle in range(20):
        p = DistributedProcessor(dsn, instance_id=f"cycle-{cycle}", heartbeat_interval=0.05, lease_seconds=1,
                                 cleanup_interval=0.05)
        stop = threading.Event()
        thread = threading.Thread(target=p.run, args=(lambda r: None,), kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        wait_until(lambda p=p: p.worker is not None and p.worker.started.is_set(), 10)
        time.sleep(0.02 * (cycle % 3))  # vary where in its life the stop lands
        stop.set()
        thread.join(15)
        assert not thread.is_alive()
        p.close()
    wait_until(lambda: set(_processor_threads()) <= before, 10, message="threads gone")
    wait_until(lambda: _backends(db) == 0, 10, message="connections closed")
    rows = db.execute("SELECT status, count(*) FROM processor_instances GROUP BY 1").fetchall()
    assert rows == [("stopped", 20)]
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'processing'").fetchone() == (0,)


def _summary(result: tuple[int, str, str]) -> dict[str, Any]:
    return json.loads(result[1].strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_sigterm_finishes_in_flight_and_releases_the_rest_at_once(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    with DistributedProcessor(dsn) as p:
        ids = p.add_records([{"sleep": 2} for _ in range(10)])
    # A long lease: once the first two handlers show their pace (2 s each), the other 8 fit in the prefetch
    # (what can start within a quarter of the lease); before that, a run holds what can start at once.
    name = fleet.spawn("--concurrency", "2", "--grace-seconds", "20", "--lease-seconds", "60")

    def counts() -> dict[str, int]:
        return dict(db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall())

    wait_until(lambda: counts() == {"completed": 2, "processing": 8}, 20,
               message="2 done, then the other 8 claimed (2 running, 6 prefetched)")
    sent = time.monotonic()
    fleet.procs[name].send_signal(signal.SIGTERM)
    # the prefetched records go back at once, long before the running ones finish
    wait_until(lambda: counts().get("pending") == 6, 1.5, message="unstarted records released at once")
    out, err = fleet.procs[name].communicate(timeout=15)  # no second signal: let it drain
    code = fleet.procs[name].returncode
    assert code == 0, err[-1500:]
    assert time.monotonic() - sent < 10
    rows = db.execute("SELECT status, attempts FROM processing_queue WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()
    assert sorted(rows) == sorted([("completed", 1)] * 4 + [("pending", 0)] * 6)  # attempts not charged
    assert _summary((code, out, err))["released"] == 6
    assert db.execute("SELECT status FROM processor_instances WHERE instance_id = %s", (name,)).fetchone() == (
        "stopped",
    )


def test_second_signal_aborts_the_grace_period(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    with DistributedProcessor(dsn) as p:
        ids = p.add_records([{"sleep": 60} for _ in range(2)])
    name = fleet.spawn("--concurrency", "2", "--grace-seconds", "60")
    wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE status = 'processing'").fetchone()[0]
               == 2, 20)
    proc = fleet.procs[name]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # a human pressing Ctrl-C twice
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    assert proc.returncode == 0
    assert time.monotonic() - sent < 10
    rows = db.execute("SELECT status, attempts FROM processing_queue WHERE id = ANY(%s)", (ids,)).fetchall()
    assert rows == [("pending", 0), ("pending", 0)]
