"""The dashboard's ASGI app: the registered pages (GET) and actions (POST) as routes, the vendored static files,
Jinja2 templates with autoescape on, and the guard (core/web/security.py) around all of it.

Views run on Starlette's thread pool (the stores are synchronous); every error a request can cause is a page
with its status and message: 400 for a bad value, 404 for an unknown record, 503 for a database that does not
answer in time. Never a 500 for bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import psycopg
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core.constants import VERSION
from core.errors import DatabaseUnavailable, InvalidArgument, SchemaNotMigrated
from core.web import actions, charts
from core.web import flowpages as flowpages  # registers the flow pages and their action
from core.web.filters import BadRequest, NotFound
from core.web.memsource import MemorySource
from core.web.pages import PAGES, Options, Page, View, flash
from core.web.pgsource import PostgresSource
from core.web.security import Auth, Guard, check_auth
from core.web.source import Source

HERE = Path(__file__).resolve().parent
MAX_FORM = 1 << 20  # a form of 10,000 ids is about 100 KB


def source_for(processor: Any) -> Source:
    """The source that reads ``processor``'s store: in memory, or PostgreSQL (one database or shards)."""
    if hasattr(processor.store, "tables"):
        return MemorySource(processor)
    return PostgresSource(processor)


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(count=charts.count, age=charts.age, ts=charts.timestamp, ago=charts.since,
                       ahead=charts.ahead, number=charts.number, plain=charts.plain, span=charts.span)
    return env


class Dashboard:
    """The routes' shared state: the processor, the options, the templates."""

    def __init__(self, processor: Any, options: Options) -> None:
        self.processor = processor
        self.options = options
        self.env = templates()
        self.pages = [p for p in PAGES if p.available(processor)]

    def view(self, request: Request, form: FormData | None = None) -> View:
        return View(request, self.processor, source_for(self.processor), self.options, form or FormData())

    def render(self, v: View, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        current = request_page(v.request)
        base = {"v": v, "url": v.url, "static": v.static, "nav": [p for p in self.pages if p.nav],
                "page": current.name if current else "", "read_only": self.options.read_only,
                "hide_payloads": self.options.hide_payloads, "down": v.source.down, "flash": flash(v.params),
                "version": VERSION, "title": current.title if current else "dproc"}
        return HTMLResponse(self.env.get_template(template).render({**base, **context}), status)

    def failure(self, v: View, exc: Exception) -> HTMLResponse | None:
        """The error page of an exception a request may cause, or None for a bug."""
        if isinstance(exc, (BadRequest, InvalidArgument, psycopg.DataError)):
            status, title = 400, "Bad request"
        elif isinstance(exc, NotFound):
            status, title = 404, "Not found"
        elif isinstance(exc, psycopg.errors.QueryCanceled):
            status, title = 503, "Took too long"
            exc = Exception("the query ran past its time limit; narrow the filter and try again")
        elif isinstance(exc, (DatabaseUnavailable, SchemaNotMigrated)):
            status, title = 503, "Database unavailable"
        else:
            return None
        message = " ".join(str(exc).split())[:500] or title
        return self.render(v, "error.html", {"status": status, "error_title": title, "message": message}, status)

    def page(self, page: Page, request: Request) -> Response:
        v = self.view(request)
        try:
            return self.render(v, f"{page.name}.html", page.view(v))
        except Exception as exc:
            answer = self.failure(v, exc)
            if answer is None:
                raise
            return answer

    def act(self, handler: Any, request: Request, form: FormData) -> Response:
        v = self.view(request, form)
        try:
            result = handler(v)
        except Exception as exc:
            answer = self.failure(v, exc)
            if answer is None:
                raise
            return answer
        if isinstance(result, actions.Redirect):
            return RedirectResponse(result.url, status_code=303)
        return self.render(v, result.template, result.context)


def request_page(request: Request) -> Page | None:
    name = request.scope.get("route_name")
    return next((p for p in PAGES if p.name == name), None)


def _page_route(d: Dashboard, page: Page) -> Route:
    async def endpoint(request: Request) -> Response:
        request.scope["route_name"] = page.name
        return await run_in_threadpool(d.page, page, request)

    return Route(page.path, endpoint, methods=["GET"], name=page.name)


def _action_route(d: Dashboard, act: actions.Action) -> Route:
    async def endpoint(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_FORM:
            return HTMLResponse("form too large", 413)
        try:
            fields: list[tuple[str, Any]] = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                                      max_num_fields=20_000)
        except (UnicodeDecodeError, ValueError):
            return HTMLResponse("malformed form", 400)
        form = FormData(fields)
        return await run_in_threadpool(d.act, act.handler, request, form)

    return Route(act.path, endpoint, methods=["POST"], name=act.name)


def build(processor: Any, *, read_only: bool = False, auth: Auth = None, hide_payloads: bool = False) -> Starlette:
    """The app (see :func:`core.web.dashboard`)."""
    check_auth(auth)
    d = Dashboard(processor, Options(read_only=read_only, hide_payloads=hide_payloads))
    routes: list[BaseRoute] = [_action_route(d, a) for a in actions.ACTIONS if a.available(processor)]
    routes += [_page_route(d, p) for p in d.pages]
    routes.append(Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"))
    app = Starlette(routes=routes, middleware=[Middleware(Guard, auth=auth, read_only=read_only)])
    app.state.dashboard = d
    return app
