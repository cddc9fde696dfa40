"""pytest fixtures for code built on distributed-processor, loaded through the ``pytest11`` entry point
whenever the package is installed (no conftest needed).

* ``dp_clock``: a :class:`core.testing.FakeClock`; time passes only when the test advances it.
* ``dp_memory``: an :class:`core.testing.InMemoryProcessor` on ``dp_clock`` (also ``dp_memory.clock``).
* ``dp_postgres``: a :class:`core.DistributedProcessor` on a fresh database of its own, cloned from a
  template migrated once per session, dropped after the test.
* ``dp_dsn``: that fresh database's DSN alone (for a second processor, or a plain connection).
* ``dp_server`` (session): the server, found by :func:`core.testing.postgres.find_server`: ``DATABASE_URL``,
  else ``POSTGRES_TEST_HOST``, else a local server on 127.0.0.1:5432, else the embedded one (extra
  ``[embedded]``), started on first use and stopped at the session's end. ``DP_TEST_EMBEDDED=1`` skips the
  local server.
* ``dp_template`` (session): the migrated template database's name.
* ``dp_clones`` (session): a :class:`core.testing.postgres.Clones` of that template, copies made ahead of
  the tests and dropped after them by threads of their own (``take()``, ``drop(name)``).

``@pytest.mark.dp_options(**kwargs)`` passes constructor arguments to the processors ``dp_memory`` and
``dp_postgres`` build (``max_attempts=3``, ``retry=RetryPolicy(base_delay=0)``, ``lease_seconds=...``).
A test that uses only ``dp_memory`` never looks for a PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from core.processor import DistributedProcessor
from core.testing.postgres import Clones, Server, create_template, embedded_test_dir, find_server

if TYPE_CHECKING:
    from core.testing.clock import FakeClock
    from core.testing.memory import InMemoryProcessor

MARKER = "dp_options"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(**kwargs): constructor arguments of the processors dp_memory and dp_postgres build")


def processor_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``dp_options`` keyword arguments of the requesting test (the closest marker wins)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    if marker.args:
        raise TypeError(f"{MARKER} takes keyword arguments only, got {marker.args!r}")
    return dict(marker.kwargs)


@pytest.fixture
def dp_clock() -> FakeClock:
    """A fake clock for ``dp_memory``: ``dp_clock.advance(seconds)`` makes time pass."""
    # Imported here: a plugin loaded in every pytest run of the environment should load as little as it can.
    from core.testing.clock import FakeClock

    return FakeClock()


@pytest.fixture
def dp_memory(request: pytest.FixtureRequest, dp_clock: FakeClock) -> Iterator[InMemoryProcessor]:
    """An in-memory processor on ``dp_clock``: same API and behaviour as ``dp_postgres``, no database."""
    from core.testing.memory import InMemoryProcessor

    with InMemoryProcessor(clock=dp_clock, **processor_options(request)) as processor:
        yield processor


@pytest.fixture(scope="session")
def dp_server(pytestconfig: pytest.Config) -> Iterator[Server]:
    """The session's PostgreSQL server (an embedded one is started under the rootdir's ``.dproc/``)."""
    server = find_server(embedded_test_dir(pytestconfig.rootpath))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dp_template(dp_server: Server) -> Iterator[str]:
    """The name of a database migrated to the latest revision, copied for every ``dp_dsn``."""
    name = create_template(dp_server)
    yield name
    dp_server.drop_database(name)


@pytest.fixture(scope="session")
def dp_clones(dp_server: Server, dp_template: str) -> Iterator[Clones]:
    """Fresh copies of ``dp_template``, made ahead and dropped behind by threads of their own (``take()``,
    ``drop(name)``): what ``dp_dsn`` hands out."""
    clones = Clones(dp_server, dp_template)
    try:
        yield clones
    finally:
        clones.close()


@pytest.fixture
def dp_dsn(dp_server: Server, dp_clones: Clones) -> Iterator[str]:
    """The DSN of a fresh, migrated database for this test only (dropped after it, on ``dp_clones``' threads:
    sessions the test left open end then)."""
    name = dp_clones.take()
    try:
        yield dp_server.dsn_for(name)
    finally:
        dp_clones.drop(name)


@pytest.fixture
def dp_postgres(request: pytest.FixtureRequest, dp_dsn: str) -> Iterator[DistributedProcessor]:
    """A :class:`~core.DistributedProcessor` on ``dp_dsn`` (``connect_timeout=5`` unless ``dp_options`` says)."""
    with DistributedProcessor(dp_dsn, **{"connect_timeout": 5, **processor_options(request)}) as processor:
        yield processor
