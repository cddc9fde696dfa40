"""One database: the pool, the session settings of our connections, error mapping, retries.

Every role (enqueue, claims, recovery, admin, health) reaches its database through a :class:`Database`; none
opens a connection of its own. Connection failures become :class:`DatabaseUnavailable` (or
:class:`PoolExhausted`), missing tables :class:`SchemaNotMigrated`.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import Transaction
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from core.config import Settings
from core.dsn import KEEPALIVE_KWARGS, redact
from core.errors import DatabaseUnavailable, PoolExhausted, ProcessorError, SchemaNotMigrated
from core.payloads import loads
from core.queries import Queries

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]


def configure_connection(conn: Conn) -> None:
    set_json_loads(loads, conn)


class TransactionPooled(psycopg.Connection[tuple[Any, ...]]):
    """A connection for a pooler in transaction mode (PgBouncer ``pool_mode = transaction``), where two
    transactions of one client may run on two different server sessions: nothing may live in the session.

    Every statement outside a transaction runs in a transaction of its own that first sets, locally, what a
    session of ours would carry (timeouts, time zone, and for our own statements no JIT and no sequential
    scans); the four messages are pipelined, so it still costs one round trip. An explicit transaction gets
    the same settings after its BEGIN. Connections of this class are opened with ``prepare_threshold=None``:
    no server-side prepared statements.
    """

    settings_query = ""
    settings_params: dict[str, Any] = {}
    internal = False  # set by Database.connection: our own statement, or a handler's

    def _settings(self) -> None:
        super().execute(self.settings_query, {**self.settings_params, "internal": self.internal})

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                binary: bool = False) -> psycopg.Cursor[tuple[Any, ...]]:
        if self.info.transaction_status != TransactionStatus.IDLE or self.info.pipeline_status != PipelineStatus.OFF:
            return super().execute(query, params, prepare=prepare, binary=binary)
        with self.pipeline(), super().transaction():
            self._settings()
            cursor = super().execute(query, params, prepare=prepare, binary=binary)
        return cursor

    @contextmanager
    def transaction(self, savepoint_name: str | None = None, force_rollback: bool = False) -> Iterator[Transaction]:
        outer = self.info.transaction_status == TransactionStatus.IDLE
        with super().transaction(savepoint_name, force_rollback) as tx:
            if outer:
                self._settings()
            yield tx


Borrow = Callable[..., AbstractContextManager[Conn]]

# The database a borrow through a processor's connection() draws from: the processor's own pool unless a role
# of a run (its claims, its service connection, its handlers) routes the borrow to its own (see routed()).
ROUTE: contextvars.ContextVar[Database | None] = contextvars.ContextVar("dp_route", default=None)


def routed(db: Database, via: Borrow) -> Borrow:
    """A borrow for ``db`` that passes through ``via`` (a processor's connection(), which callers may wrap)
    and draws from ``db``."""

    @contextmanager
    def borrow(timeout: float | None = None, *, internal: bool = False) -> Iterator[Conn]:
        token: contextvars.Token[Database | None] | None = ROUTE.set(db)
        try:
            with via(timeout, internal=internal) as conn:
                assert token is not None
                ROUTE.reset(token)  # the route is for this borrow only, not for what the caller does with it
                token = None
                yield conn
        finally:
            if token is not None:
                ROUTE.reset(token)

    return borrow


class Database:
    """The pool of one database and the settings our statements run with. Opens lazily, thread-safe.

    Every statement borrows its connection through ``borrow`` (by default :meth:`connection`): the one seam
    where a caller can watch or wrap all of them (the processor passes its own ``connection`` method, which
    fault-injection tests override).
    """

    def __init__(self, settings: Settings, dsn: str | None = None, borrow: Borrow | None = None, *,
                 size: tuple[int, int] | None = None, name: str = "") -> None:
        self.settings = settings
        self.dsn = dsn or settings.dsn
        self.borrow: Borrow = borrow or self.connection
        # (min, max) connections of the pool; default the settings' pool_min and pool_max
        self.size = size or (settings.pool_min, settings.pool_max)
        self.name = name
        self.shard = 0  # which shard this database is (core/sharded.py); stamped on the records it claims
        self.q = Queries(settings.schema)
        self._pool: ConnectionPool[Conn] | None = None
        self._pool_lock = threading.Lock()
        # Pooled connections currently set to generic plans (see connection()).
        self._generic: weakref.WeakSet[Conn] = weakref.WeakSet()
        self._closed = False
        self.last_connect_error: str | None = None  # why the pool's latest connection attempt failed

    # ------------------------------------------------------------------ connections

    @property
    def transaction_pooling(self) -> bool:
        return self.settings.pooling == "transaction"

    def connection_kwargs(self) -> dict[str, Any]:
        """libpq parameters of every connection of ours (pooled or the listener's)."""
        s = self.settings
        if self.transaction_pooling:
            # No startup options (PgBouncer refuses unknown startup parameters), no prepared statements;
            # the settings go with every transaction instead (TransactionPooled).
            return {
                "autocommit": True,
                "connect_timeout": max(2, math.ceil(s.connect_timeout)),
                "application_name": s.application_name[:63],
                "prepare_threshold": None,
                **KEEPALIVE_KWARGS,
            }
        options = []
        if s.statement_timeout:
            options.append(f"-c statement_timeout={int(s.statement_timeout * 1000)}")
        # Keep idle-in-transaction sessions from holding row locks forever if a client wedges.
        options.append("-c idle_in_transaction_session_timeout=60000")
        # UTC sessions: psycopg then builds datetimes with the fixed timezone.utc, several times cheaper to
        # decode than a ZoneInfo (it shows in the claim's per-row cost).
        options.append("-c TimeZone=UTC")
        return {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(s.connect_timeout)),
            "application_name": s.application_name[:63],
            "options": " ".join(options),
            **KEEPALIVE_KWARGS,
        }

    @property
    def pool(self) -> ConnectionPool[Conn] | None:
        """The pool, or None before the first operation opened it."""
        return self._pool

    def ensure_pool(self) -> ConnectionPool[Conn]:
        if self._closed:
            raise DatabaseUnavailable("processor is closed")
        pool = self._pool
        if pool is not None:
            return pool
        s = self.settings
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn,
                    connection_class=self._connection_class(),
                    min_size=self.size[0],
                    max_size=self.size[1],
                    kwargs=self.connection_kwargs(),
                    open=False,
                    timeout=s.connect_timeout,
                    name=f"dp-{s.instance_id}{'-' + self.name if self.name else ''}",
                    reconnect_timeout=max(60.0, s.connect_timeout),
                    max_idle=300.0,
                    configure=configure_connection,
                )
                self._pool.open(wait=False)
            return self._pool

    def _connection_class(self) -> type[Conn]:
        s, db = self.settings, self
        base: type[Conn] = TransactionPooled if self.transaction_pooling else psycopg.Connection

        class Pooled(base):  # type: ignore[valid-type,misc]
            settings_query = self.q.transaction_settings
            settings_params = {
                "statement_timeout": str(int(s.statement_timeout * 1000)) if s.statement_timeout else "0",
                "idle_timeout": "60000",
            }

            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                # The pool retries in the background and a waiter only sees a timeout: keep why connecting
                # fails (a name that does not resolve, a refused port, a full server) for the error message.
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    db.last_connect_error = " ".join(str(exc).split())
                    raise
                db.last_connect_error = None
                return conn

        return Pooled

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        """The typed error for a connection failure (PoolExhausted when every connection stayed busy)."""
        pool = self._pool
        s = self.settings
        if isinstance(exc, PoolTimeout) and pool is not None:
            stats = pool.get_stats()
            if stats.get("pool_size", 0) >= self.size[1] and stats.get("pool_available", 0) == 0:
                return PoolExhausted(
                    f"all {self.size[1]} pooled connections stayed busy for {s.connect_timeout:g}s "
                    f"(requests waiting: {stats.get('requests_waiting', 0)})"
                )
        cause = f" (last attempt: {self.last_connect_error})" if isinstance(exc, PoolTimeout) and \
            self.last_connect_error else ""
        error = DatabaseUnavailable(f"database {redact(self.dsn)} unavailable: {str(exc).strip()}{cause}")
        # A pool timeout already waited the whole connect timeout: retrying would only multiply the wait.
        error.retryable = not isinstance(exc, PoolTimeout)
        # A deadlock or a serialization failure rolled the transaction back: the caller may run it again.
        error.rolled_back = isinstance(exc, (pg_errors.DeadlockDetected, pg_errors.SerializationFailure))
        return error

    @contextmanager
    def connection(self, timeout: float | None = None, *, internal: bool = False) -> Iterator[Conn]:
        """Borrow a pooled connection (autocommit). Connection failures become ``DatabaseUnavailable``.

        ``internal`` is for the processor's own statements: they run with generic plans (see below); a
        connection handed to other code runs with the server's default plan cache mode.
        """
        pool = self.ensure_pool()
        try:
            with pool.connection(timeout=timeout or self.settings.connect_timeout) as conn:
                if isinstance(conn, TransactionPooled):
                    conn.internal = internal
                elif internal != (conn in self._generic):
                    self.set_plan_mode(conn, generic=internal)
                yield conn
        except PoolTimeout as exc:
            raise self.unavailable(exc) from None
        except (pg_errors.UndefinedTable, psycopg.OperationalError) as exc:
            typed = self.typed_error(exc)
            if typed is None:
                raise
            raise typed from None

    def typed_error(self, exc: Exception) -> ProcessorError | None:
        """The typed error of a statement's failure (``SchemaNotMigrated``, ``DatabaseUnavailable``), or None
        for one that goes to the caller as it is (a cancelled statement)."""
        if isinstance(exc, pg_errors.UndefinedTable):
            return SchemaNotMigrated(
                f"tables missing in schema {self.settings.schema!r} ({exc.diag.message_primary}); "
                "run `dproc migrate`")
        if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, pg_errors.QueryCanceled):
            return self.unavailable(exc)
        return None

    def set_plan_mode(self, conn: Conn, *, generic: bool, local: bool = False) -> None:
        # Every statement of ours is written so that its generic plan walks the same indexes as a custom one
        # (tests/integration/test_explain.py holds them to it). PostgreSQL would otherwise plan the claim
        # afresh on every call, because its custom plans look cheaper: about 1 ms of planning per batch,
        # more than the statement's whole execution at batch 100. JIT goes off with it: a generic plan's
        # cost estimate can pass jit_above_cost, and compiling takes hundreds of milliseconds per call.
        conn.execute(self.q.set_plan_mode if generic else self.q.reset_plan_mode, {"local": local})
        if local:
            return
        if generic:
            self._generic.add(conn)
        else:
            self._generic.discard(conn)

    def execute_raw(self, conn: Conn, name: str, params: dict[str, Any], *,
                    binary: bool = False) -> psycopg.Cursor[tuple[Any, ...]]:
        """Run statement ``name`` with server-side placeholders (no client-side parsing: see Queries.raw).

        A connection wrapped by other code (whatever ``borrow`` yields that is not a psycopg connection, such
        as a fault injector) gets the statement through its own ``execute``, so it sees this one too."""
        if not isinstance(conn, psycopg.Connection):
            return conn.execute(getattr(self.q, name), params, binary=binary)  # type: ignore[unreachable]
        text, names = self.q.raw(name)
        return self.execute_raw_text(conn, text, [params[n] for n in names], binary=binary)

    @staticmethod
    def execute_raw_text(conn: Conn, text: str, args: list[Any], *,
                         binary: bool = False) -> psycopg.Cursor[tuple[Any, ...]]:
        """Run ``text`` (``$n`` placeholders) with ``args`` through a RawCursor."""
        cursor = psycopg.RawCursor(conn)
        if isinstance(conn, TransactionPooled) and conn.info.transaction_status == TransactionStatus.IDLE:
            # as TransactionPooled.execute does: the settings and the statement in one pipelined transaction
            with conn.pipeline(), conn.transaction():
                cursor.execute(text, args, binary=binary)
            return cursor
        return cursor.execute(text, args, binary=binary)

    def with_retry(self, op: Callable[[Conn], T], *, attempts: int = 3) -> T:
        """Run an idempotent operation, retrying on a broken connection with a short backoff."""
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                with self.borrow(internal=True) as conn:
                    return op(conn)
            except DatabaseUnavailable as exc:
                if attempt == attempts or not exc.retryable:
                    raise
                time.sleep(delay)
                delay *= 4
        raise AssertionError("unreachable")  # pragma: no cover

    def target(self) -> dict[str, Any]:
        """Where the database is, without credentials: safe for public health output."""
        info = conninfo_to_dict(self.dsn)
        return {"host": info.get("host") or "(default)", "port": info.get("port") or "5432",
                "dbname": info.get("dbname") or info.get("user") or ""}

    def close(self) -> None:
        """Close the pool. Idempotent; later operations raise ``DatabaseUnavailable``."""
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)
