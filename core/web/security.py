"""The dashboard's guard, an ASGI middleware around every request: authentication, actions only by a
same-origin POST (refused altogether when read-only), and the security headers on every response.

Why each: a dashboard can retry, cancel and delete records, so a page of another site must not be able to
make a logged-in browser do it (the Origin / Sec-Fetch-Site check: SameSite cookies do not cover basic auth),
frame it (X-Frame-Options, frame-ancestors) or run script in it (a strict Content-Security-Policy, besides
the templates escaping every value); and no page is worth caching on a shared machine (no-store).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# None, (user, password) for basic auth, or a callable given the request that answers whether it may pass
Auth = tuple[str, str] | Callable[[Request], bool | Awaitable[bool]] | None

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
_NAMES = {name for name, _ in HEADERS}
REALM = 'Basic realm="dproc dashboard", charset="UTF-8"'


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str, source: str) -> tuple[str, str]:
    """``user:password`` (the password may hold colons) into a pair; a clear error otherwise."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source} must be user:password (both non-empty)")
    return user, password


def basic_auth_ok(header: str | None, expected: tuple[str, str]) -> bool:
    """Whether an Authorization header carries the expected basic credentials; both parts compared in
    constant time, whatever the first comparison said."""
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    user_ok = hmac.compare_digest(user.encode(), expected[0].encode())
    password_ok = hmac.compare_digest(password.encode(), expected[1].encode())
    return user_ok & password_ok


def same_origin(request: Request) -> bool:
    """A POST from one of the dashboard's own pages: the browser says so (Sec-Fetch-Site), or its Origin is
    this host. A request saying neither is refused (every browser sends Origin with a POST)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    if not origin or not host or origin == "null":
        return False
    return origin.rstrip("/").lower() in (f"http://{host}".lower(), f"https://{host}".lower())


def check_auth(auth: Auth) -> None:
    if isinstance(auth, tuple) and (len(auth) != 2 or not all(isinstance(p, str) and p for p in auth)):
        raise ValueError("auth must be (user, password), both non-empty strings, or a callable")
    if auth is not None and not isinstance(auth, tuple) and not callable(auth):
        raise ValueError("auth must be None, (user, password) or a callable taking the request")


class Guard:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, auth: Auth = None, read_only: bool = False) -> None:
        check_auth(auth)
        self.app = app
        self.auth = auth
        self.read_only = read_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
                message = {**message, "headers": [*kept, *HEADERS]}
            await send(message)

        refusal = await self.refusal(Request(scope))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    async def refusal(self, request: Request) -> Response | None:
        """The response refusing this request, or None when it may pass."""
        if isinstance(self.auth, tuple):
            if not basic_auth_ok(request.headers.get("authorization"), self.auth):
                return PlainTextResponse("authentication required\n", 401, {"WWW-Authenticate": REALM})
        elif self.auth is not None:
            allowed: Any = self.auth(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                return PlainTextResponse("forbidden\n", 403)
        method = request.method
        if method not in ("GET", "HEAD", "POST"):
            return PlainTextResponse("method not allowed\n", 405, {"Allow": "GET, HEAD, POST"})
        if method == "POST":
            if self.read_only:
                return PlainTextResponse("read-only dashboard: actions are disabled\n", 403)
            if not same_origin(request):
                return PlainTextResponse("cross-origin request refused\n", 403)
        return None
