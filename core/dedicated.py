"""A dedicated connection for one thread: a worker's service loop runs its heartbeats, maintenance and registry
statements on it, and LISTENs on it between them, so a plain ``run()`` needs one connection for all of that.

Not pooled and not thread-safe: one thread uses it at a time (the worker's service thread; the main thread
before it starts and after it ends). A broken connection is dropped and the next use connects again; a
new connection LISTENs again and reports that notifications may have been missed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from core.config import Settings
from core.db import Conn, Database, TransactionPooled, configure_connection
from core.errors import DatabaseUnavailable

log = logging.getLogger("core.dedicated")


class DedicatedDatabase(Database):
    """One database through one connection of its own (see the module docstring)."""

    def __init__(self, settings: Settings, dsn: str | None = None, *, channels: list[str] | None = None,
                 name: str = "service") -> None:
        super().__init__(settings, dsn, name=name)
        self.channels = list(channels or [])  # LISTEN on these (none: no notifications)
        self._conn: Conn | None = None
        self.connected = threading.Event()  # test signal: connected (and listening, when it listens)
        self.reconnects = 0  # connections opened after the first
        self._opened = 0
        self.fresh = False  # a new connection since the last wait(): notifications may have been missed

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    def _connect(self) -> Conn:
        kwargs = self.connection_kwargs()
        kwargs["application_name"] = (self.settings.application_name + f"-{self.name}")[:63]
        connect = self._connection_class().connect
        conn: Conn = connect(self.dsn, **kwargs)
        configure_connection(conn)
        if not isinstance(conn, TransactionPooled):
            self.set_plan_mode(conn, generic=True)
        for channel in self.channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return conn

    def ensure(self) -> Conn:
        if self._closed:
            raise DatabaseUnavailable("processor is closed")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self.drop()
            try:
                conn = self._conn = self._connect()
            except psycopg.OperationalError as exc:
                raise self.unavailable(exc) from None
            self._opened += 1
            if self._opened > 1:
                self.reconnects += 1
                log.info("service connection open again", extra={"reconnects": self.reconnects})
            self.fresh = True
            self.connected.set()
        return conn

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.connected.clear()
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    @contextmanager
    def connection(self, timeout: float | None = None, *, internal: bool = False) -> Iterator[Conn]:
        conn = self.ensure()
        if isinstance(conn, TransactionPooled):
            conn.internal = True
        try:
            yield conn
        except (pg_errors.UndefinedTable, psycopg.OperationalError) as exc:
            typed = self.typed_error(exc)
            if typed is None:
                raise
            if isinstance(typed, DatabaseUnavailable):
                self.drop()  # a broken connection: the next use connects again
            raise typed from None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notification; True when one came (or the connection is new,
        so that some may have been missed). Raises ``DatabaseUnavailable`` when the connection breaks."""
        with self.connection() as conn:
            fresh, self.fresh = self.fresh, False
            if fresh:
                return True
            # The first one ends the wait: the claimers look at once (later ones wait, buffered, for the next).
            for _ in conn.notifies(timeout=max(0.0, timeout), stop_after=1):
                return True
            return False

    def close(self) -> None:
        self._closed = True
        self.drop()

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected.is_set(), "reconnects": self.reconnects}
