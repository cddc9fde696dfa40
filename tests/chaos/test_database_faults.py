"""Database faults: killed backends, a restarted server, a blackholed network, flaky calls, pool exhaustion."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core import DistributedProcessor, PoolExhausted
from core.migrate import upgrade
from tests.chaos.conftest import RECOVERY_BOUND, Fleet
from tests.chaos.proxy import BlackholeProxy
from tests.procs.chaos_handlers import CHAOS_DDL
from tests.servers import Cluster
from tests.support import unfinished, wait_until


def _enqueue(dsn: str, n: int, sleep: float = 0.0) -> list[int]:
    with DistributedProcessor(dsn) as p:
        return list(p.add_records([{"sleep": sleep} if sleep else {} for _ in range(n)]))


def _assert_all_completed_once(db: Any, total: int) -> None:
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", total)]
    assert db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone() == (total,)
    row = db.execute("SELECT count(DISTINCT record_id) FROM exec_ledger").fetchone()
    assert row == (total,), "every record executed at least once"


def _stop_fleet(fleet: Fleet) -> dict[str, Any]:
    alive = fleet.alive()
    results = fleet.terminate_all()
    for name in alive:
        code, _, err = results[name]
        assert code == 0, f"{name}: {err[-2000:]}"
    return results


def test_terminate_every_processor_backend_repeatedly(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    total = 10_000
    _enqueue(dsn, total, sleep=0.001)
    names = [fleet.spawn() for _ in range(3)]
    wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0]
               > 500, 30)
    killed = 0
    for _ in range(10):
        row = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'distributed-processor%%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
        killed += row[0]
        time.sleep(0.5)  # the fault cadence
    assert killed >= 10
    wait_until(lambda: unfinished(db) == 0, 80, interval=0.2, message="drained after backend kills")
    assert fleet.alive() == names, "workers resumed without a restart"
    _stop_fleet(fleet)
    _assert_all_completed_once(db, total)


def test_database_server_restart_during_a_drain(fleet: Fleet) -> None:
    # A dedicated cluster, not the shared one; stopped at the end whatever happens (a restart changes the
    # postmaster's pid: the cluster is stopped by its data folder, not by the pid it started with).
    with Cluster("restart") as server:
        dsn = server.dsn()
        try:
            upgrade(dsn)
            with psycopg.connect(dsn, autocommit=True) as db:
                db.execute(CHAOS_DDL)
            total = 10_000
            _enqueue(dsn, total, sleep=0.001)
            names = [fleet.spawn(dsn=dsn) for _ in range(3)]
            with psycopg.connect(dsn, autocommit=True) as db:
                wait_until(lambda: db.execute(
                    "SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0] > 1000, 30)
            restarted_at = time.monotonic()
            server.restart()
            with psycopg.connect(dsn, autocommit=True) as db:
                wait_until(lambda: unfinished(db) == 0, 80, interval=0.2, message="drained after the restart")
                assert fleet.alive() == names, "workers resumed without a restart of their own"
                _stop_fleet(fleet)
                _assert_all_completed_once(db, total)
            assert time.monotonic() - restarted_at < 85
        finally:
            fleet.kill_all()


def _upstream(dsn: str) -> tuple[str, int] | str:
    info = conninfo_to_dict(dsn)
    host, port = str(info.get("host") or "/var/run/postgresql"), int(info.get("port") or 5432)
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


def test_blackholed_network_longer_than_the_lease(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    db = chaos_db
    total = 3000
    _enqueue(dsn, total, sleep=0.01)
    with BlackholeProxy(_upstream(dsn)) as proxy:
        info = conninfo_to_dict(dsn)
        info.update(host="127.0.0.1", port=str(proxy.port))
        via_proxy = make_conninfo(**info)  # type: ignore[arg-type]
        cut = fleet.spawn(dsn=via_proxy)
        healthy = fleet.spawn()
        held = lambda: db.execute(  # noqa: E731
            "SELECT array_agg(id) FROM processing_queue WHERE status = 'processing' AND claimed_by = %s", (cut,)
        ).fetchone()[0] or []
        wait_until(lambda: len(held()) > 0, 30, message="the instance to cut off holds records")
        proxy.blackhole()
        cut_at = time.monotonic()
        # Nothing the cut-off instance sends from here on reaches the server until the restore; a statement of
        # it already delivered (a completion in flight) still runs and commits, as on a real network.
        cut_server = db.execute("SELECT clock_timestamp()").fetchone()[0]
        stranded = held()
        # each stranded record's claim at the cut: only a completion under it could be a late one
        stale = dict(db.execute("SELECT id, lease_token FROM processing_queue WHERE id = ANY(%s)",
                                (stranded,)).fetchall())
        # the healthy instance takes the stranded records over, via the dead-instance path or lease expiry
        wait_until(lambda: not set(stranded) & set(held()), RECOVERY_BOUND + 5, interval=0.1)
        recovery = time.monotonic() - cut_at
        while time.monotonic() - cut_at < 10:  # keep the partition open well past the 6 s lease
            time.sleep(0.2)
        proxy.restore()
        restored_at = db.execute("SELECT clock_timestamp()").fetchone()[0]
        wait_until(lambda: unfinished(db) == 0, 60, interval=0.2, message="drained after the partition")
        # the cut-off instance recovered: it executed records after traffic flowed again
        wait_until(lambda: db.execute("SELECT count(*) FROM exec_ledger WHERE instance = %s AND at > %s",
                                      (cut, restored_at)).fetchone()[0] > 0 or unfinished(db) == 0, 10)
        results = _stop_fleet(fleet)
    assert recovery <= RECOVERY_BOUND, recovery
    _assert_all_completed_once(db, total)
    import json

    summary = json.loads(results[cut][1].strip().splitlines()[-1])
    assert summary["lost_leases"] >= 1, "its late completions were rejected by fencing"
    # No late completion of the cut-off instance counts: a stranded record it finished under its claim from
    # before the cut was finished by a completion already delivered before the cut (its transaction started
    # then: finished_at is its start). A stranded record the recovery made pending again and the cut-off
    # instance claimed afresh after the restore (a new token; on a loaded machine the healthy one may not have
    # reached it in the partition's 10 s) is its own claim, not a late completion.
    finished = db.execute("SELECT id, claimed_by, finished_at, lease_token FROM processing_queue"
                          " WHERE id = ANY(%s)", (stranded,)).fetchall()
    late = [(i, by, at) for i, by, at, token in finished
            if by not in (healthy, cut)
            or (by == cut and token == stale[i] and at >= cut_server + timedelta(seconds=1))]
    assert late == [], (late, cut_server)
    assert db.execute("SELECT status FROM processor_instances WHERE instance_id = %s", (cut,)).fetchone() == (
        "stopped",
    )


class FlakyProcessor(DistributedProcessor):
    """Fails a third of database calls, half of them after the statement ran (the response is lost)."""

    def __init__(self, *args: Any, rate: float = 1 / 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate = rate
        self.rng = random.Random(5)
        self.injected = 0
        self.calls = 0
        self.lock = threading.Lock()

    def _roll(self) -> str | None:
        with self.lock:
            self.calls += 1
            r = self.rng.random()
            if r < self.rate:
                self.injected += 1
                return "before" if r < self.rate / 2 else "after"
        return None

    @contextmanager
    def connection(self, timeout: float | None = None, *, internal: bool = False) -> Iterator[Any]:
        with super().connection(timeout, internal=internal) as conn:
            yield _FlakyConn(conn, self)


class _FlakyConn:
    def __init__(self, conn: Any, owner: FlakyProcessor) -> None:
        self._conn = conn
        self._owner = owner

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        when = self._owner._roll()
        if when == "before":
            raise psycopg.OperationalError("injected: connection lost before the statement")
        result = self._conn.execute(*args, **kwargs)
        if when == "after":
            raise psycopg.OperationalError("injected: connection lost after the statement ran")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_intermittent_database_failures(dsn: str, chaos_db: Any) -> None:
    db = chaos_db
    total = 2000
    ids = _enqueue(dsn, total)
    # A claim whose answer is lost has charged an attempt (the server handed the records out). At this fault rate
    # one batch lost five times in a row (the default attempts) is a few per cent of runs, and it ends failed,
    # as it should (CI saw it once: 25 records). The test is about loss, not the attempts budget: give them more.
    db.execute("UPDATE processing_queue SET max_attempts = 50")
    executed: list[int] = []
    lock = threading.Lock()

    def handler(record: Any) -> None:
        with lock:
            executed.append(record.id)

    p = FlakyProcessor(dsn, lease_seconds=2, heartbeat_interval=0.5, cleanup_interval=0.5, dead_after=2,
                       connect_timeout=5, batch_size=25)
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(handler,), daemon=True,
                              kwargs={"stop_event": stop, "poll_interval": 0.1, "concurrency": 4, "grace_seconds": 5})
    thread.start()
    try:
        wait_until(lambda: unfinished(db) == 0, 80, interval=0.2, message="drained through flaky calls")
    finally:
        stop.set()
        thread.join(30)
        w = p.worker
        state = (w.held_count(), len(w._ready), w.summary) if w is not None else None
        p.close()
    assert not thread.is_alive(), f"run() did not return after stop: held, ready, summary = {state}"
    assert p.calls > 150 and 0.25 < p.injected / p.calls < 0.42, (p.injected, p.calls)
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", total)]
    assert db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone() == (total,)
    assert set(executed) == set(ids)
    # re-executions happen only where a claim's answer was lost (its records then waited for their lease)
    assert len(executed) - total < total * 0.5


def test_pool_exhaustion_gives_a_clear_timeout_never_a_deadlock(dsn: str) -> None:
    p = DistributedProcessor(dsn, pool_min=0, pool_max=2, connect_timeout=1)
    errors: list[BaseException] = []
    done = threading.Barrier(7)

    def hog() -> None:
        try:
            with p.connection():
                time.sleep(2.5)
        except BaseException as exc:
            errors.append(exc)
        done.wait(30)

    threads = [threading.Thread(target=hog) for _ in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    done.wait(30)
    elapsed = time.monotonic() - started
    for t in threads:
        t.join(5)
    p.close()
    assert len(errors) == 4
    assert all(isinstance(e, PoolExhausted) for e in errors), errors
    assert "pooled connections stayed busy" in str(errors[0])
    assert elapsed < 10


@pytest.mark.parametrize("n", [1])
def test_claims_keep_working_after_the_pool_recovers(dsn: str, n: int) -> None:
    with DistributedProcessor(dsn, pool_max=1, connect_timeout=1) as p:
        p.add_records([{}])
        with p.connection(), pytest.raises(PoolExhausted):
            p.claim_records()
        assert len(p.claim_records()) == n
