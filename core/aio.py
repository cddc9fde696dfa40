"""``AsyncDistributedProcessor``: the producer and operator API as coroutines, on psycopg's asyncio pool.

Its methods are the very plans of :mod:`core.operations` that ``DistributedProcessor`` runs (same arguments,
checks, typed errors and docstrings), performed by the asyncio driver (:mod:`core.asyncdriver`): an
``await add_records(...)`` waiting on a key another transaction holds leaves the event loop free. The
worker loop (``run()``) stays on the blocking class.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from core import operations
from core.asyncdriver import AsyncDriver
from core.flows import operations as flow_operations
from core.operations import Operations
from core.plans import Plan, method_signature
from core.processor import DistributedProcessor

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="AsyncDistributedProcessor")


def awaiting(plan: Callable[Concatenate[Any, P], Plan[T]]) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]:
    """A coroutine method that runs ``plan`` with the asyncio driver (signature and docstring are the plan's,
    as the blocking method's are: :func:`core.plans.blocking`)."""
    @functools.wraps(plan)
    async def method(self: AsyncDistributedProcessor, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._driver.run(plan(self, *args, **kwargs))
    method.__signature__ = method_signature(plan)  # type: ignore[attr-defined]
    return cast("Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]", method)


class AsyncDistributedProcessor(Operations):
    """The producer and operator API of :class:`core.DistributedProcessor` as coroutines (``await
    p.add_records(...)``), on psycopg's ``AsyncConnectionPool``. Takes the same constructor arguments (a
    ``dsn`` or ``shards``, and every setting); opens nothing until the first call. ``async with`` closes it.
    ``run()`` (the worker loop) is the blocking class's.
    """

    def __init__(self, dsn: str | None = None, **options: Any) -> None:
        # The blocking processor builds the settings and the stores (nothing opens until used); this one runs
        # the same plans over them with asyncio I/O.
        self._blocking = DistributedProcessor(dsn, **options)
        self.settings = self._blocking.settings
        self.store = self._blocking.store
        self.facts = self._blocking.facts
        self._driver = AsyncDriver()

    add_records = awaiting(operations.add_records)
    start_flow = awaiting(flow_operations.start_flow)
    flow_status = awaiting(flow_operations.flow_status)
    cancel_flow = awaiting(flow_operations.cancel_flow)
    list_flow_runs = awaiting(flow_operations.list_flow_runs)
    get_queue_status = awaiting(operations.get_queue_status)
    health_check = awaiting(operations.health_check)
    list_instances = awaiting(operations.list_instances)
    cancel = awaiting(operations.cancel)
    retry_failed = awaiting(operations.retry_failed)
    purge = awaiting(operations.purge)
    set_key_concurrency = awaiting(operations.set_key_concurrency)
    set_queue_limit = awaiting(operations.set_queue_limit)
    pause = awaiting(operations.pause)
    resume = awaiting(operations.resume)
    paused_queues = awaiting(operations.paused_queues)
    set_queue_rate = awaiting(operations.set_queue_rate)
    set_key_rate = awaiting(operations.set_key_rate)
    rates = awaiting(operations.rates)
    schedule = awaiting(operations.schedule)  # type: ignore[arg-type]  # (mypy: ParamSpec with **kwargs)
    unschedule = awaiting(operations.unschedule)
    list_schedules = awaiting(operations.list_schedules)
    fire_due_schedules = awaiting(operations.fire_due_schedules)

    @property
    def dsn(self) -> str:
        return self.settings.dsn

    @property
    def shards(self) -> list[str] | None:
        return self._blocking.shards

    async def migrate(self) -> None:
        """Bring the database schema (every shard's) to the latest migration (idempotent, safe from many
        instances); Alembic's work runs in a thread."""
        await asyncio.to_thread(self._blocking.migrate)

    async def close(self) -> None:
        """Close the pools. Idempotent."""
        await self._driver.close()
        self._blocking.close()

    async def __aenter__(self: S) -> S:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return repr(self._blocking).replace("DistributedProcessor", "AsyncDistributedProcessor", 1)


AsyncDistributedProcessor.__init__.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    DistributedProcessor.__init__)
