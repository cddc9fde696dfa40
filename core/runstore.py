"""The connections of one ``run()`` against one database, behind :class:`core.backend.WorkerStore`.

A run holds no more than it needs, and no role waits for another's connection:

* ``claimers`` pooled connections for the claim statements (the completer's and the shutdown's outcome
  writes share them: short statements of the same kind);
* one dedicated connection for the service loop: heartbeats, maintenance, the registry and LISTEN, so a
  heartbeat never waits behind handler work;
* ``handler_slots`` pooled connections for transactional handlers, one per handler thread, never shared with
  claims or heartbeats.

A plain run therefore holds ``claimers + 1`` connections (3 by default), a transactional one
``claimers + 1 + concurrency``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from psycopg import sql

from core.admin import Admin
from core.backend import Listener
from core.claims import KEY_NOTIFY_SECONDS, Claims
from core.config import Settings
from core.db import Borrow, Conn, Database, routed
from core.dedicated import DedicatedDatabase
from core.errors import ConfigurationError, SchemaNotMigrated
from core.floors import Floors
from core.flows.store import CountedStep, DefectSweep, PostgresFlows
from core.instance import ProcessFacts
from core.plans import Stmt, on, run
from core.queries import channel_for
from core.record import Record
from core.recovery import Recovery
from core.retry import RetryPolicy
from core.revisions import needed_over
from core.schedules import Schedules

log = logging.getLogger("core.runstore")

RETENTION_BATCH = 5000
RETENTION_BATCHES = 4


def connections_needed(claimers: int, handler_slots: int) -> int:
    return claimers + 1 + handler_slots


class PostgresRun:
    """A worker's store for one run (see the module docstring)."""

    def __init__(self, settings: Settings, facts: ProcessFacts, dsn: str, *, claimers: int, handler_slots: int,
                 listen_to: Sequence[str] = (), via: Borrow | None = None, shard: int = 0) -> None:
        self.settings = settings
        self.claims_db = Database(settings, dsn, size=(claimers, claimers), name="claims")
        self.handler_db = (Database(settings, dsn, size=(handler_slots, handler_slots), name="handlers")
                           if handler_slots else None)
        channels = [channel_for(settings.schema, q) for q in listen_to]
        self.service_db = DedicatedDatabase(settings, dsn, channels=channels)
        for db in (self.claims_db, self.handler_db, self.service_db):
            if db is not None:
                db.shard = shard
                if via is not None:  # every statement passes through the processor's connection() (core.db.routed)
                    db.borrow = routed(db, via)
        self.claims = Claims(self.claims_db, key_window=KEY_NOTIFY_SECONDS)
        service_claims = Claims(self.service_db)
        self.service_claims = service_claims
        self.recovery = Recovery(self.service_db, service_claims)
        self.admin = Admin(self.service_db, service_claims, facts)
        self.schedules = Schedules(self.service_db)
        self.flows = PostgresFlows(self.service_db)
        self.flow_sweep = CountedStep(DefectSweep(self.flows), "flow_repairs")
        self.claimers, self.handler_slots = claimers, handler_slots
        self.needed = connections_needed(claimers, handler_slots)
        self.listener: Listener | None = self.service_db if channels else None

    def check_budget(self) -> None:
        """Refuse a run that can never work: a schema older than this code's (``SchemaNotMigrated``), or more
        connections than the server's max_connections allows (``ConfigurationError``)."""
        self.check_schema()
        if self.settings.pooling == "transaction":
            return  # the pooler multiplexes; the server's limit says nothing about ours
        row = self.service_db.with_retry(lambda conn: conn.execute(self.service_db.q.connection_budget).fetchone())
        if row is None:
            return
        allowed, in_use = int(row[0]), int(row[1])
        parts = f"{self.claimers} for claims, 1 for heartbeats and maintenance" + (
            f", {self.handler_slots} for transactional handlers" if self.handler_slots else "")
        if self.needed > allowed:
            raise ConfigurationError(
                f"this run needs {self.needed} connections ({parts}) but the server allows {allowed}"
                " (max_connections less superuser_reserved_connections): lower the concurrency or the claimers,"
                " or put PgBouncer in front (pooling='transaction')")
        if self.needed > allowed - in_use + 1:  # +1: the service connection checking is already one of them
            log.warning("the server may not have the connections this run needs",
                        extra={"needed": self.needed, "allowed": allowed, "in_use": in_use})

    def check_schema(self) -> None:
        """``SchemaNotMigrated`` when the database is at an older migration of this code's: its statements would
        fail at the first record they touch (a flow step's completion, say), long after the start."""
        db = self.service_db
        table = sql.Identifier(self.settings.schema, "alembic_version").as_string()

        def read(conn: Conn) -> str | None:
            row = conn.execute(db.q.has_table, {"table": table}).fetchone()
            if not row or not row[0]:
                return None  # never migrated: the first statement says so (SchemaNotMigrated)
            version = conn.execute(db.q.alembic_revision).fetchone()
            return str(version[0]) if version else None

        revision = db.with_retry(read)
        head = needed_over(revision)
        if head is not None:
            raise SchemaNotMigrated(
                f"schema {self.settings.schema!r} is at migration {revision}, this version needs {head}:"
                " run `dproc migrate` (or DistributedProcessor.migrate()) first")

    # ------------------------------------------------------------------ the claim connections

    def claim(self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
              floors: Floors | None = None, announce: bool = False) -> tuple[list[Record], int]:
        return self.claims.claim(done, size, queues, unblock, floors, announce)

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        self.claims.unblock(keys, announce=announce)

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int:
        return self.claims.complete(records, unblock, announce)

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        return self.claims.fail(records, error, retryable, policy)

    def release(self, records: Sequence[Record], reason: str) -> int:
        return self.claims.release(records, reason)

    def any_due(self, queues: list[str]) -> bool:
        return self.claims.any_due(queues)

    def notify_owed(self, *, force: bool = False) -> None:
        self.claims.notify_owed(force=force)

    # ------------------------------------------------------------------ the service connection

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        return self.service_claims.heartbeat(records, registered=registered)

    def maintenance(self) -> Iterator[Callable[[], int]]:
        # Recovery, then a few bounded batches of retention (each its own statement, SKIP LOCKED, by the
        # finished index: a backlog of expired rows goes over several rounds without one long transaction).
        yield from self.recovery.steps()
        yield self.prune_key_buckets
        yield self.end_expired_pauses
        yield self.flow_sweep  # flow records waiting although their parents finished: a defect, repaired
        if self.settings.retention is not None:
            yield from self.admin.purge_steps(self.settings.retention, RETENTION_BATCH, RETENTION_BATCHES)
            retention = self.settings.retention
            yield lambda: self.flows.purge_runs(retention, RETENTION_BATCH)

    def fire_due(self) -> int:
        """Fire the due ticks of the schedules (once each across instances: core/schedules.py)."""
        return run(self.schedules.fire_due())

    def seconds_to_next_schedule(self) -> float | None:
        return run(self.schedules.seconds_to_next())

    def register(self, metadata: dict[str, Any] | None) -> None:
        self.admin.register(metadata)

    def set_instance_status(self, status: str) -> None:
        self.admin.set_instance_status(status)

    def prune_key_buckets(self) -> int:
        """Token buckets of keys idle long enough to be full again go (a key that starts again gets one)."""
        return int(run(on(self.service_db, Stmt(self.service_db.q.prune_key_buckets, None, "rowcount"))))

    def end_expired_pauses(self) -> int:
        """Pauses whose until has passed are written as resumed (their queues were claimable already)."""
        return int(run(on(self.service_db, Stmt(self.service_db.q.end_expired_pauses, None, "rowcount"))))

    def wait(self, timeout: float) -> bool:
        return self.service_db.wait(timeout)

    def interrupt(self) -> None:
        # A notification of our own ends the service loop's wait (best effort: it ends on its own anyway).
        if not self.service_db.channels or not self.service_db.connected.is_set():
            return
        try:
            with self.claims_db.borrow(timeout=1.0, internal=True) as conn:
                conn.execute(self.claims_db.q.notify, {"channel": self.service_db.channels[0], "queue": ""})
        except Exception:
            log.debug("could not interrupt the service wait", exc_info=True)

    # ------------------------------------------------------------------ the handlers' connections

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        db = self.handler_db or self.claims_db
        with db.borrow() as conn, conn.transaction():
            yield conn

    def complete_in(self, conn: Any, records: Sequence[Record]) -> int:
        # Our completion statement with its generic plan; the handler's own statements ran with the
        # session's defaults (LOCAL: back to them at commit).
        # Pipelined: the setting and the completion cost one round trip, not two (it shows over a slow link).
        with conn.pipeline():
            self.claims_db.set_plan_mode(conn, generic=True, local=True)
            return self.claims.complete_in(conn, records)

    def close(self) -> None:
        self.service_db.close()
        self.claims_db.close()
        if self.handler_db is not None:
            self.handler_db.close()
