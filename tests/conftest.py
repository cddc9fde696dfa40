"""Fixtures: one real PostgreSQL per session, a migrated template, a fresh database per test (the first three
are the installed pytest plugin's: dp_server, dp_template, dp_dsn)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from core import DistributedProcessor
from core.testing.plugin import processor_options
from core.testing.postgres import Clones
from tests.servers import leaked
from tests.support import Server, unique_name

CATEGORIES = ("unit", "integration", "concurrent", "performance", "chaos", "container")
# Folders of tests that belong to a category they are not named after.
FOLDER_CATEGORY = {"conformance": "integration", "web": "integration"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The folder a test lives in is its category marker.
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in (*CATEGORIES, *FOLDER_CATEGORY):
            if folder in parts:
                item.add_marker(getattr(pytest.mark, FOLDER_CATEGORY.get(folder, folder)))


@pytest.fixture(scope="session")
def pg_server(dp_server: Server) -> Server:
    """The session's server: the plugin's (core/testing/plugin.py, loaded through its entry point)."""
    return dp_server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Every server and pooler a test starts, it stops: one still alive here is a leak that CI machines
    # would accumulate. Stop it, and fail the run.
    alive = leaked()
    if not alive:
        return
    lines = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
    print("\nLEAKED server processes started by the suite (now killed):\n" + "\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def template_db(dp_template: str) -> str:
    return dp_template


@pytest.fixture
def dsn(dp_dsn: str) -> str:
    """A fresh, migrated database for this test only."""
    return dp_dsn


@pytest.fixture
def empty_dsn(pg_server: Server) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = unique_name("dp_e")
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def dp_shards(request: pytest.FixtureRequest, dp_server: Any, dp_clones: Clones) -> Iterator[DistributedProcessor]:
    """A processor over three shards: three fresh databases of the test server, set up as shards."""
    names: list[str] = []
    try:
        for _ in range(3):  # one at a time: a failed take leaves the ones before it in names, to drop
            names.append(dp_clones.take())
        options = {"connect_timeout": 5, **processor_options(request)}
        with DistributedProcessor(shards=[dp_server.dsn_for(n) for n in names], **options) as p:
            p.migrate()  # numbers the shards, writes the partition map
            yield p
    finally:
        for name in names:
            dp_clones.drop(name)


@pytest.fixture
def processor(dsn: str) -> Iterator[DistributedProcessor]:
    with DistributedProcessor(dsn, instance_id="test-a", connect_timeout=5) as p:
        yield p


@pytest.fixture
def make_processor(dsn: str) -> Iterator[object]:
    made: list[DistributedProcessor] = []

    def factory(**kwargs: object) -> DistributedProcessor:
        kwargs.setdefault("connect_timeout", 5)
        p = DistributedProcessor(dsn, **kwargs)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield factory
    for p in made:
        p.close()


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to the test database, for assertions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
