"""Worker processes under a pinned MVCC horizon: records put below their floors by every path are claimed
promptly (well inside the floors' periodic reset), and nothing is completed twice."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from core.floors import FLOOR_RESET_SECONDS
from tests.procs.ledger import ensure_ledger
from tests.support import WorkerProcs, unfinished, wait_until

PROMPT = 2.5  # seconds: how soon an injected record must start (the reset alone would allow 5)


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _started_within(db: Any, ids: list[int], since: datetime) -> float:
    """Seconds from ``since`` until the last of ``ids`` started an execution after it."""
    rows = db.execute("SELECT record_id, min(started_at) FROM ledger WHERE record_id = ANY(%s) AND started_at > %s"
                      " GROUP BY record_id", (ids, since)).fetchall()
    assert len(rows) == len(set(ids)), f"{len(set(ids)) - len(rows)} of {len(set(ids))} never started after"
    return max(float((started - since).total_seconds()) for _, started in rows)


def test_every_path_below_the_floors_is_claimed_promptly_by_several_processes(
    dsn: str, db: Any, workers: WorkerProcs
) -> None:
    assert PROMPT < FLOOR_RESET_SECONDS
    ensure_ledger(db)
    pin = psycopg.connect(dsn, application_name="pinning-report")
    pin.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    pin.execute("SELECT 1").fetchone()
    try:
        with DistributedProcessor(dsn, instance_id="producer") as p:
            backlog = p.add_records([{"sleep": 0.002} for _ in range(6000)])
            bad = p.add_records([{"fail_times": 1}], max_attempts=1)  # ends failed; an operator retries it
            for i in range(3):
                workers.start(f"w{i}", ["-m", "tests.procs.ledger_worker", dsn, f"w{i}", "--concurrency", "4",
                                        "--lease", "3", "--poll", "0.2"])
            wait_until(lambda: db.execute("SELECT count(*) FROM ledger").fetchone()[0] > 1500, 60)
            at = db.execute("SELECT now()").fetchone()[0]
            urgent = p.add_records([{} for _ in range(20)], priority=9)
            overdue = p.add_records([{} for _ in range(20)], run_at=datetime.now(timezone.utc) - timedelta(hours=1))
            wait_until(lambda: db.execute("SELECT status FROM processing_queue WHERE id = %s",
                                          (bad[0],)).fetchone() == ("failed",), 60)
            workers.procs["w0"].kill()  # its records come back through recovery
            workers.procs["w0"].wait(10)
            # A statement w0 sent just before it died may still commit: its backends are gone first.
            wait_until(lambda: db.execute("SELECT count(*) FROM pg_stat_activity"
                                          " WHERE application_name LIKE 'ledger-w0%%'").fetchone()[0] == 0, 30)
            killed_at = db.execute("SELECT now()").fetchone()[0]
            held = db.execute("SELECT array_agg(id) FROM processing_queue WHERE status = 'processing'"
                              " AND claimed_by = 'w0'").fetchone()[0] or []
            # Retried after w0 is gone: a retried record has one attempt, and a prefetch of it by the
            # process about to be killed would end it failed by recovery, never started.
            db.execute("UPDATE processing_queue SET payload = '{}' WHERE id = %s", (bad[0],))  # the fix
            retried_at = db.execute("SELECT now()").fetchone()[0]
            assert p.retry_failed(bad) == 1
            wait_until(lambda: unfinished(db) == 0, 120, interval=0.2, message="drained under the pinned horizon")
        assert _started_within(db, urgent, at) < PROMPT
        assert _started_within(db, overdue, at) < PROMPT
        assert _started_within(db, bad, retried_at) < PROMPT
        if held:  # recovered after the 3 s lease, then claimed promptly
            assert _started_within(db, held, killed_at) < 3 + 1.5 + PROMPT
    finally:
        pin.rollback()
        pin.close()
    results = workers.terminate_all()
    assert all(code == 0 for name, (code, _, _) in results.items() if name != "w0"), results
    total = len(backlog) + 41
    statuses = db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall()
    assert statuses == [("completed", total)], db.execute(
        "SELECT id, attempts, max_attempts, p.payload, last_error"
        " FROM processing_queue JOIN record_payloads p USING (id) WHERE status <> 'completed'"
    ).fetchall()
    # completions exactly once (the finished counts), executions of every record at least once
    assert db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone() == (total,)
    assert db.execute("SELECT count(DISTINCT record_id) FROM ledger").fetchone() == (total,)
