"""Queue control across real worker processes: a schedule fired once per tick by 4 processes while one is
killed and one restarted; a pause obeyed by 3 draining workers; a rate kept across 4 workers, a key's rate
holding back only its key."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from core import DistributedProcessor
from tests.procs.ledger import ensure_ledger
from tests.support import WorkerProcs, wait_running, wait_until


@pytest.fixture
def workers(db: Any) -> Iterator[WorkerProcs]:
    ensure_ledger(db)
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _start(workers: WorkerProcs, dsn: str, name: str, *extra: str) -> None:
    workers.start(name, ["-m", "tests.procs.ledger_worker", dsn, name, *extra])



def _clock(db: Any) -> datetime:
    return db.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[no-any-return]


def _stop(workers: WorkerProcs) -> None:
    for name, (code, _, err) in workers.terminate_all().items():
        assert code in (0, -9), f"{name} exited {code}: {err[-2000:]}"


def test_a_schedule_fires_once_per_tick_with_workers_killed_and_restarted(workers: WorkerProcs, dsn: str,
                                                                         db: Any) -> None:
    # 4 processes start at once, each declaring the same schedule (as containers do): one schedule is left
    for i in range(4):
        _start(workers, dsn, f"w{i}", "--schedule", "sweep")
    wait_running(db, 4)
    assert db.execute("SELECT count(*) FROM schedules").fetchone()[0] == 1
    begin = _clock(db)
    time.sleep(10)  # the schedule runs: let ticks pass (this is the test's own timeline, not a wait for a result)
    workers.procs["w0"].kill()  # a crash
    time.sleep(5)
    workers.procs["w1"].terminate()  # a restart
    workers.procs["w1"].wait(30)
    _start(workers, dsn, "w1b", "--schedule", "sweep")
    time.sleep(15)
    end = _clock(db)
    _stop(workers)
    rows = db.execute("SELECT run_at, dedupe_key FROM processing_queue WHERE queue = 'ticks'"
                      " AND run_at BETWEEN %s AND %s ORDER BY run_at", (begin, end)).fetchall()
    ticks = [r[0] for r in rows]
    assert len(ticks) >= 25, ticks  # about 30 seconds of ticks
    assert len(set(ticks)) == len(ticks)  # none twice
    steps = {(b - a).total_seconds() for a, b in itertools.pairwise(ticks)}
    assert steps == {1.0}, sorted(steps)  # none missing: every second between the first and the last
    assert db.execute("SELECT fired FROM schedules").fetchone()[0] >= len(ticks)


def _queue_starts(db: Any, queue: str) -> list[datetime]:
    return [r[0] for r in db.execute(
        "SELECT l.claimed_at FROM ledger l JOIN processing_queue q ON q.id = l.record_id WHERE q.queue = %s"
        " ORDER BY l.claimed_at", (queue,)).fetchall()]


def test_a_paused_queue_stops_on_every_worker_and_resumes_within_a_second(workers: WorkerProcs, dsn: str,
                                                                           db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        p.add_records([{"sleep": 0.01} for _ in range(1500)], queue="a")
        p.add_records([{"sleep": 0.01} for _ in range(1500)], queue="b")
        for i in range(3):
            _start(workers, dsn, f"w{i}", "--queues", "a,b", "--concurrency", "4")
        wait_until(lambda: len(_queue_starts(db, "a")) >= 100, 60, interval=0.05, message="a being drained")
        p.pause("a", reason="test")
        paused = _clock(db)
        # a claim statement already running when the pause committed may still take records: it started
        # before; none may start from a claim after it (allow the few milliseconds such a statement runs)
        wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'b'"
                                      " AND status IN ('pending', 'processing')").fetchone()[0] == 0,
                   120, interval=0.1, message="b drained while a is paused")
        late = [t for t in _queue_starts(db, "a") if t > paused + timedelta(seconds=0.5)]
        assert late == []
        left = db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'a' AND status = 'pending'"
                          ).fetchone()[0]
        assert left > 0  # a kept its records
        assert p.get_queue_status()["queues"]["a"]["paused"]["reason"] == "test"
        assert p.resume("a")
        resumed = _clock(db)
        first = wait_until(lambda: [t for t in _queue_starts(db, "a") if t > resumed], 10, interval=0.02,
                           message="a claimed again")[0]
        assert (first - resumed).total_seconds() < 1.0
    _stop(workers)


def _max_in_window(starts: list[datetime], n: int) -> float:
    """The largest count of starts over any window of T >= 1 s, less n * (T + 1) (<= 0: within the rate)."""
    worst = float("-inf")
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            span = max(1.0, (starts[j] - starts[i]).total_seconds())
            worst = max(worst, (j - i + 1) - n * (span + 1))
    return worst


def test_a_queue_rate_holds_across_four_workers(workers: WorkerProcs, dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        p.set_queue_rate("default", 100, 1.0)
        p.add_records([{} for _ in range(3000)])
        for i in range(4):
            _start(workers, dsn, f"w{i}", "--concurrency", "4")
        wait_until(lambda: db.execute("SELECT count(DISTINCT record_id) FROM ledger").fetchone()[0] == 3000, 120,
                   interval=0.2, message="3,000 records started")
    _stop(workers)
    starts = _queue_starts(db, "default")
    assert len(starts) == 3000
    # over every window of T >= 1 s: <= 100 x (T + 1). The bucket counts time from its statement's instant and
    # claimed_at is each row's clock, a few milliseconds later: less than one start of difference.
    assert _max_in_window(starts, 100) < 1
    # after the first burst (the bucket starts full: 100 at once), about the rate while a backlog remains
    sustained = (len(starts) - 101) / (starts[-1] - starts[100]).total_seconds()
    assert 90 <= sustained <= 101, sustained


def test_a_key_rate_holds_back_its_key_only(workers: WorkerProcs, dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        p.set_key_rate("partner", 10, 1.0)
        # 80 at 10/s after a burst of 10: the partner's half-way start comes about 3 s after its first
        p.add_records([{} for _ in range(80)], ordering_key="partner")
        others = p.add_records([{} for _ in range(2000)], ordering_key=[f"k{i % 200}" for i in range(2000)])
        for i in range(2):
            _start(workers, dsn, f"w{i}", "--concurrency", "4")
        wait_until(lambda: db.execute("SELECT count(DISTINCT record_id) FROM ledger").fetchone()[0] == 2080, 120,
                   interval=0.1,
                   message="every record started")
    _stop(workers)
    slow = [r[0] for r in db.execute("SELECT claimed_at FROM ledger WHERE ordering_key = 'partner'"
                                     " ORDER BY claimed_at").fetchall()]
    assert _max_in_window(slow, 10) < 1
    other = [r[0] for r in db.execute("SELECT claimed_at FROM ledger WHERE record_id = ANY(%s) ORDER BY claimed_at",
                                      (list(others),)).fetchall()]
    # the other keys' records went at their own pace, not the partner's: done before the partner's half-way
    assert other[-1] < slow[len(slow) // 2], (other[-1], slow[len(slow) // 2])
