"""LISTEN on the queues' channels and turn notifications into wake-ups of the claim loop.

NOTIFY is only a hint: the claim loop polls on a jittered interval regardless. The listener owns one
dedicated connection (never pooled); when it dies (``pg_terminate_backend``, server restart, network cut) it
reconnects with backoff and wakes the loop once, since notifications may have been missed meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import psycopg
from psycopg import sql

from core.backend import Wakeable
from core.db import Database

log = logging.getLogger("core.worker.listener")


class PgListener:
    def __init__(self, db: Database, channels: list[str], wake: Wakeable) -> None:
        self.db = db
        self.channels = channels
        self.wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dp-listener-{db.settings.instance_id}", daemon=True)
        self.connected = threading.Event()  # test signal: LISTEN is active
        self.reconnects = 0
        self.notifications = 0
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        # Wake the listener out of its wait for notifications (up to 0.25 s) with one of its own.
        if self.connected.is_set():
            try:
                with self.db.borrow(timeout=1.0, internal=True) as conn:
                    conn.execute(self.db.q.notify, {"channel": self.channels[0], "queue": ""})
            except Exception:  # best effort: the wait ends on its own
                pass
        self._thread.join(timeout)

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        kwargs = self.db.connection_kwargs()
        kwargs["application_name"] = (self.db.settings.application_name + "-listener")[:63]
        conn = psycopg.connect(self.db.dsn, **kwargs)
        for channel in self.channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return conn

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
                self.connected.set()
                delay = 0.1
                # Anything inserted while we were not listening would otherwise wait for the poll.
                self.wake.set()
                self._listen(self._conn)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                self.connected.clear()
                self.reconnects += 1
                log.warning("listener connection lost; reconnecting", extra={"error": str(exc).strip()[:200]})
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()
        self.connected.clear()

    def _listen(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            # A short timeout so that stop() is noticed quickly; the loop itself costs nothing.
            for _ in conn.notifies(timeout=0.25, stop_after=64):
                if self._stop.is_set():  # stop() wakes us with a notification of our own
                    break
                self.notifications += 1
                self.wake.set()
            # An idle socket can hide a dead peer: probe it now and then (keepalives cover half-open links).
            if time.monotonic() - last_check > 10:
                conn.execute(self.db.q.ping)
                last_check = time.monotonic()
