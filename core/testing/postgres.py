"""A real PostgreSQL for tests: find a server, migrate a template database once, clone a fresh one per test.

Where the server comes from (:func:`find_server`), first that answers wins:

1. ``DATABASE_URL``;
2. ``POSTGRES_TEST_HOST`` (with ``POSTGRES_TEST_PORT``, ``_DB``, ``_USER``, ``_PASSWORD``);
3. a local server on 127.0.0.1:5432 (user ``postgres``, then ``root``);
4. the embedded server (``pip install 'distributed-processor[embedded]'``), started in
   :func:`embedded_test_dir` and stopped by :meth:`Server.stop`.

``DP_TEST_EMBEDDED=1`` skips the local server (3). The role needs CREATEDB: every test gets a database of
its own, a copy of the template (``CREATE DATABASE ... TEMPLATE``), which takes milliseconds where running the
migrations would take a second.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from core.queries import raw_statements

__all__ = [
    "Clones",
    "Server",
    "can_connect",
    "candidate_dsns",
    "create_template",
    "embedded_test_dir",
    "find_server",
    "unique_name",
]


def can_connect(dsn: str, timeout: int = 3) -> str | None:
    """The server version behind ``dsn``, or None when it cannot be reached within ``timeout`` seconds."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout, autocommit=True) as conn:
            row = conn.execute(raw_statements()["test_server_version"]).fetchone()
            return str(row[0]) if row else "?"
    except psycopg.Error:
        return None


def _run_returned(conn: psycopg.Connection[Any], statement: str, **params: str) -> None:
    # The named statement returns the DDL with its identifiers quoted (see core/sql/testing.sql).
    row = conn.execute(raw_statements()[statement], params).fetchone()
    assert row is not None
    conn.execute(row[0])


@dataclass
class Server:
    """A PostgreSQL server tests may create databases on."""

    admin_dsn: str  #: connects to a maintenance database (``postgres``)
    source: str  #: how it was found, in words
    version: str  #: ``server_version``, e.g. ``15.8``
    embedded_dir: str | None = None  #: the data folder, when :func:`find_server` started the embedded server

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def stop(self) -> None:
        """Stop the server if :func:`find_server` started it (the embedded one); others are left alone."""
        if self.embedded_dir is not None:
            from core import embedded

            embedded.stop(self.embedded_dir)

    def dsn_for(self, dbname: str) -> str:
        """The admin DSN pointed at database ``dbname``."""
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the maintenance database (the caller closes it)."""
        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (a copy of ``template`` if given) and return its DSN."""
        with self.admin() as conn:
            if template:
                _run_returned(conn, "test_create_database_from", name=name, template=template)
            else:
                _run_returned(conn, "test_create_database", name=name)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending the sessions still connected to it."""
        with self.admin() as conn:
            _run_returned(conn, "test_drop_database", name=name)


def candidate_dsns() -> list[tuple[str, str]]:
    """The (dsn, source) pairs :func:`find_server` tries before the embedded server, in order."""
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


def embedded_test_dir(root: Path | str | None = None) -> Path:
    """The embedded server's data folder for tests: ``DP_TEST_EMBEDDED_DIR``, else
    ``<root>/.dproc/test-pgdata-<major>`` (``root`` defaults to the working directory). One folder per
    PostgreSQL major, so a folder never meets another major; it is reused by later sessions."""
    from core import embedded

    base = Path(root) if root is not None else Path.cwd()
    default = base / ".dproc" / f"test-pgdata-{embedded.embedded_major()}"
    return Path(os.environ.get("DP_TEST_EMBEDDED_DIR") or default)


def find_server(embedded_dir: Path | str | None = None) -> Server:
    """The first reachable of :func:`candidate_dsns`, else the embedded server started in ``embedded_dir``
    (default :func:`embedded_test_dir`). Call :meth:`Server.stop` when done."""
    for dsn, source in candidate_dsns():
        version = can_connect(dsn)
        if version:
            return Server(dsn, source, version)
    from core import embedded

    data_dir = Path(embedded_dir) if embedded_dir is not None else embedded_test_dir()
    dsn = embedded.start(data_dir)
    version = can_connect(dsn)
    if not version:
        raise RuntimeError("embedded PostgreSQL started but does not accept connections")
    return Server(dsn, f"embedded PostgreSQL ({data_dir})", version, embedded_dir=str(data_dir))


def unique_name(prefix: str) -> str:
    """A database name no other test process picks: ``<prefix>_<pid>_<random>``."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def create_template(server: Server, name: str | None = None, *, schema: str = "public") -> str:
    """Create a database, migrate it to the latest revision and return its name, for
    :meth:`Server.create_database` to copy (``template=``). Drop it with :meth:`Server.drop_database`."""
    from core.migrate import upgrade

    name = name or unique_name("dp_tpl")
    dsn = server.create_database(name)
    try:
        upgrade(dsn, schema)
    except BaseException:
        server.drop_database(name)
        raise
    return name


class Clones:
    """Fresh copies of a template made ahead of the tests that take them, and dropped behind them, by threads
    of their own. ``CREATE DATABASE`` spends most of its time waiting for the copy's files to reach the disk
    (0.04-0.5 s each, measured on the CI machines; a test takes one copy, a sharded one three): on these threads
    that wait overlaps the tests' own work and the other copies' waits instead of adding to the run. The copies
    are those :meth:`Server.create_database` makes; only when they are made changes. Copies made ahead grow
    with use, up to ``ahead`` (a session that takes one makes one more). :meth:`close` drops every copy made
    and not dropped yet, given back or not, and raises if one could not be dropped."""

    ATTEMPTS = 3  # a copy that fails (the server briefly out of connections) is tried again before it is reported

    def __init__(self, server: Server, template: str, *, ahead: int = 4, threads: int = 2,
                 prefix: str = "dp_t") -> None:
        self.server = server
        self.template = template
        self.ahead = ahead
        self.prefix = prefix
        self.errors: list[BaseException] = []  # drops that failed: close() raises the first
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._drops: list[str] = []
        self._alive: set[str] = set()  # every copy made and not dropped yet, taken or not: close() drops them
        self._taken = 0
        self._wanted = 1  # copies to make in all: those taken, plus up to `ahead` more
        self._made = 0  # copies made or being made
        self._cv = threading.Condition()
        self._closing = False
        # Not "dp-": that prefix names a processor's threads, which tests count.
        self._threads = [threading.Thread(target=self._work, name=f"test-clones-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def take(self, timeout: float = 120.0) -> str:
        """The name of a fresh copy of the template, for the caller alone; give it back with :meth:`drop`."""
        with self._cv:
            self._taken += 1
            self._wanted = max(self._wanted, self._taken + min(self.ahead, self._taken))
            self._cv.notify_all()
        try:
            got = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no copy of {self.template!r} was made within {timeout:.0f} s") from None
        if isinstance(got, BaseException):
            raise RuntimeError(f"copying {self.template!r} failed: {got}") from got
        return got

    def drop(self, name: str) -> None:
        """Drop copy ``name`` on a thread (its sessions ended, as :meth:`Server.drop_database` does)."""
        with self._cv:
            self._drops.append(name)
            self._cv.notify()

    def close(self, timeout: float = 120.0) -> None:
        """Stop the threads and drop every copy made and not dropped yet (given back, never taken, or taken and
        kept by a taker that failed)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"{', '.join(stuck)} still creating or dropping a copy of {self.template!r} after "
                               f"{timeout:.0f} s: copies may be left on the server")
        with self._cv:
            left = sorted(self._alive)  # copies never given back (a taker that failed), or not dropped yet
        for name in left:
            self._drop(name)
        if self.errors:
            raise RuntimeError(f"dropping a copy of {self.template!r} failed: {self.errors[0]}") from self.errors[0]

    def _ready_names(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                got = self._ready.get_nowait()
            except queue.Empty:
                return out
            if isinstance(got, str):
                out.append(got)

    def _drop(self, name: str) -> None:
        try:
            self.server.drop_database(name)
        except Exception as exc:  # reported by close(), after the other copies are dropped
            self.errors.append(exc)
        else:
            with self._cv:
                self._alive.discard(name)

    def _create(self) -> str | BaseException:
        error: BaseException | None = None
        for attempt in range(self.ATTEMPTS):
            name = unique_name(self.prefix)
            try:
                self.server.create_database(name, template=self.template)
                with self._cv:
                    self._alive.add(name)
                return name
            except Exception as exc:
                error = exc
                self._drop_quietly(name)  # a copy half made (its files written, the command failed late)
                time.sleep(0.5 * (attempt + 1))
        assert error is not None
        return error

    def _drop_quietly(self, name: str) -> None:
        # The server that failed the copy may refuse this too; then there is nothing of it to drop.
        with contextlib.suppress(Exception):
            self.server.drop_database(name)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._drops or self._made < self._wanted):
                    self._cv.wait(1.0)
                drop = self._drops.pop(0) if self._drops else None
                create = drop is None and not self._closing
                if create:
                    self._made += 1
            if drop is not None:  # given back first: a drop frees what the next copy needs
                self._drop(drop)
            elif create:
                self._ready.put(self._create())  # a failure goes to the test that takes this copy
            else:
                for name in self._ready_names():  # made and never taken: the threads drop them, in parallel
                    self._drop(name)
                return
