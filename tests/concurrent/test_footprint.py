"""The connection footprint: a plain `dproc run` holds 3, a transactional one 3 plus its concurrency; a run the
server can never hold is refused; twenty containers fit a default server and share the work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from core import ConfigurationError, DistributedProcessor
from tests.procs.handlers import SVC_LEDGER_DDL
from tests.support import WorkerProcs, unfinished, wait_running, wait_until


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _connections(db: Any) -> int:
    # every connection of the worker carries its application name (the service one with a suffix)
    row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND application_name LIKE 'distributed-processor%%'").fetchone()
    return int(row[0])


@pytest.mark.parametrize(("transactional", "allowed"), [(False, 3), (True, 3 + 2)])
def test_a_default_run_holds_few_connections(dsn: str, db: Any, workers: WorkerProcs, transactional: bool,
                                             allowed: int) -> None:
    db.execute(SVC_LEDGER_DDL)
    with DistributedProcessor(dsn) as p:
        p.add_records([{"sleep": 0.01} for _ in range(3000)])
    handler = "tests.procs.handlers:ledger_tx" if transactional else "tests.procs.chaos_handlers:work"
    extra = ["--transactional", "--concurrency", "2"] if transactional else []
    if not transactional:
        from tests.procs.chaos_handlers import CHAOS_DDL

        db.execute(CHAOS_DDL)
    workers.start("w", ["-m", "core", "run", "--handler", handler, *extra], env={"DATABASE_URL": dsn,
                                                                                  "DP_INSTANCE_ID": "footprint"})
    wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0]
               > 200, 60, message="draining")
    peak = 0
    for _ in range(40):  # while it drains: the peak of what it holds, counted by the server
        peak = max(peak, _connections(db))
        db.execute("SELECT pg_sleep(0.02)")
    assert 0 < peak <= allowed, peak
    results = workers.terminate_all()
    assert results["w"][0] == 0, results["w"][2][-1500:]
    assert json.loads(results["w"][1].strip().splitlines()[-1])["lost_leases"] == 0


def test_a_run_the_server_can_never_hold_is_refused(processor: DistributedProcessor, db: Any) -> None:
    (allowed,) = db.execute("SELECT current_setting('max_connections')::int"
                            " - current_setting('superuser_reserved_connections')::int").fetchone()
    processor.add_records([{}])
    with pytest.raises(ConfigurationError, match=r"needs \d+ connections .* transactional handlers.* allows"):
        processor.run(lambda r, c: None, transactional=True, concurrency=allowed + 5, handle_signals=False)
    assert db.execute("SELECT status FROM processing_queue").fetchall() == [("pending",)]  # nothing claimed


def test_twenty_processes_drain_50000_records_exactly_once_each_taking_a_share(
    dsn: str, db: Any, workers: WorkerProcs
) -> None:
    db.execute(SVC_LEDGER_DDL)
    for i in range(20):
        workers.start(f"w{i}", ["-m", "core", "--log-level", "WARNING", "run", "--handler",
                                "tests.procs.handlers:ledger_tx", "--transactional", "--concurrency", "1",
                                "--poll-interval", "0.5", "--grace-seconds", "10"],
                      env={"DATABASE_URL": dsn, "DP_INSTANCE_ID": f"twenty-{i}"})
    # every container up before the work arrives, as under an orchestrator's rollout
    wait_running(db, 20, timeout=90)
    used = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()").fetchone()[0]
    assert used <= 20 * 4 + 2, used  # 3 each and 1 handler connection, plus the test's own
    with DistributedProcessor(dsn) as p:
        for start in range(0, 50_000, 10_000):
            p.add_records([{"n": i} for i in range(start, start + 10_000)])
    wait_until(lambda: unfinished(db) == 0, 240, interval=0.5, message="50,000 drained by 20 processes")
    row = db.execute("SELECT count(*), count(DISTINCT record_id) FROM svc_ledger").fetchone()
    assert row == (50_000, 50_000), "every record completed exactly once"
    shares = dict(db.execute("SELECT instance, count(*) FROM svc_ledger GROUP BY 1").fetchall())
    assert len(shares) == 20 and min(shares.values()) > 0, shares
    results = workers.terminate_all()
    assert all(code == 0 for code, _, _ in results.values()), {n: r[2][-300:] for n, r in results.items() if r[0]}
