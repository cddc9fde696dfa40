"""Operations written once, run by a blocking or an asyncio driver.

An operation of the producer and operator API is a *plan*: a generator that yields what it needs done (a
statement on a connection of some database's pool, a transaction, a pause) and receives the result back, or
the error thrown in where it yielded. Its statements, their order, its argument checks and its handling of
errors live in the plan; :func:`run` performs its steps with blocking psycopg (``DistributedProcessor``), and
:mod:`core.aio` with psycopg's asyncio API (``AsyncDistributedProcessor``). The two APIs cannot drift: they
run the same plans, and only the few lines below that touch a connection differ.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, overload

import psycopg

T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S")


class Database(Protocol):
    """What the drivers use of a database (:class:`core.db.Database`): its pool and how it names failures."""

    dsn: str

    def borrow(self, timeout: float | None = None, *, internal: bool = False) -> AbstractContextManager[Any]: ...

    def connection_kwargs(self) -> dict[str, Any]: ...

    def unavailable(self, exc: BaseException) -> Exception: ...

    def ensure_pool(self) -> Any: ...

    @staticmethod
    def execute_raw_text(conn: Any, text: str, args: list[Any], *, binary: bool = False) -> Any: ...


class Op:
    """A step of a plan, performed by a driver."""

    __slots__ = ()


Plan = Generator[Op, Any, T]


@dataclass(frozen=True)
class Stmt(Op):
    """One statement on the current connection (of the enclosing :class:`On`, :class:`Own` or :class:`Using`).

    ``fetch``: ``"all"`` rows, ``"one"`` row (or None), ``"rowcount"``, or ``"none"``. ``raw``: sent with the
    server's own ``$n`` placeholders (never parsed on the client; see ``Queries.raw``).
    """

    sql: str
    params: Mapping[str, Any] | None = None
    fetch: str = "all"
    binary: bool = False
    raw: bool = False


@dataclass(frozen=True)
class Copy(Op):
    """``COPY ... FROM STDIN`` on the current connection, the text written chunk by chunk."""

    sql: str
    chunks: Iterable[str]


@dataclass(frozen=True)
class Transaction(Op):
    """``body`` in a transaction of the current connection (a savepoint inside one)."""

    body: Plan[Any]


@dataclass(frozen=True)
class On(Op):
    """``body`` on a pooled connection of ``db`` (autocommit): a plan, or one statement. Use :func:`on`, which
    retries idempotent work on a broken connection."""

    db: Database
    body: Callable[[], Plan[Any]] | Stmt
    timeout: float | None = None


@dataclass(frozen=True)
class Own(Op):
    """``body`` on a connection of ``db`` of its own (not pooled), in one transaction that is never committed
    (what it holds, locks, it holds until the plan ends), closed after."""

    db: Database
    body: Callable[[], Plan[Any]]


@dataclass(frozen=True)
class Using(Op):
    """``body`` on an application's connection (``add_records(conn=...)``): inside its transaction, never
    committing nor rolling back for it."""

    conn: Any  # core.appconn's PsycopgConn (blocking) or AsyncPsycopgConn (asyncio)
    body: Plan[Any]


@dataclass(frozen=True)
class Call(Op):
    """A call that differs between the drivers: ``blocking()`` for the blocking one, ``asyncio()`` awaited by
    the asyncio one (e.g. taking hold of an application's connection, which SQLAlchemy's asyncio API awaits)."""

    blocking: Callable[[], Any]
    asyncio: Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Sleep(Op):
    seconds: float


@dataclass(frozen=True)
class Together(Op):
    """Several plans at once; the result is one :class:`Outcome` per plan, in order."""

    plans: Sequence[Plan[Any]]
    timeout: float


@dataclass(frozen=True)
class PoolStats(Op):
    """The pool statistics of ``db`` (its pool opened if need be); with ``check``, broken idle connections are
    dropped first."""

    db: Database
    check: bool = False


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    error: BaseException | None = None


# ---------------------------------------------------------------------- plan helpers


@overload
def on(db: Database, body: Callable[[], Plan[T]], *, attempts: int = 3, timeout: float | None = None) -> Plan[T]: ...


@overload
def on(db: Database, body: Stmt, *, attempts: int = 3, timeout: float | None = None) -> Plan[Any]: ...


def on(db: Database, body: Callable[[], Plan[Any]] | Stmt, *, attempts: int = 3,
       timeout: float | None = None) -> Plan[Any]:
    """``body`` on a pooled connection of ``db``, retried on a broken connection with a short backoff (for
    idempotent work; ``attempts=1`` otherwise)."""
    from core.errors import DatabaseUnavailable

    delay = 0.05
    for attempt in range(1, attempts + 1):
        try:
            return (yield On(db, body, timeout))
        except DatabaseUnavailable as exc:
            if attempt == attempts or not exc.retryable:
                raise
            yield Sleep(delay)
            delay *= 4
    raise AssertionError("unreachable")  # pragma: no cover


def using(conn: Any, body: Plan[T]) -> Plan[T]:
    """``body`` on an application's connection (see :class:`Using`)."""
    return cast(T, (yield Using(conn, body)))


def transaction(body: Plan[T]) -> Plan[T]:
    """``body`` in a transaction of the current connection."""
    return cast(T, (yield Transaction(body)))


def later(work: Callable[[], T]) -> Plan[T]:
    """A plan that calls ``work`` when it runs, and needs no step of a driver (the in-memory store's
    operations, or blocking work of a blocking-only caller)."""
    yield from ()
    return work()


# ---------------------------------------------------------------------- the public methods made of plans


def method_signature(plan: Callable[..., Any]) -> inspect.Signature:
    """The signature of the public method made of ``plan``: its own, returning what the plan returns (as an
    ``async def`` method's signature names what awaiting it gives)."""
    sig = inspect.signature(plan)
    returns = sig.return_annotation
    if isinstance(returns, str) and returns.startswith("Plan[") and returns.endswith("]"):
        returns = returns[len("Plan["):-1]
    return sig.replace(return_annotation=returns)


def blocking(plan: Callable[Concatenate[S, P], Plan[T]]) -> Callable[Concatenate[S, P], T]:
    """A method that runs ``plan`` with the blocking driver (signature and docstring are the plan's)."""
    @functools.wraps(plan)
    def method(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        return run(plan(self, *args, **kwargs))
    method.__signature__ = method_signature(plan)  # type: ignore[attr-defined]
    return cast("Callable[Concatenate[S, P], T]", method)


# ---------------------------------------------------------------------- the blocking driver

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=256)
def raw_form(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with ``$n`` placeholders, and the parameter names in their order (see ``Queries.raw``)."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return _PLACEHOLDER.sub(number, sql).replace("%%", "%"), tuple(names)


def fetch(cursor: Any, how: str) -> Any:
    if how == "all":
        return cursor.fetchall()
    if how == "one":
        return cursor.fetchone()
    if how == "rowcount":
        return cursor.rowcount
    return None


def run(plan: Plan[T], conn: Any = None, db: Database | None = None) -> T:
    """Perform ``plan``'s steps with blocking I/O; ``conn`` (of ``db``) is the current connection."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = plan.send(value) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            value, error = _perform(op, conn, db), None
        except Exception as exc:
            value, error = None, exc


def _perform(op: Op, conn: Any, db: Database | None) -> Any:
    if isinstance(op, Stmt):
        return _statement(op, conn, db)
    if isinstance(op, On):
        with op.db.borrow(op.timeout, internal=True) as pooled:
            if isinstance(op.body, Stmt):
                return _statement(op.body, pooled, op.db)
            return run(op.body(), pooled, op.db)
    if isinstance(op, Transaction):
        with conn.transaction():
            return run(op.body, conn, db)
    if isinstance(op, Copy):
        if hasattr(conn, "copy_in"):  # an application's connection (core.appconn)
            return conn.copy_in(op)
        with conn.cursor().copy(op.sql) as copy:
            for chunk in op.chunks:
                copy.write(chunk)
        return None
    if isinstance(op, Using):
        return run(op.body, op.conn, None)
    if isinstance(op, Own):
        try:
            own = psycopg.connect(op.db.dsn, **{**op.db.connection_kwargs(), "autocommit": False})
        except psycopg.OperationalError as exc:
            raise op.db.unavailable(exc) from None
        try:
            return run(op.body(), own, op.db)
        finally:
            with contextlib.suppress(psycopg.Error):
                own.close()
    if isinstance(op, Sleep):
        time.sleep(op.seconds)
        return None
    if isinstance(op, Call):
        return op.blocking()
    if isinstance(op, Together):
        with cf.ThreadPoolExecutor(max(1, len(op.plans)), thread_name_prefix="dp-together") as threads:
            futures = [threads.submit(run, p) for p in op.plans]
            out = []
            for fut in futures:
                try:
                    out.append(Outcome(fut.result(op.timeout)))
                except Exception as exc:
                    out.append(Outcome(error=exc))
            return out
    if isinstance(op, PoolStats):
        pool = op.db.ensure_pool()
        if op.check:
            pool.check()
        return pool.get_stats()
    raise TypeError(f"not a plan step: {op!r}")


def _statement(op: Stmt, conn: Any, db: Database | None) -> Any:
    if conn is None:
        raise RuntimeError("a statement outside a connection: wrap it in On(...)")
    if hasattr(conn, "statement"):  # an application's connection (core.appconn)
        return conn.statement(op)
    if op.raw and isinstance(conn, psycopg.Connection) and db is not None:
        text, names = raw_form(op.sql)
        args = [(op.params or {})[n] for n in names]
        return fetch(db.execute_raw_text(conn, text, args, binary=op.binary), op.fetch)
    return fetch(conn.execute(op.sql, op.params, binary=op.binary), op.fetch)
