"""Argument checks of the public API: bad input becomes a typed error naming the argument, before anything is
sent to the database (``InvalidArgument``; payloads ``InvalidPayload`` naming the index).

What PostgreSQL cannot store is refused here rather than by the driver or the server: a NUL character or a
lone surrogate in text, an integer beyond its column (``integer``: 32 bits; ids ``bigint``: 64), a NaN or
infinite number of seconds, a key too long for its index entry.
"""

from __future__ import annotations

import json
import math
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
# An ordering or dedupe key is an index entry (with its status and id): a btree entry holds about 2,700 bytes.
MAX_KEY = 512
INT4 = 2**31 - 1
INT8 = 2**63 - 1
# Seconds an argument may name (a delay, an age, a timeout): about 300 years, far within PostgreSQL's interval.
MAX_SECONDS = 1e10
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds (ValueError otherwise)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 45s, 30m, 12h, 7d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_SECONDS:
        raise ValueError(f"duration {text!r} is longer than {MAX_SECONDS:.0e} seconds")
    return seconds


def parse_optional_duration(text: str) -> float | None:
    """A duration, or ``none`` / ``off`` for no limit."""
    return None if text.strip().lower() in ("none", "off", "never", "") else parse_duration(text)


def seconds(name: str, value: object, *, allow_zero: bool = True, allow_none: bool = False) -> float | None:
    """A finite number of seconds (a number or a timedelta) within ``MAX_SECONDS``: ``>= 0`` (``> 0`` without
    ``allow_zero``), or None with ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds or a timedelta, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{name} must be {'>=' if allow_zero else '>'} 0 seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise InvalidArgument(f"{name} must be at most {MAX_SECONDS:.0e} seconds, got {value!r}")
    return float(value)


def seconds_or_none(name: str, value: object) -> float | None:
    """A number of seconds (or a timedelta) above zero, or None."""
    return seconds(name, value, allow_zero=False, allow_none=True)


def positive_int(name: str, value: object, *, allow_zero: bool = False, maximum: int | None = None) -> int:
    """``value`` as an int of at least 1 (or 0) and at most ``maximum`` (default: a 32-bit column's)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if value < low:
        raise InvalidArgument(f"{name} must be >= {low}, got {value}")
    high = INT4 if maximum is None else maximum
    if value > high:
        raise InvalidArgument(f"{name} must be <= {high}, got {value}")
    return value


def new_priority(value: object) -> int:
    """A record's priority: a 32-bit integer (higher first)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value <= INT4:
        raise InvalidArgument(f"priority must be a 32-bit integer, got {value!r}")
    return value


def record_id(value: object, name: str = "id") -> int:
    """A record id: a positive 64-bit integer."""
    return positive_int(name, value, maximum=INT8)


def record_ids(values: Iterable[int], name: str = "ids") -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{name} must be a list of record ids, got {type(values).__name__}")
    return [record_id(v, "id") for v in values]


def text(name: str, value: object, *, max_length: int | None = None, allow_empty: bool = False) -> str:
    """A string PostgreSQL can store: no NUL character, no lone surrogate, non-empty, at most
    ``max_length`` characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgument(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidArgument(f"{name} must not contain a NUL character (PostgreSQL text cannot store it)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} contains a lone surrogate (half of a UTF-16 pair): not valid text") from None
    if max_length is not None and len(value) > max_length:
        raise InvalidArgument(f"{name} must be at most {max_length} characters, got {len(value)}")
    return value


def optional_text(name: str, value: object, **kw: Any) -> str | None:
    return None if value is None else text(name, value, **kw)


def check_queue_name(value: object, error: type[Exception] = InvalidArgument, name: str = "queue") -> str:
    try:
        return text(name, value, max_length=MAX_QUEUE_NAME)
    except InvalidArgument as exc:
        raise error(str(exc)) from None


def check_queues(queues: Sequence[str] | str | None, default: str) -> list[str]:
    """The queues a claim or a run reads (``default`` when none is named), without duplicates."""
    if queues is None:
        return [default]
    if isinstance(queues, str):
        queues = [queues]
    if not isinstance(queues, Iterable):
        raise InvalidArgument(f"queues must be a list of queue names, got {type(queues).__name__}")
    out = list(dict.fromkeys(queues))
    if not out:
        raise InvalidArgument("queues must name at least one queue")
    return [check_queue_name(q, name="queues[]") for q in out]


def keys(name: str, values: Iterable[str]) -> list[str]:
    """Ordering keys (to unblock): strings a key column can hold."""
    if isinstance(values, str | bytes):
        raise InvalidArgument(f"{name} must be a list of keys, not a string")
    return [text(f"{name}[]", v, max_length=MAX_KEY) for v in values]


def json_object(name: str, value: object) -> dict[str, Any]:
    """A dict that JSON can encode (instance metadata)."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{name} must be a dict, got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{name} is not JSON-serialisable: {exc}") from None
    text(name, encoded, allow_empty=True)
    if "\\u0000" in encoded:
        raise InvalidArgument(f"{name} must not contain a NUL character")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, got {type(value).__name__}")
    return value


def per_record(name: str, value: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if value is None:
        return [None] * n
    if isinstance(value, str):
        return [text(name, value, max_length=MAX_KEY)] * n
    if not isinstance(value, Sequence):
        raise InvalidArgument(f"{name} must be a string, a list of strings and Nones, or None")
    values = list(value)
    if len(values) != n:
        raise InvalidArgument(f"{name} has {len(values)} entries for {n} payloads")
    for i, v in enumerate(values):
        if v is not None:
            text(f"{name}[{i}]", v, max_length=MAX_KEY)
    return values


def check_records(records: Iterable[Record], name: str = "records") -> list[Record]:
    if isinstance(records, Record) or not isinstance(records, Iterable):
        raise InvalidArgument(f"{name} must be a list of Record objects, got {type(records).__name__}")
    batch = list(records)
    for i, r in enumerate(batch):
        if not isinstance(r, Record):
            raise InvalidArgument(f"{name}[{i}] must be a Record (as claimed), got {type(r).__name__}")
    return batch


def run_at_or_delay(run_at: datetime | None, delay: float | timedelta | None, now: datetime) -> datetime | None:
    if run_at is not None and delay is not None:
        raise InvalidArgument("give run_at or delay, not both")
    if delay is not None:
        return now + timedelta(seconds=seconds("delay", delay) or 0.0)
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None
                               or run_at.utcoffset() is None):
        raise InvalidArgument("run_at must be a timezone-aware datetime")
    return run_at


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
    if isinstance(payloads, dict | str | bytes) or not isinstance(payloads, Iterable):
        raise InvalidArgument(f"payloads must be a list of dicts, got {type(payloads).__name__}")
    items = list(payloads)
    if len(items) > MAX_BATCH * 100:
        raise InvalidArgument(f"payloads: at most {MAX_BATCH * 100:,} records per call, got {len(items):,}")
    check_payloads(items)
    n = len(items)
    check_queue_name(queue)
    new_priority(priority)
    attempts_cap = positive_int("max_attempts", max_attempts)
    run_at = run_at_or_delay(run_at, delay, now)
    if dedupe_while not in ("pending", "active"):
        raise InvalidArgument(f"dedupe_while must be 'pending' or 'active', got {dedupe_while!r}")
    if isinstance(dedupe_key, str) and n > 1:
        raise InvalidArgument("a single dedupe_key string is only allowed for a one-record batch; pass a list")
    ordering = per_record("ordering_key", ordering_key, n)
    dedupes = per_record("dedupe_key", dedupe_key, n)
    return NewRecords(items, queue, priority, run_at, attempts_cap, ordering, dedupes, dedupe_while)
