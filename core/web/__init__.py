"""The web dashboard (extra ``[web]``: Starlette, Jinja2, uvicorn): ``dproc dashboard``, or mounted in your own
ASGI app with :func:`dashboard`. See docs/dashboard.md.

Importing :mod:`core` never imports this package: its dependencies are optional.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette

from core.web.app import build
from core.web.security import Auth

__all__ = ["dashboard"]


def dashboard(processor: Any, *, read_only: bool = False, auth: Auth = None, hide_payloads: bool = False) -> Starlette:
    """The dashboard of ``processor`` as an ASGI app (Starlette), to serve or to mount under any path.

    ``auth``: None (the host app's own auth protects the mount), ``(user, password)`` for basic auth, or a
    callable given the Starlette request that returns (or awaits) whether it may pass. ``read_only`` hides
    every action and refuses every POST; ``hide_payloads`` never shows a record's payload.
    """
    return build(processor, read_only=read_only, auth=auth, hide_payloads=hide_payloads)
