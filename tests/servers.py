"""Servers a test starts itself: PostgreSQL clusters with the machine's binaries and PgBouncer poolers.

Each runs on a free port with its data in a folder under ``SUITE_TMP`` (owned by the ``postgres`` user when
the suite runs as root: initdb refuses root). Whatever a test starts it stops, also when it fails; the
session-end check (``leaked()``, called from conftest) fails the run if a process of ours is still alive.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SUITE_TMP = Path(tempfile.gettempdir()) / f"dp-suite-{os.getpid()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(user: str = "postgres") -> list[str]:
    """The prefix that runs a server binary as ``user`` when we are root (servers refuse to run as root)."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", user, "--"]


def _own(path: Path, user: str = "postgres") -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def machine_bindir() -> Path:
    """The newest PostgreSQL server binaries installed on the machine (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise RuntimeError("no PostgreSQL server binaries on this machine (initdb, pg_ctl)")


def suite_dir(prefix: str, user: str = "postgres") -> Path:
    """A fresh folder under SUITE_TMP that ``user`` may write."""
    SUITE_TMP.mkdir(mode=0o755, exist_ok=True)
    os.chmod(SUITE_TMP, 0o755)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SUITE_TMP))
    os.chmod(path, 0o755)
    _own(path, user)
    return path


class Cluster:
    """A PostgreSQL cluster of our own: ``start()``, ``stop()``, ``restart()``, ``crash()``, a superuser DSN."""

    def __init__(self, name: str = "pg", *, bindir: Path | None = None, port: int | None = None,
                 base: Path | None = None, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir or machine_bindir()
        self.home = base or suite_dir(f"{name}-")
        self.data = self.home / "data"
        self.port = port or free_port()
        self.settings = settings or {}
        self.log = self.home / "server.log"

    # ------------------------------------------------------------------ lifecycle

    def init(self, *extra: str) -> Cluster:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  *extra)
        conf = {
            "listen_addresses": "'127.0.0.1'", "port": str(self.port), "unix_socket_directories": f"'{self.home}'",
            "fsync": "off", "full_page_writes": "off", "shared_buffers": "32MB", "max_connections": "100",
            **self.settings,
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
        return self

    def start(self, timeout: float = 60) -> Cluster:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        self._pg_ctl("-w", "-t", str(int(timeout)), "-l", str(self.log), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (whatever postmaster runs now: a restart changes its pid)."""
        if self.pid() is None:
            return
        try:
            self._pg_ctl("-w", "-t", "30", "-m", mode, "stop")
        except subprocess.CalledProcessError:
            self.kill()

    def restart(self) -> None:
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "-l", str(self.log), "restart")

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend: what a host failure looks like to clients."""
        self.kill()

    def kill(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            children = proc.children(recursive=True)
            for p in [proc, *children]:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
            psutil.wait_procs([proc, *children], timeout=10)

    def pid(self) -> int | None:
        """The running postmaster's pid, or None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ access

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=str(self.port), dbname=dbname, user="postgres")

    def execute(self, query: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query.encode())
            return cur.fetchall() if cur.description else []

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    def _run(self, binary: str, *args: str) -> None:
        subprocess.run([*_as_postgres(), str(self.bindir / binary), *args], check=True, capture_output=True,
                       timeout=120, cwd=self.home)


class PgBouncer:
    """A PgBouncer in transaction pooling mode in front of one server (``upstream`` DSN), on a free port."""

    def __init__(self, upstream: str, *, pool_size: int = 20, port: int | None = None) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise RuntimeError("pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
        self.binary = binary
        info = conninfo_to_dict(upstream)
        self.user = str(info.get("user") or "postgres")
        host = str(info.get("host") or "127.0.0.1")
        # A server reached through its socket folder (the embedded one): run as the folder's owner, the one
        # user that may open the socket in it.
        self.os_user = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "postgres"
        self.home = suite_dir("pgbouncer-", self.os_user)
        self.port = port or free_port()
        (self.home / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.home / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={info.get('port') or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.home / 'users.txt'}\n"
            f"pool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = {pool_size}\n"
            f"logfile = {self.home / 'pgbouncer.log'}\n"
        )
        for f in self.home.iterdir():
            _own(f, self.os_user)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> PgBouncer:
        self.proc = subprocess.Popen([*_as_postgres(self.os_user), self.binary, str(self.home / "pgbouncer.ini")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): every client connection breaks, as when a pooler container dies."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for p in _tree(proc.pid):
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            for p in _tree(proc.pid):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def dsn(self, dbname: str) -> str:
        return make_conninfo(host="127.0.0.1", port=str(self.port), dbname=dbname, user=self.user)

    def log_tail(self) -> str:
        try:
            return (self.home / "pgbouncer.log").read_text()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [*proc.children(recursive=True), proc]
    except psutil.Error:
        return []


def leaked(extra_paths: list[str] | None = None) -> list[psutil.Process]:
    """Server or pooler processes of this suite still alive: their command line names a folder of ours."""
    marks = [str(SUITE_TMP), *(extra_paths or [])]
    out = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.pid == os.getpid() or not any(m in cmdline for m in marks):
            continue
        if "postgres" in cmdline or "pgbouncer" in cmdline or "postmaster" in cmdline:
            out.append(proc)
    return out
