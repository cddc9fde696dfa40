"""Resource faults: a starved CPU, a handler out of memory, a database name that stops resolving, a full disk.

Each runs real worker processes (the CLI) against a real server, injects the fault for a few seconds, takes
it away, and checks what the product promises: no lease lost while the instance can still reach the database,
a failure of the handler's own is a failed attempt of that record only, an unreachable database is named in
/health, a write refused by a full disk is an error with nothing half-written, and afterwards every record is
completed exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core import DatabaseUnavailable, DistributedProcessor
from core.migrate import upgrade
from tests.chaos.conftest import Fleet, worker_argv
from tests.procs.chaos_handlers import CHAOS_DDL
from tests.servers import Cluster, free_port, suite_dir
from tests.support import health_report, unfinished, wait_until


def _enqueue(dsn: str, payloads: list[dict[str, Any]], **kw: Any) -> list[int]:
    with DistributedProcessor(dsn) as p:
        return list(p.add_records(payloads, **kw))


def _completed(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0])


def _summaries(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """SIGTERM every worker; each must exit 0 and print its run summary (the last stdout line)."""
    out = {}
    for name, (code, stdout, stderr) in fleet.terminate_all().items():
        assert code == 0, f"{name} exited {code}: {stderr[-2000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _assert_completed_once(db: Any, total: int) -> None:
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", total)]
    assert db.execute("SELECT sum(count) FROM queue_stats WHERE status = 'completed'").fetchone() == (total,)
    assert db.execute("SELECT count(DISTINCT record_id) FROM exec_ledger").fetchone() == (total,)


@contextlib.contextmanager
def _burners(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_starved_cpu_loses_no_lease(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    """Twice as many busy loops as cores, for longer than a lease: heartbeats are late, never too late."""
    db = chaos_db
    total = 4000
    _enqueue(dsn, [{"sleep": 0.02} for _ in range(total)])  # about 10 s of work for two workers
    for _ in range(2):
        fleet.spawn("--lease-seconds", "3")
    wait_until(lambda: _completed(db) > 200, 30)
    cores = psutil.cpu_count() or 2
    with _burners(2 * cores):
        time.sleep(8)  # the fault's duration: past two leases of 3 s
        during = _completed(db)
        assert unfinished(db) > 0, "the fault lasted while there was work"
    wait_until(lambda: unfinished(db) == 0, 90, interval=0.2, message="drained after the CPU starvation")
    summaries = _summaries(fleet)
    assert during > 200, "work went on while starved"
    assert all(s["lost_leases"] == 0 for s in summaries.values()), summaries
    # nothing recovered from a live instance: every record ran once
    assert db.execute("SELECT count(*) FROM exec_ledger").fetchone() == (total,)
    _assert_completed_once(db, total)


def test_a_handler_out_of_memory_fails_its_record_only(dsn: str, chaos_db: Any, fleet: Fleet) -> None:
    """A handler asking for more than the process may have gets MemoryError: that record's attempts fail,
    the worker goes on, and a backlog of 1,000 records of 1 KB keeps the worker under 200 MB."""
    db = chaos_db
    total = 1000
    _enqueue(dsn, [{"pad": "x" * 1024, "i": i} for i in range(total)])
    (hog,) = _enqueue(dsn, [{"hog": 4 * 2**30}], max_attempts=2)
    name = fleet.spawn(handler="tests.procs.chaos_handlers:hog", env={"DP_TEST_HEADROOM_MB": "384"})
    proc = psutil.Process(fleet.procs[name].pid)
    peak = 0

    def sampled_drain() -> bool:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)
        return unfinished(db) == 0

    wait_until(sampled_drain, 60, interval=0.05, message="drained beside the out-of-memory handler")
    assert fleet.alive() == [name], "the worker survived its handler's MemoryError"
    _summaries(fleet)
    status, attempts, error = db.execute(
        "SELECT status, attempts, last_error FROM processing_queue WHERE id = %s", (hog,)).fetchone()
    assert (status, attempts) == ("failed", 2)
    assert "MemoryError" in error
    assert peak < 200 * 2**20, f"worker RSS peaked at {peak / 2**20:.0f} MB"
    db.execute("DELETE FROM processing_queue WHERE id = %s", (hog,))
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", total)]
    assert db.execute("SELECT count(DISTINCT record_id) FROM exec_ledger").fetchone() == (total,)




def test_a_database_name_that_stops_resolving(dsn: str, chaos_db: Any, fleet: Fleet, tmp_path: Path) -> None:
    """The worker reaches the server by a name from its hosts file; the name goes away and its connections
    are cut. /health says unhealthy and names the host; the name comes back and the work resumes, with no
    restart. The worker runs in a mount namespace of its own, whose /etc/hosts is a file of the test's."""
    db = chaos_db
    params = conninfo_to_dict(dsn)
    host = str(params.get("host", ""))
    assert host and not host.startswith("/"), f"this test reaches the server over TCP, not {host!r}"
    params.pop("hostaddr", None)
    name_dsn = make_conninfo(**{**params, "host": "dp-db.test", "connect_timeout": "2"})
    original = Path("/etc/hosts").read_text(encoding="utf-8")
    hosts = tmp_path / "hosts"
    resolv = tmp_path / "resolv.conf"
    with_name = f"{original.rstrip()}\n{host} dp-db.test\n"
    hosts.write_text(with_name, encoding="utf-8")
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n", encoding="utf-8")  # refused at once
    # A bind mount pins the file (its inode): the test rewrites it in place, never replaces it.
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              f"mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && exec \"$@\"", "sh"]
    total = 2000
    _enqueue(dsn, [{"sleep": 0.002} for _ in range(total)])
    port = free_port()
    fleet.start("dns", worker_argv("--health-port", str(port)), prefix=prefix,
                env={"DATABASE_URL": name_dsn, "DP_INSTANCE_ID": "dns"})
    wait_until(lambda: _completed(db) > 200, 30)
    assert health_report(port).get("status") in ("healthy", "degraded")
    with open(hosts, "w", encoding="utf-8") as fh:  # same inode: the mount sees it
        fh.write(original)
    cut = db.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND application_name LIKE 'distributed-processor%%'").fetchone()[0]
    assert cut > 0
    report = wait_until(lambda: (r := health_report(port)).get("status") == "unhealthy" and r, 30,
                        message="/health reports the unresolvable name")
    reasons = " ".join(report["reasons"])
    assert "resolve host 'dp-db.test'" in reasons, report  # the cause, not only the DSN
    stalled = _completed(db)
    assert stalled < total
    with open(hosts, "w", encoding="utf-8") as fh:
        fh.write(with_name)
    wait_until(lambda: unfinished(db) == 0, 60, interval=0.2, message="drained once the name resolves again")
    assert health_report(port).get("status") in ("healthy", "degraded")
    assert fleet.alive() == ["dns"], "no restart needed"
    _summaries(fleet)
    _assert_completed_once(db, total)


@contextlib.contextmanager
def _tmpfs(size_mb: int) -> Iterator[Path]:
    path = suite_dir("diskfull-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        subprocess.run(["chown", "postgres:postgres", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def _fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 2**20
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for size in (2**16, 2**12, 2**9):  # the last few blocks as well
            with contextlib.suppress(OSError):
                while True:
                    written += fh.write(b"\0" * size)
    return written


def _accepts(server: Cluster) -> bool:
    try:
        server.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _switch_wal_until_down(server: Cluster) -> None:
    """Switch WAL segments (with a little WAL between) until the server stops answering."""
    for _ in range(200):
        try:
            with psycopg.connect(server.dsn(), autocommit=True, application_name="wal-switcher",
                                 connect_timeout=5) as conn:
                for _ in range(50):
                    conn.execute("SELECT pg_switch_wal(), txid_current()")
        except psycopg.OperationalError as exc:
            if server.pid() is None or "terminat" in str(exc) or "closed" in str(exc) or "connect" in str(exc):
                return
            # an ERROR the disk gave (the connection still works): go on until the server stops
    raise AssertionError("the server kept writing WAL on a full disk")


def test_a_full_disk_refuses_writes_whole_and_the_work_resumes(fleet: Fleet) -> None:
    """The server's data on a small tmpfs, filled up mid-drain: an enqueue fails with DatabaseUnavailable
    and none of its batch is stored; then the server PANICs (a WAL segment it cannot write). With the space
    back (and the server restarted, if its own restart failed), the same workers, never restarted, finish
    everything, each record completed once."""
    with _tmpfs(160) as base:
        # No recycled WAL segments: every new one is a file written whole, which a full disk refuses.
        server = Cluster("diskfull", base=base, settings={
            "max_wal_size": "'16MB'", "min_wal_size": "'4MB'", "wal_keep_size": "0", "wal_recycle": "off",
            "wal_init_zero": "on",
        })
        # The server's log off the full disk: a PANIC's own message must have somewhere to go.
        server.log = suite_dir("diskfull-log-") / "server.log"
        try:
            server.init("--wal-segsize=1")
            server.start()
            dsn = server.dsn()
            upgrade(dsn)
            with psycopg.connect(dsn, autocommit=True) as db:
                db.execute(CHAOS_DDL)
            first = 2000
            _enqueue(dsn, [{"sleep": 0.002, "batch": -1} for _ in range(first)])
            fleet.spawn(dsn=dsn)
            with psycopg.connect(dsn, autocommit=True) as db:
                wait_until(lambda: _completed(db) > 200, 30)
            filler = base / "filler"
            assert _fill(filler) > 0
            errors: list[DatabaseUnavailable] = []
            stored_batches = 0
            # Batches of 500 records of 2 KB until one is refused (a page or a WAL segment with room left
            # takes the first ones).
            with DistributedProcessor(dsn, connect_timeout=5) as p:
                for batch in range(40):
                    try:
                        p.add_records([{"batch": batch, "pad": "y" * 2048} for _ in range(500)])
                        stored_batches += 1
                    except DatabaseUnavailable as exc:
                        errors.append(exc)
                        break
            assert errors, "a full disk refused an enqueue"
            assert isinstance(errors[0], DatabaseUnavailable) and "No space left" in str(errors[0]), errors
            # A new WAL segment that cannot be written is a PANIC: the server stops every backend. Switching
            # segments past those kept for reuse (the workers write WAL meanwhile) gets there at once.
            _switch_wal_until_down(server)
            assert "PANIC" in server.log.read_text(encoding="utf-8", errors="replace")
            filler.unlink()
            # The postmaster restarts after a PANIC by itself, unless its crash recovery failed for space too.
            wait_until(lambda: server.pid() is None or _accepts(server), 60, message="server back or stopped")
            if server.pid() is None:
                server.start()
            with psycopg.connect(dsn, autocommit=True) as db:
                per_batch = dict(db.execute(
                    "SELECT (payload->>'batch')::int, count(*) FROM record_payloads GROUP BY 1").fetchall())
                assert per_batch.pop(-1) == first
                assert all(n == 500 for n in per_batch.values()), f"a batch half-written: {per_batch}"
                assert len(per_batch) >= stored_batches
                total = first + 500 * len(per_batch)
                wait_until(lambda: unfinished(db) == 0, 90, interval=0.2, message="drained with the space back")
                assert len(fleet.alive()) == 1, "the worker survived the PANIC"
                _summaries(fleet)
                _assert_completed_once(db, total)
        finally:
            fleet.kill_all()
            server.destroy()


@pytest.fixture(autouse=True)
def _root_only() -> None:
    assert os.geteuid() == 0, "these faults need root (mount namespaces, tmpfs); CI runs as root"
