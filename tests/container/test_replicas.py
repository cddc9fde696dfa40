"""Three replicas of the image share one database: migrate, enqueue through `docker run -i`, probes, a replica
`docker kill`ed mid-drain, `docker stop` of the others mid-drain, every record completed exactly once.

The handler is the demo's (``core.demo:handler``, transactional): its ledger row commits with the record's
completion, so the ledger counts completed executions exactly, a killed replica's unfinished work included.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from core.queries import TABLES, Queries
from tests.container.conftest import create_database
from tests.container.engine import Engine, Figures, docker, logs, wait_for
from tests.servers import Cluster, free_port

pytestmark = pytest.mark.timeout(1800)

RECORDS = 10_000
WORK_MS = 40  # per record: long enough that the kill and the stop both land mid-drain
CONCURRENCY = 8
LEASE = 6  # heartbeat 2 s, dead after 6 s: a killed replica's records are back within seconds
GRACE = 20  # DP_GRACE_SECONDS: the drain after SIGTERM
STOP_TIMEOUT = GRACE + 10  # the orchestrator's grace (docker stop -t), longer than the drain's
LEDGER = TABLES["demo_ledger"]
SECRET = "sekrit-pw"  # trust auth ignores it: it is in the DSN to prove no log line shows it
# As deploy/kubernetes runs it: a read-only root, no capabilities, no privilege escalation.
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.fixture
def conn(cluster: Cluster) -> Iterator[psycopg.Connection[Any]]:
    dsn = create_database(cluster, "replicas")
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def one(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query.encode(), params or None).fetchone()
    assert row is not None
    return row[0]


def held_by(conn: psycopg.Connection[Any], instance: str) -> list[int]:
    rows = conn.execute("SELECT id FROM processing_queue WHERE status = 'processing' AND claimed_by = %s",
                        (instance,)).fetchall()
    return [int(r[0]) for r in rows]


def unfinished(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn, "SELECT count(*) FROM processing_queue WHERE status IN ('pending', 'processing')"))


def wait_healthy(engine: Engine, name: str, since: float, timeout: float = 90) -> float:
    """Seconds from ``since`` until Docker's HEALTHCHECK reports the container healthy."""
    try:
        return float(wait_for(lambda: engine.state(name)["Health"]["Status"] == "healthy"
                              and time.monotonic() - since, timeout, f"{name} healthy"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; health: {engine.state(name).get('Health')}; logs: {logs(name)[-1500:]}") \
            from None


def stop(containers: list[str]) -> dict[str, float]:
    """``docker stop`` each container at once (as an orchestrator stops replicas); seconds each took, by name."""
    started = time.monotonic()
    procs = {c: subprocess.Popen(["docker", "stop", "-t", str(STOP_TIMEOUT), c], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for c in containers}
    took = {}
    for c, proc in procs.items():
        _, err = proc.communicate(timeout=STOP_TIMEOUT + 60)
        assert proc.returncode == 0, f"docker stop {c}: {err}"
        took[c] = round(time.monotonic() - started, 2)
    return took


def test_three_replicas_drain_10000_records_through_a_kill_and_a_stop(
    engine: Engine, image: str, cluster: Cluster, conn: psycopg.Connection[Any], figures: Figures
) -> None:
    dsn = f"postgresql://postgres:{SECRET}@127.0.0.1:{cluster.port}/replicas"
    migrate = engine.run(image, "migrate", env={"DATABASE_URL": dsn}, detach=False, options=HARDENED)
    assert migrate.returncode == 0, migrate.stderr
    assert one(conn, "SELECT count(*) FROM alembic_version") == 1
    conn.execute(Queries("public").demo_setup)

    instances = ["w1", "w2", "w3"]
    names = {i: engine.name(i) for i in instances}
    ports = {i: free_port() for i in instances}
    started = {}
    for i in instances:
        started[i] = time.monotonic()
        engine.run(image, name=names[i], env={
            "DATABASE_URL": dsn, "DP_INSTANCE_ID": i, "DP_HANDLER": "core.demo:handler", "DP_TRANSACTIONAL": "1",
            "DP_QUEUE": "demo", "DP_CONCURRENCY": str(CONCURRENCY), "DP_LEASE_SECONDS": str(LEASE),
            "DP_GRACE_SECONDS": str(GRACE), "DP_HEALTH_PORT": str(ports[i]), "DP_HEALTH_HOST": "127.0.0.1",
        }, options=HARDENED)
    ready = {i: round(wait_for(lambda i=i: get(ports[i], "/health/ready") == 200 and time.monotonic() - started[i],
                               60, f"{i} /health/ready"), 2) for i in instances}
    assert all(get(ports[i], "/health/live") == 200 for i in instances)
    figures["replica_start_to_ready_seconds"] = ready
    # Each replica's own HEALTHCHECK (dproc health, every 10 s) turns it healthy.
    healthy = {i: round(wait_healthy(engine, names[i], started[i]), 1) for i in instances}
    figures["replica_start_to_healthy_seconds"] = healthy

    lines = "".join(json.dumps({"n": n, "work_ms": WORK_MS}) + "\n" for n in range(RECORDS))
    t0 = time.monotonic()
    enqueue = engine.run(image, "enqueue", "--queue", "demo", "--no-progress", env={"DATABASE_URL": dsn},
                         detach=False, input=lines, timeout=300)
    assert enqueue.returncode == 0, enqueue.stderr
    figures["enqueue_10000_via_docker_run_seconds"] = round(time.monotonic() - t0, 2)
    assert one(conn, "SELECT count(*) FROM processing_queue WHERE queue = 'demo'") == RECORDS

    # w1 is killed while it holds records, a tenth of the way in.
    wait_for(lambda: one(conn, f"SELECT count(*) FROM {LEDGER}") >= RECORDS // 10 and held_by(conn, "w1"),
             120, "w1 holds records, 1,000 done")
    docker("kill", names["w1"])
    killed_at = time.monotonic()
    assert engine.state(names["w1"])["ExitCode"] == 137
    orphans = held_by(conn, "w1")
    assert orphans, "w1 held no record when it was killed"
    # Back in service once w1 counts as dead (no heartbeat for dead_after) or its leases ran out; they queue
    # behind the records already pending (run_at = now), so they are completed near the end of the drain.
    wait_for(lambda: not held_by(conn, "w1"), 60, f"the {len(orphans)} records w1 held recovered")
    figures["killed_replica_records"] = len(orphans)
    figures["killed_replica_records_back_in_service_seconds"] = round(time.monotonic() - killed_at, 1)
    assert one(conn, "SELECT count(*) FROM processing_queue WHERE id = ANY(%s) "
                     "AND status IN ('pending', 'processing', 'completed')", orphans) == len(orphans)
    assert one(conn, "SELECT status FROM processor_instances WHERE instance_id = 'w1'") == "dead"

    # SIGTERM to the other two while they hold records: they drain, release the rest, exit 0 within the grace.
    assert unfinished(conn) > 0, "the drain finished before the stop (raise RECORDS or WORK_MS)"
    wait_for(lambda: held_by(conn, "w2") and held_by(conn, "w3"), 30, "w2 and w3 hold records")
    memory = {i: docker("stats", "--no-stream", "--format", "{{.MemUsage}}", names[i]).stdout for i in ("w2", "w3")}
    figures["replica_memory_mid_drain"] = {i: m.split(" / ")[0] for i, m in memory.items()}
    took = stop([names["w2"], names["w3"]])
    figures["docker_stop_mid_drain_seconds"] = {i: took[names[i]] for i in ("w2", "w3")}
    for i in ("w2", "w3"):
        state = engine.state(names[i])
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs(names[i])[-2000:])
        assert took[names[i]] < GRACE, f"{i} took {took[names[i]]}s to stop"
    assert one(conn, "SELECT count(*) FROM processing_queue WHERE status = 'processing'") == 0
    assert sorted(conn.execute("SELECT instance_id FROM processor_instances WHERE status = 'stopped'").fetchall()) \
        == [("w2",), ("w3",)]
    left = unfinished(conn)
    assert left > 0

    # The same containers started again finish the rest.
    docker("start", names["w2"], names["w3"])
    wait_for(lambda: unfinished(conn) == 0, 300, f"the last {left} records done", interval=0.5)
    executions, distinct, completed, not_completed, span = conn.execute(Queries("public").demo_proof).fetchone()
    assert (executions, distinct, completed, not_completed) == (RECORDS, RECORDS, RECORDS, 0), \
        "every record completed, each by exactly one execution"
    by = dict(conn.execute(f"SELECT instance, count(*) FROM {LEDGER} WHERE record_id = ANY(%s) GROUP BY 1",
                           (orphans,)).fetchall())
    assert set(by) <= {"w2", "w3"} and sum(by.values()) == len(orphans), f"w1's records were run by {by}"
    per_instance = dict(conn.execute(Queries("public").demo_progress).fetchall())
    assert set(per_instance) == set(instances) and all(per_instance.values()), per_instance
    figures["records_per_replica"] = per_instance
    figures["drain_span_seconds"] = round(float(span), 1)

    took = stop([names["w2"], names["w3"]])
    figures["docker_stop_idle_seconds"] = {i: took[names[i]] for i in ("w2", "w3")}
    assert all(engine.state(names[i])["ExitCode"] == 0 for i in ("w2", "w3"))
    assert max(took.values()) < GRACE
    for i in instances:
        out = docker("logs", names[i])
        assert SECRET not in out.stdout + out.stderr, f"{i} logged the password"
        # DP_LOG_FORMAT=json, the image's default: every log line (stderr) is a JSON object.
        entries = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
        assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries), out.stderr[-1000:]
    # Each run of w2 and w3 printed its summary (stdout): nothing lost, the first run released what it held.
    for i in ("w2", "w3"):
        summaries = [json.loads(line) for line in docker("logs", names[i]).stdout.splitlines() if line.strip()]
        assert len(summaries) == 2 and all(s["lost_leases"] == 0 and s["failed"] == 0 for s in summaries)
    assert SECRET not in migrate.stdout + migrate.stderr + enqueue.stdout + enqueue.stderr
    figures["replicas_median_start_to_ready_seconds"] = round(statistics.median(ready.values()), 2)
