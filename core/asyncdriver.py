"""The asyncio driver of plans (:mod:`core.plans`): the steps of the producer and operator operations performed
with psycopg's asyncio API, on a pool of ``AsyncConnection``\\ s per database (``AsyncConnectionPool``).

It mirrors the blocking driver (``core.plans.run``) step for step; the statements, their order and the
handling of their errors are the plans' own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import psycopg
from psycopg import AsyncTransaction
from psycopg import errors as pg_errors
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from core.appconn import afetch
from core.db import Database
from core.payloads import loads
from core.plans import (
    Call,
    Copy,
    On,
    Op,
    Outcome,
    Own,
    Plan,
    PoolStats,
    Sleep,
    Stmt,
    Together,
    Transaction,
    Using,
    raw_form,
)

T = TypeVar("T")
AConn = psycopg.AsyncConnection[tuple[Any, ...]]


class AsyncTransactionPooled(psycopg.AsyncConnection[tuple[Any, ...]]):
    """``core.db.TransactionPooled`` for asyncio: behind a pooler in transaction mode nothing may live in the
    session, so every transaction of ours first sets, locally, what our sessions carry otherwise."""

    settings_query = ""
    settings_params: dict[str, Any] = {}

    async def _settings(self) -> None:
        await super().execute(self.settings_query, {**self.settings_params, "internal": True})

    async def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                      binary: bool = False) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        if self.info.transaction_status != TransactionStatus.IDLE or self.info.pipeline_status != PipelineStatus.OFF:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        async with self.pipeline(), super().transaction():
            await self._settings()
            cursor = await super().execute(query, params, prepare=prepare, binary=binary)
        return cursor

    @asynccontextmanager
    async def transaction(self, savepoint_name: str | None = None,
                          force_rollback: bool = False) -> AsyncIterator[AsyncTransaction]:
        outer = self.info.transaction_status == TransactionStatus.IDLE
        async with super().transaction(savepoint_name, force_rollback) as tx:
            if outer:
                await self._settings()
            yield tx


class AsyncDriver:
    """Runs plans with asyncio I/O; owns one pool per database it meets (closed by :meth:`close`)."""

    def __init__(self) -> None:
        self._pools: dict[int, AsyncConnectionPool[AConn]] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def run(self, plan: Plan[T], conn: Any = None, db: Any = None) -> T:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = plan.send(value) if error is None else plan.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                value, error = await self._perform(op, conn, db), None
            except Exception as exc:
                value, error = None, exc

    async def _perform(self, op: Op, conn: Any, db: Any) -> Any:
        if isinstance(op, Stmt):
            return await self._statement(op, conn)
        if isinstance(op, On):
            async with self.connection(cast(Database, op.db), op.timeout) as pooled:
                if isinstance(op.body, Stmt):
                    return await self._statement(op.body, pooled)
                return await self.run(op.body(), pooled, op.db)
        if isinstance(op, Transaction):
            async with conn.transaction():
                return await self.run(op.body, conn, db)
        if isinstance(op, Copy):
            if hasattr(conn, "copy_in"):
                return await conn.copy_in(op)
            async with conn.cursor() as cursor, cursor.copy(op.sql) as copy:
                for chunk in op.chunks:
                    await copy.write(chunk)
            return None
        if isinstance(op, Using):
            return await self.run(op.body, op.conn)
        if isinstance(op, Own):
            return await self._own(op)
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        if isinstance(op, Call):
            return await op.asyncio()
        if isinstance(op, Together):
            tasks = [asyncio.ensure_future(asyncio.wait_for(self.run(p), op.timeout)) for p in op.plans]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return [Outcome(error=r) if isinstance(r, BaseException) else Outcome(r) for r in results]
        if isinstance(op, PoolStats):
            pool = await self._pool(cast(Database, op.db))
            if op.check:
                await pool.check()
            return pool.get_stats()
        raise TypeError(f"not a plan step: {op!r}")

    async def _statement(self, op: Stmt, conn: Any) -> Any:
        if conn is None:
            raise RuntimeError("a statement outside a connection: wrap it in On(...)")
        if hasattr(conn, "statement"):  # an application's connection (core.appconn)
            return await conn.statement(op)
        if op.raw:
            text, names = raw_form(op.sql)
            args = [(op.params or {})[n] for n in names]
            cursor = psycopg.AsyncRawCursor(conn)
            if isinstance(conn, AsyncTransactionPooled) and conn.info.transaction_status == TransactionStatus.IDLE:
                async with conn.pipeline(), conn.transaction():
                    await cursor.execute(text, args, binary=op.binary)
            else:
                await cursor.execute(text, args, binary=op.binary)
            return await afetch(cursor, op.fetch)
        return await afetch(await conn.execute(op.sql, op.params, binary=op.binary), op.fetch)

    async def _own(self, op: Own) -> Any:
        try:
            own = await psycopg.AsyncConnection.connect(op.db.dsn, **{**op.db.connection_kwargs(),
                                                                      "autocommit": False})
        except psycopg.OperationalError as exc:
            raise op.db.unavailable(exc) from None
        try:
            return await self.run(op.body(), own, op.db)
        finally:
            with contextlib.suppress(psycopg.Error):
                await own.close()

    # ------------------------------------------------------------------ pools

    async def _pool(self, db: Database) -> AsyncConnectionPool[AConn]:
        if self._closed:
            from core.errors import DatabaseUnavailable

            raise DatabaseUnavailable("processor is closed")
        pool = self._pools.get(id(db))
        if pool is not None:
            return pool
        async with self._lock:
            pool = self._pools.get(id(db))
            if pool is None:
                s = db.settings
                pool = AsyncConnectionPool(
                    db.dsn, connection_class=self._connection_class(db), min_size=db.size[0], max_size=db.size[1],
                    kwargs=db.connection_kwargs(), open=False, timeout=s.connect_timeout,
                    name=f"dp-async-{s.instance_id}{'-' + db.name if db.name else ''}",
                    reconnect_timeout=max(60.0, s.connect_timeout), max_idle=300.0,
                    configure=self._configure(db))
                await pool.open(wait=False)
                self._pools[id(db)] = pool
            return pool

    @staticmethod
    def _connection_class(db: Database) -> type[AConn]:
        if not db.transaction_pooling:
            return psycopg.AsyncConnection

        class Pooled(AsyncTransactionPooled):
            settings_query = db.q.transaction_settings
            settings_params = {
                "statement_timeout": str(int(db.settings.statement_timeout * 1000))
                if db.settings.statement_timeout else "0",
                "idle_timeout": "60000",
            }

        return Pooled

    @staticmethod
    def _configure(db: Database) -> Any:
        async def configure(conn: AConn) -> None:
            set_json_loads(loads, conn)
            if not db.transaction_pooling:
                # Every statement on these connections is ours: generic plans, no JIT, no sequential scans
                # (core.db.Database.set_plan_mode) for the whole session.
                await conn.execute(db.q.set_plan_mode, {"local": False})
        return configure

    @asynccontextmanager
    async def connection(self, db: Database, timeout: float | None = None) -> AsyncIterator[AConn]:
        """A pooled connection of ``db`` (autocommit); failures become the typed errors of ``core.db``."""
        pool = await self._pool(db)
        try:
            async with pool.connection(timeout=timeout or db.settings.connect_timeout) as conn:
                yield conn
        except PoolTimeout as exc:
            raise db.unavailable(exc) from None
        except (pg_errors.UndefinedTable, psycopg.OperationalError) as exc:
            typed = db.typed_error(exc)
            if typed is None:
                raise
            raise typed from None

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close(timeout=5.0)
