"""One behaviour suite, two backends: every test here runs on the in-memory processor (its fake clock) and on
a real PostgreSQL (real time), through the plugin's fixtures ``dp_memory`` and ``dp_postgres``.

``@pytest.mark.dp_options(...)`` sets the processor's constructor arguments for both. Time passes through
``clock`` (:class:`FakeTime` or :class:`RealTime`): ``clock.advance(s)`` lets ``s`` seconds pass (a real wait on
PostgreSQL, so keep them short), ``clock.until(predicate, after=s)`` returns the predicate's value once it is
truthy, which must be so ``s`` seconds on (on the fake clock exactly then; on PostgreSQL by a bounded poll).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import pytest

from core import DistributedProcessor
from core.api import ProcessorAPI
from core.testing.plugin import processor_options
from core.testing.postgres import unique_name
from tests.support import wait_until

T = TypeVar("T")
BACKENDS = ["memory", "postgres", "shards"]
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


@pytest.fixture
def dp_shards(request: pytest.FixtureRequest, dp_server: Any, dp_template: str) -> Iterator[DistributedProcessor]:
    """A processor over three shards: three fresh databases of the test server, set up as shards."""
    names = [unique_name(f"dp_s{i}") for i in range(3)]
    dsns = [dp_server.create_database(name, template=dp_template) for name in names]
    try:
        options = {"connect_timeout": 5, **processor_options(request)}
        with DistributedProcessor(shards=dsns, **options) as p:
            p.migrate()  # numbers the shards, writes the partition map
            yield p
    finally:
        for name in names:
            dp_server.drop_database(name)


@pytest.fixture
def processor(backend: str, request: pytest.FixtureRequest) -> ProcessorAPI:
    """The backend's processor: the plugin's ``dp_memory`` or ``dp_postgres``, or three shards."""
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
