"""The container service end to end: real `dproc` processes, HTTP probes, signals, NOTIFY latency."""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from core import DistributedProcessor
from tests.procs.handlers import SVC_LEDGER_DDL
from tests.support import ROOT, WorkerProcs, run_cli, unfinished, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


@pytest.fixture
def workers() -> Any:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def test_three_workers_drain_10000_enqueued_records_and_stop_cleanly(
    dsn: str, db: Any, workers: WorkerProcs, tmp_path: Path
) -> None:
    db.execute(SVC_LEDGER_DDL)
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        workers.start(
            f"w{i}",
            ["-m", "core", "--log-format", "json", "run", "--handler", "tests.procs.handlers:ledger_tx",
             "--transactional", "--health-port", str(port), "--health-host", "127.0.0.1", "--grace-seconds", "10"],
            # trust auth ignores the password: it is there to prove no response ever shows it
            env={"DATABASE_URL": dsn + " password=sekrit-pw", "DP_INSTANCE_ID": f"svc-{i}"},
        )
    for port in ports:
        wait_until(lambda port=port: _up(port), 30, interval=0.1, message=f"health port {port}")
        assert get(port, "/health/live")[0] == 200
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(10_000)))
    result = run_cli("enqueue", str(lines), env={"DATABASE_URL": dsn})
    assert result.returncode == 0, result.stderr
    wait_until(lambda: unfinished(db) == 0, 120, interval=0.1, message="drained")
    row = db.execute("SELECT count(*), count(DISTINCT record_id) FROM svc_ledger").fetchone()
    assert row == (10_000, 10_000), "every record completed exactly once"
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0] == 10_000
    completed = 0.0
    for port in ports:
        status, body = get(port, "/health")
        report = json.loads(body)
        assert status == 200 and report["status"] in ("healthy", "degraded")
        assert report["database"]["reachable"] is True
        assert get(port, "/health/ready") == (200, '{"ready": true}')
        status, text = get(port, "/metrics")
        assert status == 200 and "dp_claim_seconds_bucket" in text
        completed += metric_sum(text, "dp_records_completed_total")
        assert "sekrit-pw" not in body + text
    assert completed == 10_000
    started = time.monotonic()
    results = workers.terminate_all(timeout=30)
    assert time.monotonic() - started < 15, "each worker exits within its grace period"
    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"{name}: {stderr[-1500:]}"
        assert "sekrit-pw" not in stdout + stderr
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["lost_leases"] == 0
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'processing'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM processor_instances WHERE status = 'running'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM processor_instances WHERE status = 'stopped'").fetchone()[0] == 3


def _up(port: int) -> bool:
    try:
        return get(port, "/health/live")[0] == 200
    except OSError:
        return False


class StartClock:
    """A handler that timestamps each record's start; the test waits on an event instead of sleeping."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.event = threading.Event()

    def __call__(self, record: Any) -> None:
        self.started[record.id] = time.perf_counter()
        self.event.set()


def _run_in_thread(p: DistributedProcessor, handler: Any, **kwargs: Any) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(handler,), kwargs={"stop_event": stop, **kwargs}, daemon=True)
    thread.start()
    wait_until(lambda: p.worker is not None and p.worker.started.is_set(), 10)
    return thread, stop


def test_notify_latency_median_under_50ms(dsn: str) -> None:
    clock = StartClock()
    with DistributedProcessor(dsn) as producer, DistributedProcessor(dsn, instance_id="idle") as worker:
        # A long poll interval: only NOTIFY can explain a fast start.
        thread, stop = _run_in_thread(worker, clock, poll_interval=30)
        assert worker.worker is not None and worker.worker.listener is not None
        wait_until(worker.worker.listener.connected.is_set, 10)
        latencies = []
        try:
            for i in range(100):
                clock.event.clear()
                (rid,) = producer.add_records([{"i": i}])
                returned = time.perf_counter()
                assert clock.event.wait(5), f"record {i} never started"
                latencies.append(clock.started[rid] - returned)
        finally:
            stop.set()
            thread.join(15)
    median = statistics.median(latencies)
    print(f"\ninsert-to-start latency: median {median * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert median < 0.050


def test_poll_fallback_delivers_without_notify(dsn: str) -> None:
    clock = StartClock()
    with DistributedProcessor(dsn, notify=False) as producer, DistributedProcessor(dsn, instance_id="poller") as w:
        thread, stop = _run_in_thread(w, clock, poll_interval=0.3, listen=False)
        try:
            (rid,) = producer.add_records([{"x": 1}])
            assert clock.event.wait(5)
            assert rid in clock.started
        finally:
            stop.set()
            thread.join(15)
    assert w.worker is not None and w.worker.listener is None


def test_listener_survives_pg_terminate_backend(dsn: str, db: Any) -> None:
    clock = StartClock()
    with DistributedProcessor(dsn) as producer, DistributedProcessor(dsn, instance_id="survivor") as w:
        thread, stop = _run_in_thread(w, clock, poll_interval=60)
        try:
            assert w.worker is not None
            listener = w.worker.listener
            wait_until(listener.connected.is_set, 10)
            old_pid = listener.backend_pid
            assert db.execute("SELECT pg_terminate_backend(%s)", (old_pid,)).fetchone() == (True,)
            wait_until(lambda: listener.reconnects >= 1 and listener.connected.is_set()
                       and listener.backend_pid not in (None, old_pid), 15, message="listener reconnected")
            clock.event.clear()
            (rid,) = producer.add_records([{"after": "terminate"}])
            returned = time.perf_counter()
            assert clock.event.wait(5), "record added after the kill never started"
            assert clock.started[rid] - returned < 1.0  # promptly: the poll interval is 60 s
        finally:
            stop.set()
            thread.join(15)


def test_demo_runs_on_the_embedded_database_and_prints_its_proof(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core", "demo", "--count", "300", "--work-ms", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "DATABASE_URL": "", "DP_EMBEDDED_DIR": str(tmp_path / "pg")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded PostgreSQL" in result.stderr
    assert "proof: 300 completed executions for 300 distinct records" in result.stdout
    assert "no record was processed twice" in result.stdout
    per_instance = re.findall(r"demo-worker-\d\s+(\d+) records", result.stdout)
    assert len(per_instance) == 3 and sum(map(int, per_instance)) == 300
