"""``dproc dashboard``: the dashboard served by uvicorn. Refuses a bind beyond loopback without auth before
it connects to anything (a dashboard can retry, cancel and delete records)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from core.errors import ConfigurationError
from core.web.security import is_loopback, parse_credentials

log = logging.getLogger("core.web")
AUTH_ENV = "DP_DASHBOARD_AUTH"


def credentials(args: argparse.Namespace) -> tuple[str, str] | None:
    """Basic-auth credentials from ``--auth-file`` (a file holding ``user:password``), else ``DP_DASHBOARD_AUTH``."""
    path = getattr(args, "auth_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                content = fh.read()
        except OSError as exc:
            raise ConfigurationError(f"cannot read --auth-file {path}: {exc.strerror}") from None
        try:
            return parse_credentials(content, f"--auth-file {path}")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    raw = os.environ.get(AUTH_ENV)
    if raw:
        try:
            return parse_credentials(raw, AUTH_ENV)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    return None


def check(args: argparse.Namespace) -> tuple[str, str] | None:
    """The credentials, after refusing a public bind without them."""
    auth = credentials(args)
    if auth is None and not is_loopback(args.host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {args.host} without authentication: anyone who can reach it "
            f"could retry, cancel and delete records. Set {AUTH_ENV}=user:password or --auth-file FILE, "
            "or bind to 127.0.0.1")
    return auth


def serve(args: argparse.Namespace, make_processor: Callable[[], Any]) -> int:
    """Check the options, build the processor, serve until interrupted."""
    auth = check(args)
    import uvicorn

    from core.web import dashboard

    with make_processor() as processor:
        app = dashboard(processor, read_only=args.read_only, auth=auth, hide_payloads=args.hide_payloads)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        mode = " (read-only)" if args.read_only else ""
        print(f"dproc dashboard{mode} on http://{shown}:{args.port}/" + (" (basic auth)" if auth else ""),
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
