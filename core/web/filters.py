"""The dashboard's input: query and form values checked into typed filters, or a 400 with a message.

Nothing reaches a statement unchecked: a value the database would refuse (a NUL, an id past bigint) is a
bad request here, never a server error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from core.constants import FLOW_RUN_STATUSES, STATUSES

MAX_TEXT = 200  # queue names are at most 200 characters; keys and error searches get the same room
MAX_ID = 2**63 - 1
MAX_COUNT = 2**31 - 1  # a rate's n: an integer column
MAX_SECONDS = 1e10     # the longest duration the processor takes (core.checks.MAX_SECONDS)
UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_PART = re.compile(r"(\d{1,12}(?:\.\d{1,6})?)([smhd]?)")
ACTIVE = ("pending", "processing", "failed")
# What each bulk action can change, and so the records it is offered for (a flow step waiting for its
# parents can be cancelled: its run settles as for any cancelled step).
ACTION_STATUSES = {"retry": ("failed",), "cancel": ("pending", "processing", "failed", "waiting"),
                   "purge": ("completed", "failed", "cancelled")}


class BadRequest(Exception):
    """A value the dashboard cannot use: answered 400 with this message."""


class NotFound(Exception):
    """Answered 404."""


def text(params: Mapping[str, Any], name: str, max_length: int = MAX_TEXT) -> str | None:
    """An optional text value: empty is absent; control characters and overlong values are refused."""
    value = params.get(name)
    if value is None or value == "":
        return None
    value = str(value)
    if len(value) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    if any(ord(c) < 32 for c in value):
        raise BadRequest(f"{name} must not hold control characters")
    return value


def record_id(value: Any, name: str = "id") -> int:
    """A record id: a positive integer within bigint."""
    raw = str(value).strip()
    if not raw.isdigit() or not raw.isascii():
        raise BadRequest(f"{name} must be a positive integer, got {raw[:40]!r}")
    n = int(raw)
    if not 0 < n <= MAX_ID:
        raise BadRequest(f"{name} must be between 1 and {MAX_ID}")
    return n


def required(params: Mapping[str, Any], name: str, max_length: int = MAX_TEXT) -> str:
    """A text value that must be there (see :func:`text`)."""
    value = text(params, name, max_length)
    if value is None:
        raise BadRequest(f"{name} is required")
    return value


def count(params: Mapping[str, Any], name: str, maximum: int = MAX_COUNT) -> int:
    """A required positive integer up to ``maximum`` (a rate's n)."""
    raw = str(params.get(name) or "").strip().replace(",", "").replace("_", "")
    if not raw:
        raise BadRequest(f"{name} is required")
    if not raw.isdigit() or not raw.isascii() or len(raw) > 12:
        raise BadRequest(f"{name} must be a positive integer, got {raw[:40]!r}")
    n = int(raw)
    if not 0 < n <= maximum:
        raise BadRequest(f"{name} must be between 1 and {maximum:,}")
    return n


def duration(params: Mapping[str, Any], name: str) -> float | None:
    """An optional duration above zero, in seconds: ``90``, ``1.5``, ``90s``, ``30m``, ``2h``, ``1d``, or parts
    of them together (``1h 30m``); empty is absent."""
    value = params.get(name)
    if value is None or str(value).strip() == "":
        return None
    raw = str(value).strip().lower()
    compact = raw.replace(" ", "")
    parts = DURATION_PART.findall(compact) if len(compact) <= 40 else []
    if not parts or "".join(n + unit for n, unit in parts) != compact:
        raise BadRequest(f"{name} must be a duration such as 90, 90s, 30m, 2h or 1d, got {raw[:40]!r}")
    seconds = sum(float(n) * UNITS[unit] for n, unit in parts)
    if not 0 < seconds <= MAX_SECONDS:
        raise BadRequest(f"{name} must be above zero and at most {MAX_SECONDS:.0e} seconds")
    return seconds


def cursor_time(params: Mapping[str, Any]) -> int | None:
    """The finished_at part of a records page's cursor: microseconds since 1970, a non-negative integer."""
    value = params.get("at")
    if value is None or value == "":
        return None
    raw = str(value).strip()
    if not raw.isdigit() or not raw.isascii() or int(raw) > 253_402_300_799_000_000:  # 9999-12-31
        raise BadRequest(f"at must be a time in microseconds since 1970, got {raw[:40]!r}")
    return int(raw)


def optional_id(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    return None if value is None or value == "" else record_id(value, name)


def state(params: Mapping[str, Any]) -> str | None:
    value = text(params, "state")
    if value is not None and value not in STATUSES:
        raise BadRequest(f"unknown state {value[:40]!r}; the states are {', '.join(STATUSES)}")
    return value


@dataclass(frozen=True)
class RecordFilter:
    """The records page's filter (every field optional); ``run`` a flow run's id."""

    queue: str | None = None
    state: str | None = None
    key: str | None = None
    dedupe: str | None = None
    error: str | None = None
    run: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> RecordFilter:
        return cls(queue=text(params, "queue"), state=state(params), key=text(params, "key"),
                   dedupe=text(params, "dedupe"), error=text(params, "error"), run=optional_id(params, "run"))

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for links and the bulk forms' hidden fields)."""
        return {f.name: str(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def statuses(self, only: tuple[str, ...] | None = None) -> list[str] | None:
        """The states to read: the filter's, narrowed to ``only`` (an action's); None is every state."""
        chosen = [self.state] if self.state else None
        if only is None:
            return chosen
        return [s for s in (chosen or list(STATUSES)) if s in only]

    def indexed(self, statuses: list[str] | None) -> bool:
        """Whether an index finds the matches directly (no window walk): a flow run's records (the flow
        index, by id), a key with active states only, processing records (the lease index), waiting ones
        (the waiting index, by id)."""
        if self.run is not None:
            return True
        if statuses is None:
            return False
        if statuses in (["processing"], ["waiting"]):
            return True
        return self.key is not None and all(s in ACTIVE for s in statuses)

    def __bool__(self) -> bool:
        return bool(self.query())


DEFAULT_LIMIT = 50


def limit(params: Mapping[str, Any], default: int = DEFAULT_LIMIT, maximum: int = 500) -> int:
    value = params.get("limit")
    if value is None or value == "":
        return default
    n = record_id(value, "limit")
    if n > maximum:
        raise BadRequest(f"limit must be at most {maximum}")
    return n


def run_status(params: Mapping[str, Any]) -> str | None:
    value = text(params, "status")
    if value is not None and value not in FLOW_RUN_STATUSES:
        raise BadRequest(f"unknown run status {value[:40]!r}; a run is {', '.join(FLOW_RUN_STATUSES)}")
    return value


@dataclass(frozen=True)
class RunFilter:
    """The flows page's filter: a flow's name, a run's status (both optional)."""

    flow: str | None = None
    status: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> RunFilter:
        return cls(flow=text(params, "flow"), status=run_status(params))

    def query(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def __bool__(self) -> bool:
        return bool(self.query())
