"""Fixtures of the dashboard's tests: the app over a real database (one, three shards, or memory), a client,
a dashboard served by uvicorn on a free loopback port, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import httpx
import pytest
import uvicorn

from core import DistributedProcessor
from core.testing.postgres import Clones
from core.web import dashboard
from tests.support import wait_until

ORIGIN = "http://testserver"
CHROMIUM = os.environ.get("DP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class Web:
    """A blocking client of an ASGI app in this process (httpx's ASGI transport on an event loop of its own
    thread), following redirects unless told not to; app exceptions are raised, not turned into 500s."""

    def __init__(self, app: Any) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN,
                                        follow_redirects=True)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            return await self.client.request(method, url, **kw)

        return self.portal.call(call)

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def head(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("HEAD", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)

    def __enter__(self) -> Web:
        return self

    def __exit__(self, *exc: object) -> None:
        self.portal.call(self.client.aclose)
        self._portal_cm.__exit__(None, None, None)


@pytest.fixture
def web(processor: DistributedProcessor) -> Iterator[Web]:
    """A client of the dashboard of ``processor`` (a fresh, migrated database)."""
    with Web(dashboard(processor)) as client:
        yield client


def client_of(app: Any) -> Web:
    return Web(app)


def post(client: Web, path: str, data: Any, **kw: Any) -> httpx.Response:
    """A same-origin POST, as the dashboard's own forms send it."""
    return client.post(path, data=data, headers={"Origin": ORIGIN, **kw.pop("headers", {})},
                       follow_redirects=False, **kw)


@pytest.fixture
def shards(dp_server: Any, dp_clones: Clones) -> Iterator[DistributedProcessor]:
    """A processor over three shards: three fresh databases of the test server."""
    names: list[str] = []
    try:
        for _ in range(3):  # one at a time: a failed take leaves the ones before it in names, to drop
            names.append(dp_clones.take())
        with DistributedProcessor(shards=[dp_server.dsn_for(n) for n in names], connect_timeout=5) as p:
            p.migrate()
            yield p
    finally:
        for name in names:
            dp_clones.drop(name)


class Served:
    """An app served by uvicorn in a thread on a free loopback port (the socket bound first: no race for the
    port); stopped on exit, also when the test failed."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="dp-test-dashboard")

    def __enter__(self) -> Served:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=15, message="uvicorn started")
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[[Any], Served]]:
    """``serve(app)``: the app served until the test ends."""
    started: list[Served] = []

    def start(app: Any) -> Served:
        served = Served(app).__enter__()
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.__exit__(None, None, None)


# For this package's tests only: while Playwright's synchronous API is started, the main thread reports a
# running event loop, and asyncio.run() in any later test would fail.
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright (never a downloaded browser). Missing: skipped, but under CI
    (``CI`` set) a failure: CI installs it and must run these tests."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}: CI must install it (apt-get install chromium)")
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium); browser tests skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser page (its own context: no cookie or cache shared between tests); an alert() or any
    script error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    problems: list[str] = []
    tab.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    try:
        yield tab
        assert problems == []
    finally:
        context.close()
