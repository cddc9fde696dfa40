"""DSN handling: resolution from the environment, validation, and redaction for logs."""

from __future__ import annotations

import os
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from core.errors import ConfigurationError

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

# libpq keepalives and a TCP user timeout so that a half-open connection is noticed in seconds, not hours.
KEEPALIVE_KWARGS: dict[str, object] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
}


def redact(dsn: str | None) -> str:
    """Return ``dsn`` with any password replaced by ``***``; safe to log."""
    if not dsn:
        return ""
    out = _URL_PASSWORD.sub(r"\1***\3", dsn)
    return _KV_PASSWORD.sub(r"\1***", out)


def resolve_dsn(dsn: str | None) -> str:
    """Use ``dsn``, else ``DATABASE_URL``; validate its syntax without connecting."""
    value = dsn if dsn is not None else os.environ.get("DATABASE_URL")
    if not value:
        raise ConfigurationError("no database configured: pass dsn= or set DATABASE_URL")
    try:
        conninfo_to_dict(value)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"malformed DSN {redact(value)!r}: {exc}") from None
    return value
