"""Test support: find a PostgreSQL server, clone per-test databases, wait on conditions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from core.floors import position
from core.record import Record
from core.testing import postgres
from core.testing.postgres import Server, can_connect, candidate_dsns, unique_name

__all__ = ["Server", "can_connect", "candidate_dsns", "embedded_test_dir", "find_server", "unique_name"]

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")
        time.sleep(interval)


def find_server() -> Server:
    """DATABASE_URL, then POSTGRES_TEST_*, then a local server on 127.0.0.1:5432, else the embedded server
    (``DP_TEST_EMBEDDED=1`` skips straight to it): core.testing.postgres, the plugin's machinery."""
    return postgres.find_server(embedded_test_dir())


def embedded_test_dir() -> Path:
    """The test fallback's data folder, one per PostgreSQL major (a folder never meets another major)."""
    return postgres.embedded_test_dir(ROOT)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m core ...`` as a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "core", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, input=input,
    )


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn).get("dbname"))


class WorkerProcs:
    """Start worker OS processes, stop them with real signals, and check how they exited."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> subprocess.Popen[str]:
        """Start ``python argv`` (after ``prefix``, a command that execs the rest, such as ``unshare``)."""
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, *argv], cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs[name] = proc
        return proc

    def terminate_all(self, timeout: float = 30) -> dict[str, tuple[int, str, str]]:
        """SIGTERM every process and wait; returns {name: (returncode, stdout, stderr)}."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        out = {}
        for name, proc in self.procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Stuck: ask for its threads' stacks (faulthandler on SIGUSR1) before killing it, so the
                # failure says where it hung.
                proc.send_signal(signal.SIGUSR1)
                try:
                    stdout, stderr = proc.communicate(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                stderr = f"{stderr}\n[did not exit {timeout:g}s after SIGTERM; killed]"
                if proc.poll() is None:
                    proc.kill()
            out[name] = (proc.returncode, stdout, stderr)
        return out

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def unfinished(conn: Any) -> int:
    row = conn.execute("SELECT count(*) FROM processing_queue WHERE status IN ('pending', 'processing')").fetchone()
    return int(row[0])


def health_report(port: int) -> dict[str, Any]:
    """``GET /health`` of a worker's HTTP port (a 503 carries the report too); {} while it does not answer."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError:
        return {}
    report: dict[str, Any] = json.loads(body)
    return report


def raise_floor(p: Any, queue: str = "default") -> None:
    """Put the processor's floor above every due record, as a claimer whose scans passed them would have it."""
    now = datetime.now(timezone.utc)  # the claim's clock: the floor reads events from a little before it
    later = now + timedelta(days=1)
    far = Record(2**62, queue, {}, -(2**31) + 1, 1, 1, uuid.uuid4(), now, later, later, later)
    ticket = p.floors.ticket([queue])
    ticket.seen = {queue: position(far)}  # as a claim that peeked and saw nothing pending before it
    p.floors.advance(ticket, [far])
    assert p.floors.floor(queue) > (0, datetime.now(timezone.utc), 0)


def wait_running(db: Any, n: int, timeout: float = 60.0) -> None:
    """Until at least ``n`` instances are registered as running: each is inside ``run()`` with its signal
    handling in place (a run registers after installing it)."""
    wait_until(lambda: db.execute("SELECT count(*) FROM processor_instances WHERE status = 'running'")
               .fetchone()[0] >= n, timeout, interval=0.1, message=f"{n} workers running")
