"""Container crash and restart: SIGKILLed workers, dead-instance recovery, poison records, handler faults."""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict
from typing import Any

from core import DistributedProcessor
from tests.chaos.conftest import CLEANUP, DEAD_AFTER, HEARTBEAT, RECOVERY_BOUND, Fleet
from tests.support import unfinished, wait_until


def held_by(db: Any, instance: str) -> list[int]:
    rows = db.execute(
        "SELECT id FROM processing_queue WHERE status = 'processing' AND claimed_by = %s", (instance,)
    ).fetchall()
    return [r[0] for r in rows]


def executions(db: Any) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for rid, instance in db.execute("SELECT record_id, instance FROM exec_ledger ORDER BY seq"):
        out[rid].append(instance)
    return out


def test_container_crash_and_restart_sigkill_every_few_seconds(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    total = 20_000
    with DistributedProcessor(dsn) as p:
        for _ in range(4):
            p.add_records([{"sleep": 0.002} for _ in range(total // 4)])
    for _ in range(4):
        fleet.spawn()
    rng = random.Random(11)
    killed: set[str] = set()
    recoveries: list[float] = []
    deadline = time.monotonic() + 80
    while unfinished(db) > 0 and time.monotonic() < deadline:
        time.sleep(1.0)  # the fault cadence, not a synchronisation
        victims = [n for n in fleet.alive() if held_by(db, n)]
        if not victims or len(killed) >= 6:
            continue
        victim = rng.choice(victims)
        fleet.procs[victim].send_signal(signal.SIGKILL)
        fleet.procs[victim].wait(10)
        killed.add(victim)
        fleet.spawn()  # the orchestrator restarts the container under a new identity
        t0 = time.monotonic()
        wait_until(lambda v=victim: not held_by(db, v), RECOVERY_BOUND + 5, interval=0.1,
                   message=f"records of {victim} recovered")
        recoveries.append(time.monotonic() - t0)
    wait_until(lambda: unfinished(db) == 0, 60, interval=0.2, message="drained after the kills")
    # A replacement spawned near the end may still be starting: until run() registers it, its signal handling is
    # not installed yet and a SIGTERM would end it with -15 instead of a graceful stop.
    alive = fleet.alive()
    wait_until(lambda: db.execute("SELECT count(*) FROM processor_instances WHERE instance_id = ANY(%s)",
                                  (alive,)).fetchone()[0] == len(alive), 30, interval=0.1,
               message="every running worker registered before the stop")
    results = fleet.terminate_all()
    assert len(killed) >= 3, "the test must really kill workers mid-drain"
    for name, (code, _, err) in results.items():
        if name not in killed:
            assert code == 0, f"{name}: {err[-1500:]}"
    # every record ends completed, each exactly once
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", total)]
    assert db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone() == (total,)
    # executions exceed completions only for records that were in flight in a killed process
    runs = executions(db)
    assert set(runs) == set(range(min(runs), min(runs) + total))
    repeated = {rid: inst for rid, inst in runs.items() if len(inst) > 1}
    for rid, instances in repeated.items():
        assert set(instances[:-1]) <= killed, f"record {rid} re-executed after {instances}"
    assert max(recoveries) <= RECOVERY_BOUND, recoveries


def test_killed_instance_recovered_via_dead_instance_path_before_leases_expire(
    dsn: str, chaos_db: Any, fleet: Fleet
) -> None:
    db = chaos_db
    with DistributedProcessor(dsn) as p:
        ids = p.add_records([{"sleep": 30} for _ in range(4)])
    victim = fleet.spawn("--lease-seconds", "60", "--dead-after", str(DEAD_AFTER))
    wait_until(lambda: len(held_by(db, victim)) == 4, 20, message="victim holds the records")
    fleet.procs[victim].send_signal(signal.SIGKILL)
    fleet.procs[victim].wait(10)
    killed_at = time.monotonic()
    # A survivor with a 60 s lease: only the dead-instance path can recover within seconds.
    with DistributedProcessor(dsn, dead_after=DEAD_AFTER, lease_seconds=60, heartbeat_interval=HEARTBEAT) as p:
        wait_until(lambda: p.cleanup_orphaned_records() or not held_by(db, victim), DEAD_AFTER + HEARTBEAT + 10,
                   interval=CLEANUP)
    elapsed = time.monotonic() - killed_at
    assert elapsed < 60 / 2, f"recovered after {elapsed:.1f}s, well before the 60 s leases"
    rows = db.execute(
        "SELECT status, last_error FROM processing_queue WHERE id = ANY(%s)", (ids,)
    ).fetchall()
    assert all(status == "pending" and "declared dead" in err for status, err in rows), rows
    assert db.execute("SELECT status FROM processor_instances WHERE instance_id = %s", (victim,)).fetchone() == (
        "dead",
    )


def test_poison_record_that_kills_every_worker_ends_failed(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    with DistributedProcessor(dsn) as p:
        (poison,) = p.add_records([{"exit": 3}], max_attempts=3)
        normal = p.add_records([{} for _ in range(50)])
    deaths = 0
    seen_dead: set[str] = set()
    fleet.spawn()
    deadline = time.monotonic() + 80
    while time.monotonic() < deadline:
        row = db.execute("SELECT status, attempts FROM processing_queue WHERE id = %s", (poison,)).fetchone()
        if row[0] == "failed":
            break
        for name in list(fleet.procs):
            proc = fleet.procs[name]
            if proc.poll() is not None and name not in seen_dead:
                seen_dead.add(name)
                assert proc.returncode == 3
                deaths += 1
                fleet.spawn()  # restart, as an orchestrator would
        time.sleep(0.2)
    row = db.execute("SELECT status, attempts, last_error FROM processing_queue WHERE id = %s", (poison,)).fetchone()
    assert row[0] == "failed" and row[1] == 3, row
    assert deaths == 3
    wait_until(lambda: unfinished(db) == 0, 30)
    statuses = db.execute("SELECT count(*) FROM processing_queue WHERE id = ANY(%s) AND status = 'completed'",
                          (normal,)).fetchone()
    assert statuses == (50,)
    fleet.terminate_all()


def test_handler_exceptions_and_timeouts_follow_the_retry_policy(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    with DistributedProcessor(dsn) as p:
        (raising,) = p.add_records([{"raise": True}], max_attempts=2)
        (hanging,) = p.add_records([{"hang": 20}], max_attempts=2)
        fine = p.add_records([{} for _ in range(20)])
    name = fleet.spawn("--handler-timeout", "1")
    wait_until(lambda: unfinished(db) == 0, 60, interval=0.2)
    rows = dict(
        (rid, (status, attempts, err))
        for rid, status, attempts, err in db.execute(
            "SELECT id, status, attempts, last_error FROM processing_queue WHERE id = ANY(%s)", ([raising, hanging],)
        )
    )
    assert rows[raising][:2] == ("failed", 2) and "ValueError: planned failure" in rows[raising][2]
    assert rows[hanging][:2] == ("failed", 2) and "HandlerTimeout" in rows[hanging][2]
    assert db.execute("SELECT count(*) FROM processing_queue WHERE id = ANY(%s) AND status = 'completed'",
                      (fine,)).fetchone() == (20,)
    code, _, err = fleet.terminate_all()[name]
    assert code == 0, err[-1500:]
