"""A PgBouncer (transaction pooling) that restarts mid-drain: nothing lost, workers recover on their own."""

from __future__ import annotations

import time
from typing import Any

from tests.chaos.conftest import RECOVERY_BOUND, Fleet
from tests.chaos.test_database_faults import _assert_all_completed_once, _enqueue, _stop_fleet
from tests.concurrent.test_pgbouncer import POOLING_ERRORS
from tests.servers import PgBouncer
from tests.support import Server, dbname_of, unfinished, wait_until


def _completed(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0])


def test_pgbouncer_restart_mid_drain(dsn: str, chaos_db: Any, fleet: Fleet, pg_server: Server) -> None:
    db = chaos_db
    total = 6000
    _enqueue(dsn, total, sleep=0.001)
    with PgBouncer(pg_server.admin_dsn, pool_size=10) as bouncer:
        via = bouncer.dsn(dbname_of(dsn))
        names = [fleet.spawn(dsn=via, env={"DP_POOLING": "transaction"}) for _ in range(3)]
        wait_until(lambda: _completed(db) > 1000, 30, message="the drain is under way")
        bouncer.stop()  # every client connection breaks at once
        down_at = time.monotonic()
        time.sleep(1.0)  # the outage itself: clients retry against a closed port meanwhile
        before_restart = _completed(db)
        bouncer.start()
        wait_until(lambda: _completed(db) > before_restart, RECOVERY_BOUND + 5, interval=0.1,
                   message="completions resume after the pooler is back")
        resumed = time.monotonic() - down_at
        wait_until(lambda: unfinished(db) == 0, 90, interval=0.2, message="drained after the pooler restart")
        assert fleet.alive() == names, "workers recovered without a restart of their own"
        results = _stop_fleet(fleet)
    assert resumed < RECOVERY_BOUND + 5, resumed
    _assert_all_completed_once(db, total)
    for name, (_code, stdout, stderr) in results.items():
        assert not [e for e in POOLING_ERRORS if e in stdout + stderr], f"{name}: {stderr[-1500:]}"
