"""Connections an application hands us (``add_records(..., conn=...)``): its statements and ours share one
transaction, so the records it adds commit or roll back with its own writes (the outbox pattern).

Accepted: a psycopg ``Connection`` or ``AsyncConnection``, a SQLAlchemy 2.x ``Connection`` or ``Session`` (and
their asyncio forms) on the psycopg driver. Our statements go through SQLAlchemy's own connection
(``exec_driver_sql``), so its transaction bookkeeping stays right; only COPY (large batches) uses the psycopg
connection under it. We never commit, roll back or open a savepoint for the caller: a savepoint per call
would give every such transaction a subtransaction, and past 64 of them every snapshot of the server pays.
Nothing of ours raises inside the transaction for a full queue or a held dedupe key (the statement reports
them), so the caller's transaction stays usable after ``QueueFull`` and a deduplicated record.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from core.errors import DatabaseUnavailable, InvalidArgument, NotInTransaction, SchemaNotMigrated
from core.plans import Copy, Stmt, fetch

ACCEPTED = ("a psycopg Connection, a SQLAlchemy Connection or Session on the psycopg driver, or their asyncio "
            "forms (psycopg AsyncConnection, SQLAlchemy AsyncConnection or AsyncSession)")


def _typed(exc: Exception) -> Exception:
    """A failure of one of our statements on the application's connection, as the typed error it maps to."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    error = orig if isinstance(orig, psycopg.Error) else exc
    if isinstance(error, (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable)):
        return SchemaNotMigrated(f"the processor's functions are missing on the connection's database "
                                 f"({error.diag.message_primary}); run `dproc migrate`")
    if isinstance(error, psycopg.OperationalError) and not isinstance(error, psycopg.errors.QueryCanceled):
        typed = DatabaseUnavailable(f"the application's connection failed: {' '.join(str(error).split())}")
        typed.rolled_back = isinstance(error, (psycopg.errors.DeadlockDetected,
                                               psycopg.errors.SerializationFailure))
        typed.retryable = False  # the caller's transaction is lost: only the caller can run it again
        return typed
    return error


def check_transaction(raw: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], what: str) -> None:
    """Refuse a connection whose statements would not be atomic with the application's work."""
    if raw.closed:
        raise InvalidArgument(f"conn ({what}) is closed")
    status = raw.info.transaction_status
    if status == TransactionStatus.INERROR:
        raise NotInTransaction(f"conn ({what}) is in a failed transaction: roll it back first; nothing was written")
    if status == TransactionStatus.IDLE and raw.autocommit:
        raise NotInTransaction(
            f"conn ({what}) is in autocommit mode outside a transaction block: the records would be atomic with "
            "nothing. Open a transaction (`with conn.transaction():`, or a connection with autocommit off); "
            "nothing was written")
    if status not in (TransactionStatus.IDLE, TransactionStatus.INTRANS):
        raise InvalidArgument(f"conn ({what}) is busy with another statement")


def _alchemy_driver(sa_conn: Any) -> psycopg.Connection[Any]:
    driver = sa_conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise InvalidArgument(f"conn is a SQLAlchemy connection on the {sa_conn.dialect.driver!r} driver; "
                              "use postgresql+psycopg (psycopg 3)")
    return driver


class PsycopgConn:
    """A psycopg connection of the application."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        check_transaction(conn, "psycopg Connection")
        self.raw = conn

    def statement(self, op: Stmt) -> Any:
        try:
            return fetch(self.raw.execute(op.sql, op.params, binary=op.binary), op.fetch)
        except psycopg.Error as exc:
            raise _typed(exc) from exc

    def copy_in(self, op: Copy) -> None:
        try:
            with self.raw.cursor().copy(op.sql) as copy:
                for chunk in op.chunks:
                    copy.write(chunk)
        except psycopg.Error as exc:
            raise _typed(exc) from exc


class AlchemyConn(PsycopgConn):
    """A SQLAlchemy ``Connection`` (a ``Session``'s, for a session) on psycopg: statements through SQLAlchemy."""

    def __init__(self, sa_conn: Any) -> None:
        driver = _alchemy_driver(sa_conn)
        check_transaction(driver, "SQLAlchemy Connection")
        self.raw = driver
        self.sa = sa_conn

    def statement(self, op: Stmt) -> Any:
        try:
            result = self.sa.exec_driver_sql(op.sql, dict(op.params or {}))
        except Exception as exc:
            raise _typed(exc) from exc
        if op.fetch == "all":
            return [tuple(r) for r in result.fetchall()]
        if op.fetch == "one":
            row = result.fetchone()
            return None if row is None else tuple(row)
        return result.rowcount if op.fetch == "rowcount" else None


class AsyncPsycopgConn:
    """A psycopg ``AsyncConnection`` of the application."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        check_transaction(conn, "psycopg AsyncConnection")
        self.raw = conn

    async def statement(self, op: Stmt) -> Any:
        try:
            cursor = await self.raw.execute(op.sql, op.params, binary=op.binary)
            return await afetch(cursor, op.fetch)
        except psycopg.Error as exc:
            raise _typed(exc) from exc

    async def copy_in(self, op: Copy) -> None:
        try:
            async with self.raw.cursor() as cursor, cursor.copy(op.sql) as copy:
                for chunk in op.chunks:
                    await copy.write(chunk)
        except psycopg.Error as exc:
            raise _typed(exc) from exc


class AsyncAlchemyConn(AsyncPsycopgConn):
    """A SQLAlchemy ``AsyncConnection`` (an ``AsyncSession``'s, for a session) on psycopg."""

    def __init__(self, sa_conn: Any, driver: Any) -> None:
        if not isinstance(driver, psycopg.AsyncConnection):
            raise InvalidArgument("conn is a SQLAlchemy AsyncConnection on another driver than psycopg; use "
                                  "postgresql+psycopg (psycopg 3)")
        check_transaction(driver, "SQLAlchemy AsyncConnection")
        self.raw = driver
        self.sa = sa_conn

    async def statement(self, op: Stmt) -> Any:
        try:
            result = await self.sa.exec_driver_sql(op.sql, dict(op.params or {}))
        except Exception as exc:
            raise _typed(exc) from exc
        if op.fetch == "all":
            return [tuple(r) for r in result.fetchall()]
        if op.fetch == "one":
            row = result.fetchone()
            return None if row is None else tuple(row)
        return result.rowcount if op.fetch == "rowcount" else None


AppConn = PsycopgConn | AsyncPsycopgConn


async def afetch(cursor: Any, how: str) -> Any:
    if how == "all":
        return await cursor.fetchall()
    if how == "one":
        return await cursor.fetchone()
    if how == "rowcount":
        return cursor.rowcount
    return None


def _alchemy(conn: Any) -> bool:
    return type(conn).__module__.startswith("sqlalchemy")


def adapt(conn: Any) -> PsycopgConn:
    """The blocking API's view of ``conn`` (typed errors for anything else, before anything is written)."""
    if isinstance(conn, psycopg.Connection):
        return PsycopgConn(conn)
    if isinstance(conn, psycopg.AsyncConnection) or (_alchemy(conn) and "asyncio" in type(conn).__module__):
        raise InvalidArgument("conn is an asyncio connection: use core.AsyncDistributedProcessor with it")
    if _alchemy(conn):
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session

        if isinstance(conn, Session):
            conn = conn.connection()  # the session's transaction begins, if it had not
        if isinstance(conn, Connection):
            return AlchemyConn(conn)
    raise InvalidArgument(f"conn must be {ACCEPTED}; got {type(conn).__name__}")


async def aadapt(conn: Any) -> AsyncPsycopgConn:
    """The asyncio API's view of ``conn``."""
    if isinstance(conn, psycopg.AsyncConnection):
        return AsyncPsycopgConn(conn)
    if isinstance(conn, psycopg.Connection):
        raise InvalidArgument("conn is a blocking psycopg Connection: the asyncio API takes an AsyncConnection")
    if _alchemy(conn):
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        if isinstance(conn, AsyncSession):
            conn = await conn.connection()
        if isinstance(conn, AsyncConnection):
            raw = await conn.get_raw_connection()
            return AsyncAlchemyConn(conn, raw.driver_connection)
        raise InvalidArgument("conn is a blocking SQLAlchemy connection: the asyncio API takes an AsyncConnection "
                              "or AsyncSession")
    raise InvalidArgument(f"conn must be {ACCEPTED}; got {type(conn).__name__}")
