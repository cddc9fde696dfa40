"""A primary failover: a synchronous standby is promoted while worker processes drain a backlog through a
multi-host DSN (``target_session_attrs=read-write``); they find the new primary on their own and finish the
work, every record completed exactly once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from core import DistributedProcessor
from core.migrate import upgrade
from tests.procs.ledger import ensure_ledger
from tests.servers import Cluster
from tests.support import WorkerProcs, unfinished, wait_until

TOTAL = 3000
WORKERS = 2
CONCURRENCY = 4
BATCH = 20
LEASE = 3.0
# Seconds from the promotion to the first execution on the new primary: generous (a loaded 2-core machine).
# The workers' pools retry connecting in the background with psycopg_pool's backoff (1 s, doubling, jitter 10 %),
# so they find the new primary within about one backoff step (measured here: 0.03 to 1.7 s).
RESUME_BOUND = 20.0
CLAIMERS = 2  # run()'s default
# What one worker may hold at once: its running handlers plus the prefetch (run(): (2 + claimers) batches).
HELD_PER_WORKER = CONCURRENCY + (2 + CLAIMERS) * BATCH

REPLICATION = {"wal_level": "replica", "max_wal_senders": "4", "hot_standby": "on", "wal_sender_timeout": "'5s'"}


class Standby(Cluster):
    """A cluster cloned from a running primary with ``pg_basebackup -R`` (standby.signal, primary_conninfo),
    on a port and socket folder of its own."""

    def clone(self, primary: Cluster) -> Standby:
        self._run("pg_basebackup", "-D", str(self.data), "-h", "127.0.0.1", "-p", str(primary.port), "-U",
                  "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync")
        # the primary's postgresql.conf came along: later lines win
        own = {"port": str(self.port), "unix_socket_directories": f"'{self.home}'", "cluster_name": "'standby'"}
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in own.items())
        return self

    def promote(self) -> None:
        self._pg_ctl("-w", "-t", "60", "promote")


@pytest.fixture
def pair() -> Iterator[tuple[Cluster, Standby]]:
    """A primary and its synchronous standby; both stopped (and their folders removed) whatever happens."""
    primary = Cluster("failover-primary", settings=REPLICATION)
    standby: Standby | None = None
    try:
        primary.init()
        # initdb --auth=trust already trusts local replication; say it explicitly, it is what the clone needs
        with open(primary.data / "pg_hba.conf", "a", encoding="utf-8") as fh:
            fh.write("host replication postgres 127.0.0.1/32 trust\n")
        primary.start()
        standby = Standby("failover-standby")  # its free port picked while the primary's is taken
        standby.clone(primary).start()
        # Synchronous: a commit the primary acknowledged is flushed on the standby (the standby's walreceiver
        # is named after its cluster_name).
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
        primary.execute("SELECT pg_reload_conf()")
        wait_until(lambda: primary.execute("SELECT sync_state FROM pg_stat_replication") == [("sync",)], 30,
                   interval=0.1, message="the standby replicates synchronously")
        yield primary, standby
    finally:
        primary.destroy()
        if standby is not None:
            standby.destroy()


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _count(db: Any, query: str, *params: Any) -> int:
    return int(db.execute(query, params or None).fetchone()[0])


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


# Promoted at once, or after an outage longer than the lease and dead_after (3 s): then every lease has expired
# and each instance looks dead to the other when they reconnect.
@pytest.mark.parametrize("outage", [0.0, LEASE + 2], ids=["promoted-at-once", "outage-beyond-the-lease"])
def test_a_synchronous_standby_promoted_mid_drain_takes_over(
    pair: tuple[Cluster, Standby], workers: WorkerProcs, outage: float
) -> None:
    primary, standby = pair
    upgrade(primary.dsn())
    with _connect(primary.dsn()) as db:
        ensure_ledger(db)
    with DistributedProcessor(primary.dsn()) as p:
        p.add_records([{"sleep": 0.002} for _ in range(TOTAL)])
    # Both hosts in one libpq connection string: libpq tries them in order and keeps the one that accepts
    # writes, so a connection made after the promotion lands on the new primary.
    dsn = make_conninfo(host="127.0.0.1,127.0.0.1", port=f"{primary.port},{standby.port}", dbname="postgres",
                        user="postgres", target_session_attrs="read-write", connect_timeout="2")
    names = [f"fo{i}" for i in range(WORKERS)]
    for name in names:
        workers.start(name, ["-m", "tests.procs.ledger_worker", dsn, name, "--concurrency", str(CONCURRENCY),
                             "--batch", str(BATCH), "--lease", str(LEASE), "--poll", "0.2"])
    with _connect(primary.dsn()) as db:
        wait_until(lambda: _count(db, "SELECT count(*) FROM ledger") > TOTAL // 4, 60, interval=0.05,
                   message="a quarter of the backlog executed on the primary")
    started = time.monotonic()
    primary.kill()  # the postmaster and every backend, SIGKILL: a host failure
    killed_at = datetime.now(timezone.utc)  # the servers share this machine's clock
    with _connect(standby.dsn()) as sb:
        assert sb.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        # What the standby holds is all the new primary will know: the records it shows 'processing' once
        # everything received is replayed are the ones in flight at the failover.
        wait_until(lambda: sb.execute("SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()").fetchone()[0],
                   30, interval=0.05, message="the standby replayed what it received")
        in_flight = set(sb.execute("SELECT coalesce(array_agg(id), '{}') FROM processing_queue"
                                   " WHERE status = 'processing'").fetchone()[0])
        # The outage lasts (a fault's duration, not a synchronisation): no server accepts writes meanwhile.
        while time.monotonic() - started < outage:
            assert all(proc.poll() is None for proc in workers.procs.values()), "a worker exited in the outage"
            time.sleep(0.1)
        promoting_at = sb.execute("SELECT clock_timestamp()").fetchone()[0]
    standby.promote()
    promoted = time.monotonic()
    with _connect(standby.dsn()) as db:
        assert db.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        writable_at = db.execute("SELECT clock_timestamp()").fetchone()[0]
        first = wait_until(lambda: db.execute("SELECT min(started_at) FROM ledger WHERE started_at > %s",
                                              (promoting_at,)).fetchone()[0], RESUME_BOUND + 10, interval=0.05,
                           message="an execution on the promoted standby")
        resumed = (first - promoting_at).total_seconds()
        wait_until(lambda: unfinished(db) == 0, 60, interval=0.2, message="drained on the new primary")
        drained = time.monotonic()
        alive = [n for n, proc in workers.procs.items() if proc.poll() is None]
        # both processes came through on their own: alive, and heartbeating on the new primary
        beating = dict(db.execute("SELECT instance_id, last_heartbeat_at > %s FROM processor_instances",
                                  (promoting_at,)).fetchall())
        results = workers.terminate_all()
        statuses = db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall()
        completions = db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone()
        executed = _count(db, "SELECT count(DISTINCT record_id) FROM ledger")
        # Records executed more than once: how often they started on each side of the failover, and why the
        # product last took one back (last_error stays after the completion).
        twice = db.execute(
            "SELECT l.record_id, count(*) FILTER (WHERE l.started_at < %s), count(*) FILTER (WHERE l.started_at > %s),"
            " min(q.last_error) FROM ledger l JOIN processing_queue q ON q.id = l.record_id"
            " GROUP BY l.record_id HAVING count(*) > 1", (killed_at, promoting_at)).fetchall()
        executions = _count(db, "SELECT count(*) FROM ledger")
    fresh = {r: err for r, _, _, err in twice if r not in in_flight}
    print(f"\nfailover (outage {outage:g} s): first execution {resumed:.2f} s after the promotion began (which took"
          f" {(writable_at - promoting_at).total_seconds():.2f} s, ending {promoted - started:.2f} s after the kill);"
          f" drained {drained - started:.1f} s after the kill; {executions} executions of {TOTAL} records,"
          f" {len(twice)} executed twice ({len(fresh)} of them not in flight at the kill), {len(in_flight)} were")
    assert alive == names, {n: results[n][2][-3000:] for n in names if n not in alive}
    for name in names:
        code, out, err = results[name]
        assert code == 0, f"{name} exited {code}: {err[-3000:]}"
        assert json.loads(out.strip().splitlines()[-1])["processed"] > 0
    assert beating == dict.fromkeys(names, True), beating
    assert resumed < RESUME_BOUND, resumed
    # Exactly-once completion: every record completed, each counted once by the completion counts.
    assert statuses == [("completed", TOTAL)]
    assert completions == (TOTAL,)
    # At-least-once execution: every record ran; some ran twice, each at most once on the old primary.
    assert executed == TOTAL
    assert all(before <= 1 and after >= 1 for _, before, after, _ in twice), sorted(twice)
    # Ran twice, expected: a record in flight at the kill whose handler ran on the old primary while its
    # completion had not committed (synchronously) when the server died. It is still 'processing' on the
    # standby, and runs again after the failover.
    assert len(in_flight) <= WORKERS * HELD_PER_WORKER, len(in_flight)
    # Nothing else runs twice. After a failover an instance's claims can come back before its heartbeats (the
    # claims pool reconnects first), so its registry row may look older than dead_after while it claims
    # again; recovery leaves a dead instance's records claimed within dead_after alone (recover_orphans), and
    # the instance revives with its next beat.
    assert not fresh, fresh
