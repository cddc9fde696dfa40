"""The worker store of one ``run()`` of an in-memory processor (:class:`core.backend.WorkerStore`).

The real worker loop (:mod:`core.worker`) runs over it unchanged: claimer threads, handler threads, the
completer, heartbeats and maintenance. Its wake-ups stand in for LISTEN: an insert, a keyed completion or
the fake clock moving ends the service loop's wait, and the claimers look again at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from core.backend import Listener
from core.config import Settings
from core.flows.store import CountedStep
from core.instance import ProcessFacts
from core.record import Record
from core.runstore import RETENTION_BATCH, RETENTION_BATCHES
from core.testing.controlstore import MemoryControlOps
from core.testing.errors import NoDatabase
from core.testing.tables import MemoryTables

TRANSACTIONAL = ("transactional handlers are called with a database connection, and an in-memory processor"
                 " has none: test them against a DistributedProcessor (or run the handler without transactional)")


class MemoryListener:
    """What a run listens with (:class:`core.backend.Listener`): always connected, never reconnects."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.reconnects = 0

    @property
    def backend_pid(self) -> int | None:
        return None


class MemoryRun(MemoryControlOps):
    """The records of the processor's tables, for one run: the same state changes, plus the wake-ups."""

    def __init__(self, tables: MemoryTables, settings: Settings, facts: ProcessFacts, *, handler_slots: int,
                 listen: bool) -> None:
        super().__init__(tables, settings, facts)
        self.handler_slots = handler_slots
        self.listener: Listener | None = MemoryListener() if listen else None
        self._seen = tables.generation
        self._interrupted = threading.Event()

    def check_budget(self) -> None:
        """Refuse a transactional run: its handlers need a connection each (the real one refuses a run the
        server can never give its connections, with a ConfigurationError too)."""
        if self.handler_slots:
            raise NoDatabase(TRANSACTIONAL)

    def maintenance(self) -> Iterator[Callable[[], int]]:
        yield from self.recovery_steps()
        yield self.prune_key_buckets
        # flow records waiting although their parents finished: a defect, repaired (and counted)
        yield CountedStep(lambda: self._locked(self.flows.sweep), "flow_repairs")
        retention = self.settings.retention
        if retention is not None:
            yield from self.purge_steps(retention, RETENTION_BATCH, RETENTION_BATCHES)
            yield lambda: self._locked(lambda now: self.flows.purge_runs(retention, RETENTION_BATCH, now))

    def prune_key_buckets(self) -> int:
        """Buckets of keys idle long enough to be full go (as the real maintenance)."""
        t = self.tables
        with t.lock:
            now = t.now()
            longest = max((r.per for r in t.control.key_rates.values()), default=0.0)
            idle = [k for k, b in t.control.key_buckets.items() if (now - b.updated).total_seconds() > longest]
            for key in idle:
                del t.control.key_buckets[key]
        return len(idle)

    def wait(self, timeout: float) -> bool:
        seen = self._seen
        self._seen = self.tables.wait_change(seen, timeout, self._interrupted)
        return self._seen != seen

    def interrupt(self) -> None:
        self._interrupted.set()
        self.tables.interrupt()

    def transaction(self) -> AbstractContextManager[Any]:
        raise NoDatabase(TRANSACTIONAL)

    def complete_in(self, conn: Any, records: Sequence[Record]) -> int:
        raise NoDatabase(TRANSACTIONAL)

    def close(self) -> None:
        self.closed = True
