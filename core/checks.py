"""Argument checks of the public API: bad input becomes a typed error before anything is written."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from core.backend import NewRecords
from core.errors import InvalidArgument
from core.payloads import check_payloads
from core.record import Record

MAX_BATCH = 10_000
MAX_QUEUE_NAME = 200
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds (ValueError otherwise)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 45s, 30m, 12h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_optional_duration(text: str) -> float | None:
    """A duration, or ``none`` / ``off`` for no limit."""
    return None if text.strip().lower() in ("none", "off", "never", "") else parse_duration(text)


def seconds_or_none(name: str, value: object) -> float | None:
    """A number of seconds (or a timedelta) above zero, or None; ConfigurationError-free: InvalidArgument."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, a timedelta or None, got {value!r}")
    return float(value)


def positive_int(name: str, value: object, *, allow_zero: bool = False, maximum: int | None = None) -> int:
    """``value`` as an int of at least 1 (or 0), else :class:`InvalidArgument` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if value < low:
        raise InvalidArgument(f"{name} must be >= {low}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{name} must be <= {maximum}, got {value}")
    return value


def check_queue_name(value: object, error: type[Exception] = InvalidArgument) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_QUEUE_NAME:
        raise error(f"queue must be a non-empty string of at most {MAX_QUEUE_NAME} characters")
    return value


def check_queues(queues: Sequence[str] | str | None, default: str) -> list[str]:
    """The queues a claim or a run reads (``default`` when none is named), without duplicates."""
    if queues is None:
        return [default]
    if isinstance(queues, str):
        queues = [queues]
    out = list(dict.fromkeys(queues))
    if not out or any(not isinstance(q, str) or not q for q in out):
        raise InvalidArgument("queues must be a non-empty list of non-empty strings")
    return out


def per_record(name: str, value: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if value is None:
        return [None] * n
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{name} must not be empty")
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InvalidArgument(f"{name} has {len(values)} entries for {n} payloads")
    for i, v in enumerate(values):
        if v is not None and (not isinstance(v, str) or not v):
            raise InvalidArgument(f"{name}[{i}] must be a non-empty string or None")
    return values


def check_records(records: Iterable[Record]) -> list[Record]:
    batch = list(records)
    for r in batch:
        if not isinstance(r, Record):
            raise InvalidArgument(f"expected Record objects, got {type(r).__name__}")
    return batch


def check_new_records(
    payloads: Iterable[dict[str, Any]],
    *,
    queue: str,
    priority: int,
    run_at: datetime | None,
    delay: float | None,
    max_attempts: int,
    ordering_key: str | Sequence[str | None] | None,
    dedupe_key: str | Sequence[str | None] | None,
    dedupe_while: str,
    now: datetime,
) -> NewRecords:
    """The arguments of ``add_records``, checked, one entry per payload."""
    items = list(payloads)
    check_payloads(items)
    n = len(items)
    check_queue_name(queue)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
        raise InvalidArgument(f"priority must be a 32-bit integer, got {priority!r}")
    attempts_cap = positive_int("max_attempts", max_attempts)
    if run_at is not None and delay is not None:
        raise InvalidArgument("give run_at or delay, not both")
    if delay is not None:
        if delay < 0:
            raise InvalidArgument("delay must be >= 0")
        run_at = now + timedelta(seconds=delay)
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
        raise InvalidArgument("run_at must be a timezone-aware datetime")
    if dedupe_while not in ("pending", "active"):
        raise InvalidArgument(f"dedupe_while must be 'pending' or 'active', got {dedupe_while!r}")
    if isinstance(dedupe_key, str) and n > 1:
        raise InvalidArgument("a single dedupe_key string is only allowed for a one-record batch; pass a list")
    keys = per_record("ordering_key", ordering_key, n)
    dedupes = per_record("dedupe_key", dedupe_key, n)
    return NewRecords(items, queue, priority, run_at, attempts_cap, keys, dedupes, dedupe_while)
