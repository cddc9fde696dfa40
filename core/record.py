"""The records handed to callers: a claimed :class:`Record`, the ids of an insert (:class:`AddResult`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple


class Record(NamedTuple):
    """A record claimed by this instance. ``lease_token`` fences every later update of it.

    Immutable (a named tuple: built once per claimed row, several times cheaper than a frozen dataclass).
    """

    id: int
    queue: str
    payload: dict[str, Any]
    priority: int
    attempts: int
    max_attempts: int
    lease_token: uuid.UUID
    claimed_at: datetime
    lease_expires_at: datetime
    run_at: datetime
    created_at: datetime
    ordering_key: str | None = None
    dedupe_key: str | None = None
    cancel_requested: bool = False
    shard: int = 0  # the number of the shard it was claimed from (0 without shards)
    # A flow step's record (core/flows/): its run's id, its step's name and its parents' results by step name
    # ({} for a first step); None outside flows.
    flow_run: int | None = None
    step: str | None = None
    parents: dict[str, Any] | None = None
    # A flow step's result as JSON text, set by the worker when the step returns: its completion stores it.
    result: str | None = None
    # The trace context stored by the ``add_records`` (or a flow step's ``start_flow``) that added it
    # (core/tracing.py: a W3C traceparent, then a space and its tracestate when there is one); None without one.
    # Every attempt sees the original one.
    trace_context: str | None = None

    @property
    def is_last_attempt(self) -> bool:
        return self.attempts >= self.max_attempts


_RESULT = Record._fields.index("result")


def with_result(record: Record, result: str | None) -> Record:
    """``record`` with its flow step's ``result`` set: ``_replace`` without its keyword machinery (once per flow
    step, on the worker's path)."""
    return tuple.__new__(Record, (*record[:_RESULT], result, *record[_RESULT + 1:]))


def format_error(error: BaseException | str, limit: int = 2000) -> str:
    """``Type: message`` truncated to ``limit`` characters, for ``last_error``."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    # PostgreSQL text cannot hold NUL: a message with one must not make the failure itself fail.
    text = text.replace("\x00", "\\x00")
    if len(text) > limit:
        text = text[: limit - 14] + " …[truncated]"
    return text


class AddResult(list[int]):
    """The ids of an ``add_records`` call in input order; ``deduplicated`` lists the input indexes whose
    dedupe key was already held (their id is the existing record's)."""

    deduplicated: list[int]

    def __init__(self, ids: Iterable[int] = (), deduplicated: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.deduplicated = list(deduplicated)


class Claimed(list[Record]):
    """The records a claim took, in claim order; ``rate_wait``: when a rate-limited queue or key had no token
    left for more, the seconds until it has one (None otherwise)."""

    rate_wait: float | None = None
