"""The public entry point: :class:`DistributedProcessor`, the API of :mod:`core.api` over PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

from psycopg_pool import ConnectionPool

from core.api import ProcessorAPI
from core.checks import check_records, keys, positive_int, seconds
from core.config import Settings, default
from core.db import ROUTE, Conn
from core.dsn import redact, resolve_dsn
from core.errors import ConfigurationError, InvalidArgument
from core.instance import ProcessFacts
from core.queries import Queries
from core.record import AddResult, Record
from core.retry import RetryPolicy
from core.sharded import ShardedStore
from core.store import PostgresStore

__all__ = ["AddResult", "DistributedProcessor"]


class DistributedProcessor(ProcessorAPI):
    """Claim, process and complete records of a shared PostgreSQL table from any number of processes.

    Thread-safe: one instance may be shared by many threads. The constructor never connects; the first
    operation opens the pool, and an unreachable database raises :class:`core.errors.DatabaseUnavailable`
    after ``connect_timeout`` seconds. Every parameter is described in the README's configuration table
    (defaults: :data:`core.config.KNOBS`).
    """

    store: PostgresStore | ShardedStore

    def __init__(
        self,
        dsn: str | None = None,
        *,
        instance_id: str | None = None,
        queue: str = default("queue"),
        batch_size: int = default("batch_size"),
        lease_seconds: float = default("lease_seconds"),
        max_attempts: int = default("max_attempts"),
        retry: RetryPolicy | None = None,
        schema: str = default("schema"),
        pool_min: int = default("pool_min"),
        pool_max: int = default("pool_max"),
        connect_timeout: float = default("connect_timeout"),
        statement_timeout: float | None = default("statement_timeout"),
        key_concurrency: int = default("key_concurrency"),
        block_on_failure: bool = default("block_on_failure"),
        copy_threshold: int = default("copy_threshold"),
        cleanup_batch: int = default("cleanup_batch"),
        dead_after: float | None = None,
        heartbeat_interval: float | None = None,
        cleanup_interval: float | None = None,
        notify: bool = default("notify"),
        application_name: str = default("application_name"),
        instance_retention: float = default("instance_retention"),
        pooling: str = default("pooling"),
        horizon_warning_seconds: float | None = default("horizon_warning_seconds"),
        retention: float | timedelta | None = default("retention"),  # noqa: B008 (a float: core.config)
        max_payload_bytes: int = default("max_payload_bytes"),
        shards: Sequence[str] | None = None,
    ) -> None:
        if shards is not None:
            if dsn is not None:
                raise ConfigurationError("give dsn or shards, not both")
            if isinstance(shards, str) or not shards or not all(isinstance(s, str) and s for s in shards):
                raise ConfigurationError("shards must be a non-empty list of DSNs")
        first = shards[0] if shards else dsn
        settings = Settings.build(
            first, instance_id=instance_id, queue=queue, batch_size=batch_size, lease_seconds=lease_seconds,
            max_attempts=max_attempts, retry=retry, schema=schema, pool_min=pool_min, pool_max=pool_max,
            connect_timeout=connect_timeout, statement_timeout=statement_timeout, key_concurrency=key_concurrency,
            block_on_failure=block_on_failure, copy_threshold=copy_threshold, cleanup_batch=cleanup_batch,
            dead_after=dead_after, heartbeat_interval=heartbeat_interval, cleanup_interval=cleanup_interval,
            notify=notify, application_name=application_name, instance_retention=instance_retention,
            pooling=pooling, horizon_warning_seconds=horizon_warning_seconds, retention=retention,
            max_payload_bytes=max_payload_bytes,
        )
        facts = ProcessFacts()
        self.shards = [resolve_dsn(s) for s in shards] if shards else None
        if self.shards:
            self._setup(settings, ShardedStore(settings, facts, self.shards), facts)
        else:
            # Every statement borrows through self.connection, so a subclass overriding it sees all of them.
            self._setup(settings, PostgresStore(settings, facts, borrow=self.connection), facts)

    # ------------------------------------------------------------------ the database

    @property
    def dsn(self) -> str:
        return self.settings.dsn

    @property
    def q(self) -> Queries:
        """The named statements bound to this processor's schema."""
        return self.store.db.q

    @property
    def _pool(self) -> ConnectionPool[Conn] | None:
        return self.store.db.pool

    @contextmanager
    def connection(self, timeout: float | None = None, *, internal: bool = False,
                   shard: int | None = None) -> Iterator[Conn]:
        """Borrow a pooled connection (autocommit). Connection failures become ``DatabaseUnavailable``.

        ``internal`` is for the processor's own statements: they run with generic plans; a connection handed
        to other code runs with the server's default plan cache mode. ``shard``: which shard's database
        (a sharded processor requires it; ``record.shard`` names a record's).
        """
        # A run's roles route their borrows here to their own pools (core.db.routed): one seam for every
        # statement, whichever connection it runs on.
        seconds("timeout", timeout, allow_zero=False, allow_none=True)
        if shard is not None:
            positive_int("shard", shard, allow_zero=True, maximum=64)
        db = ROUTE.get()
        if db is None:
            if isinstance(self.store, ShardedStore):
                if shard is None:
                    raise InvalidArgument("a sharded processor has several databases: connection(shard=n)")
                db = self.store.topology.store_of(shard).db
            else:
                db = self.store.db
        with db.connection(timeout, internal=internal) as conn:
            yield conn

    def complete_on(self, conn: Conn, records: Sequence[Record], unblock: Iterable[str] = ()) -> int:
        """Fenced completion of ``records`` on ``conn`` (inside the caller's transaction, if any)."""
        records = check_records(records)
        unblock = keys("unblock", unblock)
        if isinstance(self.store, ShardedStore):
            shards = {r.shard for r in records}
            if len(shards) > 1:
                raise InvalidArgument("complete_on: records of one shard only (the connection's)")
            store = self.store.topology.store_of(shards.pop()) if shards else self.store.stores[0]
            return store.claims.complete_in(conn, records, unblock)
        return self.store.claims.complete_in(conn, records, unblock)

    def migrate(self) -> None:
        """Bring the database schema to the latest migration (idempotent, safe from many instances)."""
        from core.migrate import upgrade

        if isinstance(self.store, ShardedStore):
            for dsn in self.shards or []:
                upgrade(dsn, self.schema, connect_timeout=self.connect_timeout)
            self.store.topology.set_up()  # number new shards, give them the partition map
            return
        upgrade(self.dsn, self.schema, connect_timeout=self.connect_timeout)

    def __repr__(self) -> str:
        return (
            f"DistributedProcessor(dsn={redact(self.dsn)!r}, instance_id={self.instance_id!r}, "
            f"queue={self.queue!r}, schema={self.schema!r})"
        )
