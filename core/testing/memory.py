"""The in-memory processor: :class:`core.api.ProcessorAPI` (every public method, its argument checks and
docstring, shared with :class:`core.DistributedProcessor`) over a store in memory, for tests.

Same behaviour, no database: FIFO by priority, run_at and id; per-key order and limits; dedupe keys; queue
limits; fenced leases; retries through the retry policy; recovery, cancel, retry_failed, purge; the same
status and health shapes. ``run()`` is the real worker loop (threads: claimers, handlers, completer,
service), over the in-memory store. Time is a :class:`~core.testing.FakeClock` when one is given, else real.

Where it differs from the real one (each checked against it on PostgreSQL):

* no connection: ``connection()``, ``complete_on()``, ``add_records(conn=...)``, ``start_flow(conn=...)``,
  ``run(transactional=True)`` and ``run(flow)`` over a flow with a transactional step raise
  :class:`~core.testing.NoDatabase`; no ``dsn``, ``q``, ``shards``; ``migrate()`` does nothing;
* what the real statements keep for speed is not kept (claim floors, the ``key_blocked`` hint, NOTIFY): a
  record is claimable the moment the claim rules allow it, where the real one may wait for an unblock, the
  maintenance sweep or a floor reset (e.g. a key freed by ``set_key_concurrency`` on a glob pattern);
* ``retry_failed`` and ``purge`` keep to ``batch`` records a step; the real statements can pass it on a small
  table (their planner may rescan the locking subquery);
* ``error_pattern`` is a Python regular expression here, a PostgreSQL one there;
* a fake clock stands still between calls (claims of one instant share ``claimed_at``); the worker loop's
  pacing (poll, heartbeat and cleanup intervals, grace, ``handler_timeout``) and the health report's
  ``checked_at`` are real time;
* health: always reachable until closed, no latency, no pool, nothing holding a horizon back;
* bad values the real one passes to the driver or the server (a NUL in a text value, an integer past its
  column, an unknown registry status) raise the same psycopg errors on the common paths only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from core.api import ProcessorAPI
from core.config import Settings, default
from core.errors import ConfigurationError
from core.instance import ProcessFacts
from core.plans import Plan
from core.record import Record
from core.retry import RetryPolicy
from core.testing.clock import FakeClock
from core.testing.errors import NoDatabase
from core.testing.store import MemoryStore
from core.testing.tables import MemoryTables

__all__ = ["InMemoryProcessor"]


class InMemoryProcessor(ProcessorAPI):
    """A processor whose records live in memory: the API and behaviour of :class:`core.DistributedProcessor`
    without a database, for tests. Thread-safe.

    Takes the real one's parameters except those that name a database (``dsn``, ``shards``, ``schema``, the
    pool, the connection and statement timeouts, ``pooling``, ``application_name``, ``copy_threshold``,
    ``horizon_warning_seconds``), and:

    * ``clock``: a :class:`~core.testing.FakeClock` (``clock.advance(seconds)`` makes retries and scheduled
      records due and leases expire); default real time;
    * ``tables``: the :class:`~core.testing.MemoryTables` of another processor (``other.tables``), for
      several instances sharing one queue; their clock is the tables'.
    """

    store: MemoryStore

    def __init__(
        self,
        *,
        instance_id: str | None = None,
        queue: str = default("queue"),
        batch_size: int = default("batch_size"),
        lease_seconds: float = default("lease_seconds"),
        max_attempts: int = default("max_attempts"),
        retry: RetryPolicy | None = None,
        key_concurrency: int = default("key_concurrency"),
        block_on_failure: bool = default("block_on_failure"),
        cleanup_batch: int = default("cleanup_batch"),
        dead_after: float | None = None,
        heartbeat_interval: float | None = None,
        cleanup_interval: float | None = None,
        notify: bool = default("notify"),
        instance_retention: float = default("instance_retention"),
        retention: float | timedelta | None = default("retention"),  # noqa: B008 (a float: core.config)
        max_payload_bytes: int = default("max_payload_bytes"),
        clock: FakeClock | None = None,
        tables: MemoryTables | None = None,
    ) -> None:
        settings = Settings.build(
            None, database=False, instance_id=instance_id, queue=queue, batch_size=batch_size,
            lease_seconds=lease_seconds, max_attempts=max_attempts, retry=retry, key_concurrency=key_concurrency,
            block_on_failure=block_on_failure, cleanup_batch=cleanup_batch, dead_after=dead_after,
            heartbeat_interval=heartbeat_interval, cleanup_interval=cleanup_interval, notify=notify,
            instance_retention=instance_retention, retention=retention, max_payload_bytes=max_payload_bytes,
        )
        if tables is None:
            tables = MemoryTables(clock)
        elif not isinstance(tables, MemoryTables):
            raise ConfigurationError(f"tables must be MemoryTables (another processor's .tables), got {tables!r}")
        elif clock is not None and clock is not tables.clock:
            raise ConfigurationError("clock differs from the clock of the tables given: pass one of them")
        facts = ProcessFacts()
        self._setup(settings, MemoryStore(tables, settings, facts), facts)

    # ------------------------------------------------------------------ memory and time

    @property
    def tables(self) -> MemoryTables:
        """The records, limits and registry (pass them to another processor to share the queue)."""
        return self.store.tables

    @property
    def clock(self) -> FakeClock | None:
        """The fake clock time comes from, or None for real time."""
        clock = self.store.tables.clock
        return clock if isinstance(clock, FakeClock) else None

    def _now(self) -> datetime:
        return self.store.tables.now()

    def next_due(self, queues: Sequence[str] | None = None) -> datetime | None:
        """When the earliest pending record that is not yet due comes due (of ``queues``, default every
        queue); None when none waits for its run_at. With a fake clock: how far to ``advance``."""
        return self.store.next_due(None if queues is None else self._queues(queues))

    # ------------------------------------------------------------------ what needs a database

    def migrate(self) -> None:
        """Nothing to migrate: a no-op."""

    def connection(self, timeout: float | None = None, *, internal: bool = False) -> AbstractContextManager[Any]:
        """No database connection here: raises :class:`~core.testing.NoDatabase` (when called)."""
        raise NoDatabase("an in-memory processor has no database connection")

    def complete_on(self, conn: Any, records: Sequence[Record], unblock: Iterable[str] = ()) -> int:
        """A completion inside a database transaction: raises :class:`~core.testing.NoDatabase`."""
        raise NoDatabase("an in-memory processor has no database transaction to complete records in")

    def _application_connection(self, conn: Any) -> Plan[Any]:
        """``add_records(conn=...)``: no database transaction to add records in; raises
        :class:`~core.testing.NoDatabase`."""
        raise NoDatabase("an in-memory processor has no database transaction to add records in (conn=...)")

    def __repr__(self) -> str:
        return f"InMemoryProcessor(instance_id={self.instance_id!r}, queue={self.queue!r}, clock={self.clock!r})"
