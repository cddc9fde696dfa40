"""What PostgreSQL does to the values the real processor sends it, done the same way in memory.

The real processor's argument checks (:mod:`core.checks`, shared) let a few bad values through to the driver
or the server: a NUL character in a text value (``psycopg.DataError``), an integer past its column's range
(``NumericValueOutOfRange``), a registry status outside its check constraint (``CheckViolation``). The
in-memory processor raises the same exception classes with the same messages, so a test sees what
production would. Payloads come back as JSONB returns them (keys reordered, some numbers changed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import errors as pg_errors

INT4 = 2**31 - 1
INT8 = 2**63 - 1


def text(*values: object) -> None:
    """Refuse a NUL character in a text value, as psycopg does before anything reaches the server."""
    for value in values:
        if isinstance(value, str) and "\x00" in value:
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")


def json_text(*values: str | None) -> None:
    """Refuse text that is not JSON, as its cast to jsonb does (None is NULL)."""
    for value in values:
        if value is not None:
            try:
                json.loads(value)
            except ValueError:
                raise pg_errors.InvalidTextRepresentation("invalid input syntax for type json") from None


def int4(*values: int) -> None:
    for value in values:
        if not -INT4 - 1 <= value <= INT4:
            raise pg_errors.NumericValueOutOfRange("integer out of range")


def int8(*values: int) -> None:
    for value in values:
        if not -INT8 - 1 <= value <= INT8:
            raise pg_errors.NumericValueOutOfRange("bigint out of range")


def check_violation(table: str, constraint: str, row: Sequence[Any]) -> pg_errors.CheckViolation:
    """The server's error for a row that fails a check constraint (its DETAIL line names the row)."""
    values = ", ".join(_row_text(v) for v in row)
    return pg_errors.CheckViolation(f'new row for relation "{table}" violates check constraint "{constraint}"\n'
                                    f"DETAIL:  Failing row contains ({values}).")


def _row_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, datetime):
        return timestamp_text(value)
    if isinstance(value, dict | list):
        return json.dumps(value)  # jsonb's text: ", " and ": " between items
    return str(value)


def jsonb(value: Any) -> Any:
    """A decoded JSON value as JSONB gives it back: object keys shorter first, then by their UTF-8 bytes;
    a number written with a positive exponent (``1e+20``) comes back an integer, ``-0.0`` as ``0.0``."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
        return {k: jsonb(v) for k, v in items}
    if isinstance(value, list):
        return [jsonb(v) for v in value]
    if isinstance(value, float):
        written = repr(value)
        if "e+" in written:  # numeric prints it without exponent or point: json reads an int
            return int(Decimal(written))
        return 0.0 if value == 0 else value
    return value


def timestamp_text(value: datetime) -> str:
    """A timestamptz as the real processor's UTC sessions print it (``2026-12-01 13:24:06.5+00``)."""
    utc = value.astimezone(timezone.utc)
    out = utc.strftime("%Y-%m-%d %H:%M:%S")
    if utc.microsecond:
        out += f".{utc.microsecond:06d}".rstrip("0")
    return out + "+00"
