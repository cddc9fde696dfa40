"""One behaviour suite, every backend: every test here runs on the in-memory processor (its fake clock), on a
real PostgreSQL (real time) through the plugin's fixtures ``dp_memory`` and ``dp_postgres``, on three shards,
and through the asyncio API (``AsyncDistributedProcessor``) on one database.

``@pytest.mark.dp_options(...)`` sets the processor's constructor arguments for both. Time passes through
``clock`` (:class:`FakeTime` or :class:`RealTime`): ``clock.advance(s)`` lets ``s`` seconds pass (a real wait on
PostgreSQL, so keep them short), ``clock.until(predicate, after=s)`` returns the predicate's value once it is
truthy, which must be so ``s`` seconds on (on the fake clock exactly then; on PostgreSQL by a bounded poll).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import pytest

from core import AsyncDistributedProcessor, DistributedProcessor
from core.api import ProcessorAPI
from core.testing.plugin import processor_options
from tests.support import wait_until

T = TypeVar("T")
BACKENDS = ["memory", "postgres", "shards", "async"]
# A real-time wait ends this long after the moment it waits for, at the latest (a loaded test machine).
SLACK = 10.0


class Clock(Protocol):
    def now(self) -> datetime: ...

    def advance(self, seconds: float) -> None: ...

    def until(self, predicate: Callable[[], T], *, after: float) -> T: ...


class FakeTime:
    """The in-memory backend's time: its fake clock, moved by the test."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def now(self) -> datetime:
        return self.clock.now()  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def until(self, predicate: Callable[[], T], *, after: float) -> T:
        self.clock.advance(after)
        value = predicate()
        assert value, f"not so {after}s on: {predicate}"
        return value


class RealTime:
    """PostgreSQL's time: the wall clock (the server runs on this machine or agrees with it)."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)  # real time has to pass: now() is the server's

    def until(self, predicate: Callable[[], T], *, after: float) -> T:
        return wait_until(predicate, timeout=after + SLACK, interval=0.02)  # type: ignore[no-any-return]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class AsyncBacked:
    """A ``DistributedProcessor`` whose producer and operator calls (``SHARED``) are an
    ``AsyncDistributedProcessor``'s on the same database, awaited on an event loop of its own: the suite then
    holds the asyncio API to every behaviour it checks (the worker's calls stay the blocking class's)."""

    SHARED = ("add_records", "get_queue_status", "health_check", "list_instances", "cancel", "retry_failed",
              "purge", "set_key_concurrency", "set_queue_limit")

    def __init__(self, blocking: DistributedProcessor, aio: AsyncDistributedProcessor) -> None:
        self._blocking, self._aio = blocking, aio
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dp-test-loop", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        if name in self.SHARED:
            method = getattr(self._aio, name)
            return lambda *a, **kw: asyncio.run_coroutine_threadsafe(method(*a, **kw), self._loop).result(60)
        return getattr(self._blocking, name)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._aio.close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def dp_async(request: pytest.FixtureRequest, dp_postgres: DistributedProcessor) -> Iterator[AsyncBacked]:
    aio = AsyncDistributedProcessor(dp_postgres.dsn, **{"connect_timeout": 5, **processor_options(request),
                                                        "instance_id": dp_postgres.instance_id})
    backed = AsyncBacked(dp_postgres, aio)
    yield backed
    backed.close()


@pytest.fixture
def processor(backend: str, request: pytest.FixtureRequest) -> ProcessorAPI:
    """The backend's processor: the plugin's ``dp_memory`` or ``dp_postgres``, three shards, or the asyncio
    API on one database."""
    return request.getfixturevalue(f"dp_{backend}")  # type: ignore[no-any-return]


@pytest.fixture
def clock(backend: str, processor: ProcessorAPI, request: pytest.FixtureRequest) -> Clock:
    if backend == "memory":
        return FakeTime(request.getfixturevalue("dp_clock"))
    return RealTime()


def ago(clock: Clock, seconds: float) -> datetime:
    return clock.now() - timedelta(seconds=seconds)


def ids(records: Any) -> list[int]:
    return [r.id for r in records]


def counts(processor: ProcessorAPI, queue: str = "default") -> dict[str, int]:
    """The five status counts of ``queue`` (all zero when it has no record)."""
    row = processor.get_queue_status(queue)["queues"].get(queue, {})
    return {s: row.get(s, 0) for s in ("pending", "processing", "completed", "failed", "cancelled")}
