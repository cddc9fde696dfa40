"""Chaos helpers: worker processes run the real CLI with short leases so recovery is quick to observe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs.chaos_handlers import CHAOS_DDL
from tests.support import WorkerProcs

LEASE = 6.0
HEARTBEAT = 1.0
DEAD_AFTER = 3.0
CLEANUP = 1.0
# The promise each test checks: orphans are back in service within this long.
RECOVERY_BOUND = LEASE + HEARTBEAT + CLEANUP


def worker_argv(*extra: str, handler: str = "tests.procs.chaos_handlers:work") -> list[str]:
    return [
        "-m", "core", "--log-format", "json", "--log-level", "WARNING", "run", "--handler", handler,
        "--lease-seconds", str(LEASE), "--heartbeat-interval", str(HEARTBEAT), "--dead-after", str(DEAD_AFTER),
        "--cleanup-interval", str(CLEANUP), "--concurrency", "4", "--poll-interval", "0.2",
        "--grace-seconds", "5", "--retry-base-delay", "0.1", "--retry-max-delay", "1", *extra,
    ]


class Fleet(WorkerProcs):
    """Worker processes against one database, started and restarted the way an orchestrator would."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.generation = 0

    def spawn(self, *extra: str, handler: str = "tests.procs.chaos_handlers:work", dsn: str | None = None,
              env: dict[str, str] | None = None) -> str:
        self.generation += 1
        name = f"chaos-{self.generation}"
        self.start(name, worker_argv(*extra, handler=handler),
                   env={"DATABASE_URL": dsn or self.dsn, "DP_INSTANCE_ID": name, **(env or {})})
        return name

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]


@pytest.fixture
def chaos_db(db: Any) -> Any:
    db.execute(CHAOS_DDL)
    return db


@pytest.fixture
def fleet(dsn: str) -> Iterator[Fleet]:
    f = Fleet(dsn)
    yield f
    f.kill_all()
