"""The state of an in-memory queue: the records, the key and queue limits, the instance registry, the flow
tables (templates, runs, edges: :class:`FlowTables`), the clock.

:class:`MemoryTables` is to in-memory processors what one database is to real ones: several processors
over the same tables are several instances sharing one queue. One lock guards everything; each store
operation holds it for its whole length, so each is atomic, as one statement (or one transaction) is.

The indexes mirror the real table's partial indexes: pending records per queue, in claim order, keyed ones
only at the head of their key (the others cannot be claimed before it); in-flight records; per key its
pending, processing and failed records.
"""

from __future__ import annotations

import re
import threading
import uuid
from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from core.constants import FINAL_STATUSES
from core.errors import ConfigurationError
from core.floors import Position
from core.testing.clock import Clock, FakeClock, SystemClock
from core.testing.control import MemoryControl

_EARLIEST = datetime(1, 1, 1, tzinfo=timezone.utc)
# The claim counts a key's records in flight up to this many (a LIMIT in the statement).
INFLIGHT_COUNT_CAP = 1000


@dataclass(eq=False)
class Row:
    """One record, with the columns of ``processing_queue`` the behaviour depends on."""

    id: int
    queue: str
    payload: str  # JSON text, as JSONB would return it
    priority: int
    run_at: datetime
    max_attempts: int
    created_at: datetime
    ordering_key: str | None = None
    dedupe_key: str | None = None
    dedupe_while: str | None = None
    dedupe_held: bool = False
    status: str = "pending"
    attempts: int = 0
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    lease_expires_at: datetime | None = None
    lease_token: uuid.UUID | None = None
    last_error: str | None = None
    cancel_requested: bool = False
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    # A flow step's record (core/testing/flows.py): its run, step, element of a for_each step (-1: the
    # placeholder not fanned out yet), while 'waiting' its count of unfinished parents, and the result its
    # completion wrote (JSON text; None: NULL).
    flow_run_id: int | None = None
    step: str | None = None
    flow_index: int | None = None
    waiting_on: int = 0
    result: str | None = None
    # The W3C trace context of the add_records or start_flow that wrote it (core/tracing.py; None: NULL).
    trace_context: str | None = None

    def position(self) -> Position:
        return (-self.priority, self.run_at, self.id)


@dataclass
class KeyRows:
    """The records of one ordering key the claim rules look at (ids sorted where order matters)."""

    pending: list[int] = field(default_factory=list)
    processing: set[int] = field(default_factory=set)
    failed: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.pending or self.processing or self.failed)


@dataclass(frozen=True)
class KeyLimit:
    """A ``set_key_concurrency`` row: an exact key or a glob (``*``, ``?``; nothing else is special)."""

    pattern: str
    exact: bool
    limit: int
    block_on_failure: bool
    regex: re.Pattern[str]

    @classmethod
    def build(cls, pattern: str, limit: int, block_on_failure: bool) -> KeyLimit:
        glob = any(c in pattern for c in "*?")
        parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
        return cls(pattern, not glob, limit, block_on_failure, re.compile("".join(parts), re.DOTALL))


@dataclass(eq=False)
class RunRow:
    """A ``flow_runs`` row, and the ids of its records (the flow index of processing_queue)."""

    id: int
    flow: str
    version: int
    input: str  # JSON text, as JSONB would return it
    dedupe_key: str | None
    created_at: datetime
    updated_at: datetime
    status: str = "running"
    failed_step: str | None = None
    error: str | None = None
    on_failure_id: int | None = None
    finished_at: datetime | None = None
    records: list[int] = field(default_factory=list)
    trace_context: str | None = None  # the start's, copied to the records the run adds later


@dataclass(frozen=True)
class Edge:
    """A ``flow_edges`` row: ``child`` waits for ``parent``."""

    parent: int
    child: int
    run: int
    each: bool
    run_on_failure: bool


@dataclass
class FlowTables:
    """Migration 0010's tables: templates by (name, version) as (hash, definition), runs, edges by parent and
    by child (a step's result is on its record)."""

    templates: dict[tuple[str, int], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    runs: dict[int, RunRow] = field(default_factory=dict)
    children: dict[int, list[Edge]] = field(default_factory=dict)
    parents: dict[int, list[Edge]] = field(default_factory=dict)


def _remove(items: list[Any], value: Any) -> None:
    i = bisect_left(items, value)
    if i < len(items) and items[i] == value:
        del items[i]


class MemoryTables:
    """The shared state of in-memory processors (see the module docstring). Pass the same tables to several
    ``InMemoryProcessor(tables=...)`` for several instances of one queue; their clock is the tables'."""

    def __init__(self, clock: Clock | None = None) -> None:
        if clock is not None and not callable(getattr(clock, "now", None)):
            raise ConfigurationError("clock must have a now() method returning a timezone-aware datetime")
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.lock = threading.Lock()  # guards everything below; store operations hold it throughout
        self.rows: dict[int, Row] = {}
        self.next_id = 1
        self.dedupe: dict[tuple[str, str], int] = {}  # (queue, dedupe_key) -> the record holding it
        self.key_limits: dict[str, KeyLimit] = {}
        self.queue_limits: dict[str, int] = {}
        self.instances: dict[str, dict[str, Any]] = {}
        self.processing: set[int] = set()
        self.finished: Counter[tuple[str, str]] = Counter()
        self._pending: dict[str, set[int]] = {}
        self._claimable: dict[str, list[Position]] = {}  # per queue, claim order: keyless and key heads
        self._keys: dict[str, KeyRows] = {}
        self._waiting: dict[str, set[int]] = {}  # flow steps waiting for their parents, per queue
        self.flows = FlowTables()
        self.control = MemoryControl()  # paused queues, rate buckets, schedules
        self.rate_wait: float | None = None  # the last pick's: seconds until a rate-limited bucket has a token
        # Wake-ups for idle runs (inserts, keyed completions, the clock moving): a generation counter.
        self._news = threading.Condition(threading.Lock())
        self.generation = 0
        if isinstance(self.clock, FakeClock):
            self.clock.watch(self)

    def now(self) -> datetime:
        return self.clock.now().astimezone(timezone.utc)

    # ------------------------------------------------------------------ wake-ups

    def changed(self) -> None:
        with self._news:
            self.generation += 1
            self._news.notify_all()

    clock_moved = changed  # a FakeClock's advance may have made records due

    def wait_change(self, seen: int, timeout: float, interrupted: threading.Event) -> int:
        """Wait up to ``timeout`` for a change after generation ``seen`` (or ``interrupted``)."""
        with self._news:
            self._news.wait_for(lambda: self.generation != seen or interrupted.is_set(), max(0.0, timeout))
            return self.generation

    def interrupt(self) -> None:
        with self._news:
            self._news.notify_all()

    # ------------------------------------------------------------------ indexes (callers hold the lock)

    def insert(self, row: Row) -> None:
        self.rows[row.id] = row
        self._index(row)

    def move(self, row: Row, status: str, run_at: datetime | None = None) -> None:
        """Change a row's status (and run_at), keeping every index right."""
        self._unindex(row)
        row.status = status
        if run_at is not None:
            row.run_at = run_at
        self._index(row)

    def delete(self, row: Row) -> None:
        self._unindex(row)
        self.drop_dedupe(row)
        del self.rows[row.id]

    def drop_dedupe(self, row: Row) -> None:
        """The row no longer holds its dedupe key (``dedupe_held = false``)."""
        if row.dedupe_held and row.dedupe_key is not None:
            slot = (row.queue, row.dedupe_key)
            if self.dedupe.get(slot) == row.id:
                del self.dedupe[slot]
        row.dedupe_held = False

    def _key(self, key: str) -> KeyRows:
        rows = self._keys.get(key)
        if rows is None:
            rows = self._keys[key] = KeyRows()
        return rows

    def _add_claimable(self, row: Row) -> None:
        insort(self._claimable.setdefault(row.queue, []), row.position())

    def _drop_claimable(self, row: Row) -> None:
        _remove(self._claimable.get(row.queue, []), row.position())

    def _index(self, row: Row) -> None:
        key, status = row.ordering_key, row.status
        if status == "pending":
            self._pending.setdefault(row.queue, set()).add(row.id)
            if key is None:
                self._add_claimable(row)
                return
            rows = self._key(key)
            head = rows.pending[0] if rows.pending else None
            insort(rows.pending, row.id)
            if head is None or row.id < head:  # the key's new head: the old one waits behind it now
                if head is not None:
                    self._drop_claimable(self.rows[head])
                self._add_claimable(row)
        elif status == "processing":
            self.processing.add(row.id)
            if key is not None:
                self._key(key).processing.add(row.id)
        elif status == "waiting":
            self._waiting.setdefault(row.queue, set()).add(row.id)
        else:
            if status in FINAL_STATUSES:
                self.finished[(row.queue, status)] += 1
            if status == "failed" and key is not None:
                insort(self._key(key).failed, row.id)

    def _unindex(self, row: Row) -> None:
        key, status = row.ordering_key, row.status
        if status == "pending":
            self._pending[row.queue].discard(row.id)
            if key is None:
                self._drop_claimable(row)
                return
            rows = self._keys[key]
            was_head = rows.pending[0] == row.id
            _remove(rows.pending, row.id)
            if was_head:
                self._drop_claimable(row)
                if rows.pending:
                    self._add_claimable(self.rows[rows.pending[0]])
        elif status == "processing":
            self.processing.discard(row.id)
            if key is not None:
                self._keys[key].processing.discard(row.id)
        elif status == "waiting":
            self._waiting[row.queue].discard(row.id)
        else:
            if status in FINAL_STATUSES:
                self.finished[(row.queue, status)] -= 1
                if not self.finished[(row.queue, status)]:
                    del self.finished[(row.queue, status)]
            if status == "failed" and key is not None:
                _remove(self._keys[key].failed, row.id)
        if key is not None:
            left = self._keys.get(key)
            if left is not None and left.empty():
                del self._keys[key]

    # ------------------------------------------------------------------ what claims and counts read

    def pending_ids(self, queue: str) -> set[int]:
        return self._pending.get(queue, set())

    def waiting_ids(self) -> dict[str, set[int]]:
        """The waiting flow records per queue."""
        return self._waiting

    def pending_queues(self) -> list[str]:
        return [q for q, ids in self._pending.items() if ids]

    def key_rule(self, key: str, default_limit: int, default_block: bool) -> tuple[int, bool]:
        """The limit and block_on_failure of ``key``: an exact key wins over patterns, a longer pattern over
        a shorter one (ties: the pattern first in sort order); no match, the processor's defaults."""
        exact = self.key_limits.get(key)
        if exact is not None and exact.exact:
            return exact.limit, exact.block_on_failure
        best: KeyLimit | None = None
        for rule in self.key_limits.values():
            if rule.exact or not rule.regex.fullmatch(key):
                continue
            if best is None or (-len(rule.pattern), rule.pattern) < (-len(best.pattern), best.pattern):
                best = rule
        return (best.limit, best.block_on_failure) if best is not None else (default_limit, default_block)

    def key_allows(self, row: Row, default_limit: int, default_block: bool) -> bool:
        """The claim's key rules: no earlier pending record of the key (in any queue), fewer than its limit
        in flight, and when the key blocks on failure, no earlier failed record of it."""
        key = row.ordering_key
        if key is None:
            return True
        rows = self._keys[key]
        if rows.pending and rows.pending[0] < row.id:
            return False
        limit, blocks = self.key_rule(key, default_limit, default_block)
        if min(len(rows.processing), INFLIGHT_COUNT_CAP) >= limit:
            return False
        return not (blocks and rows.failed and rows.failed[0] < row.id)

    def pick(self, queues: list[str], size: int, now: datetime, default_limit: int,
             default_block: bool) -> list[Row]:
        """The records a claim takes: per queue the first ``size`` due and allowed in claim order, then the
        first ``size`` of those by priority DESC, run_at, id. Reads only: like the statement, it judges
        every record by the state before the claim (one record per key at most)."""
        found: list[Row] = []
        control, waits = self.control, list[float]()
        for queue in queues:
            if control.is_paused(queue, now):  # a paused queue gives nothing
                continue
            cap = control.queue_cap(queue, now)  # a rate-limited queue no more than its tokens
            positions = self._claimable.get(queue)
            taken, i, limit = 0, 0, size if cap is None else min(size, cap)
            while positions and i < len(positions) and taken < limit:
                neg_priority, run_at, rid = positions[i]
                if run_at > now:  # the rest of this priority is due later still: on to the next priority
                    i = bisect_left(positions, (neg_priority + 1, _EARLIEST, 0), i)
                    continue
                row = self.rows[rid]
                if self.key_allows(row, default_limit, default_block) and (
                        row.ordering_key is None or not control.key_rates
                        or control.key_token(row.ordering_key, now, waits)):
                    found.append(row)
                    taken += 1
                i += 1
        found.sort(key=Row.position)
        found = found[:size]
        if control.queue_rates:
            control.charge(queues, Counter(r.queue for r in found), now, waits)
        self.rate_wait = min(waits, default=None)
        return found
