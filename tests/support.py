"""Test support: find a PostgreSQL server, clone per-test databases, wait on conditions."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

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


def _can_connect(dsn: str) -> str | None:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"
    except psycopg.Error:
        return None


@dataclass
class Server:
    """A PostgreSQL server the tests may create databases on."""

    admin_dsn: str  # connects to a maintenance database
    source: str  # how it was found
    version: str
    embedded_dir: str | None = None  # the data folder, when the suite started an embedded server

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def stop(self) -> None:
        """Stop the server if the suite started it (an embedded one)."""
        if self.embedded_dir is not None:
            from core import embedded

            embedded.stop(self.embedded_dir)

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10)

    def create_database(self, name: str, template: str | None = None) -> str:
        with self.admin() as conn:
            if template:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            else:
                stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            conn.execute(stmt)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def candidate_dsns() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if os.environ.get("DATABASE_URL"):
        out.append((os.environ["DATABASE_URL"], "DATABASE_URL"))
    if os.environ.get("POSTGRES_TEST_HOST"):
        params = {
            "host": os.environ["POSTGRES_TEST_HOST"],
            "port": os.environ.get("POSTGRES_TEST_PORT", "5432"),
            "dbname": os.environ.get("POSTGRES_TEST_DB", "postgres"),
            "user": os.environ.get("POSTGRES_TEST_USER", "postgres"),
        }
        if os.environ.get("POSTGRES_TEST_PASSWORD"):
            params["password"] = os.environ["POSTGRES_TEST_PASSWORD"]
        out.append((make_conninfo(**params), "POSTGRES_TEST_*"))
    if os.environ.get("DP_TEST_EMBEDDED") != "1":
        for user in ("postgres", "root"):
            out.append((f"host=127.0.0.1 port=5432 dbname=postgres user={user}", "local server 127.0.0.1:5432"))
    return out


def find_server() -> Server:
    """DATABASE_URL, then POSTGRES_TEST_*, then a local server on 127.0.0.1:5432, else the embedded server
    (``DP_TEST_EMBEDDED=1`` skips straight to it)."""
    for dsn, source in candidate_dsns():
        version = _can_connect(dsn)
        if version:
            return Server(dsn, source, version)
    from core import embedded

    data_dir = embedded_test_dir()
    dsn = embedded.start(data_dir)
    version = _can_connect(dsn)
    if not version:
        raise RuntimeError("embedded PostgreSQL started but does not accept connections")
    return Server(dsn, f"embedded PostgreSQL ({data_dir})", version, embedded_dir=str(data_dir))


def embedded_test_dir() -> Path:
    """The test fallback's data folder, one per PostgreSQL major (a folder never meets another major)."""
    from core import embedded

    default = ROOT / ".dproc" / f"test-pgdata-{embedded.embedded_major()}"
    return Path(os.environ.get("DP_TEST_EMBEDDED_DIR") or default)


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


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
