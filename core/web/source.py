"""What the dashboard's pages read, one method per need, over any processor's store.

:func:`core.web.app.source_for` picks the implementation: :class:`core.web.pgsource.PostgresSource` for a
:class:`core.DistributedProcessor` (one database, or every shard merged), :class:`core.web.memsource.MemorySource`
for the in-memory processor. A source is made per request: it collects which shards did not answer (``down``)
while the page still shows what the others said.

Cheap at any size: counts stop at a cap (shown as "10,000+", with the planner's estimate where it has one),
finished counts come from ``queue_stats``, and record lists walk down the ids window by window within a time
budget (a rare filter shows what the budget found and a link to search on) instead of scanning the table.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from core.errors import DatabaseUnavailable, SchemaNotMigrated
from core.health import holder_text
from core.web.filters import RecordFilter

COUNT_CAP = 10_000          # counts above it are shown as "10,000+" (or estimated)
WINDOW = 100_000            # ids read by one statement of a walk (about 15 ms beside 10 M rows)
PAGE_BUDGET = 0.04          # seconds a records page may walk windows for
CHART_CAP = 20_000          # finished records the chart reads at most
CHART_SPAN = 3600.0         # the chart's hour
CHART_BUCKET = 120.0        # seconds per bar
MAX_QUEUES = 500            # queues listed at most
NEIGHBOURS = 5              # records of a key shown on each side of one


@dataclass(frozen=True)
class Count:
    """A count up to a cap: ``capped`` means "at least ``value``"; ``estimate`` is the planner's guess then."""

    value: int
    capped: bool = False
    estimate: int | None = None

    @classmethod
    def of(cls, n: int, cap: int = COUNT_CAP, estimate: Callable[[], int | None] | None = None) -> Count:
        if n <= cap:
            return cls(n)
        return cls(cap, True, estimate() if estimate is not None else None)

    def __add__(self, other: Count) -> Count:
        guess = None
        if self.capped or other.capped:
            guess = (self.estimate or self.value) + (other.estimate or other.value)
        return Count(self.value + other.value, self.capped or other.capped, guess)


@dataclass
class QueueRow:
    """A queue's line on the overview and the queues page."""

    name: str
    pending: Count = Count(0)
    processing: Count = Count(0)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    oldest_due_age: float | None = None
    max_pending: int | None = None
    paused: dict[str, Any] | None = None

    def merge(self, other: QueueRow) -> None:
        """Add another shard's line of the same queue."""
        self.pending += other.pending
        self.processing += other.processing
        self.completed += other.completed
        self.failed += other.failed
        self.cancelled += other.cancelled
        ages = [a for a in (self.oldest_due_age, other.oldest_due_age) if a is not None]
        self.oldest_due_age = max(ages) if ages else None
        self.max_pending = self.max_pending if self.max_pending is not None else other.max_pending


@dataclass
class Chart:
    """Finished records per bucket over the last hour (bucket 0 the oldest); ``since`` is where the chart's
    data starts (later than the hour's start when the hour held more than the chart reads)."""

    start: datetime
    bucket_seconds: float
    buckets: list[dict[str, int]]
    since: datetime
    capped: bool = False


@dataclass
class RecordsPage:
    """One page of records, newest first. ``next_after``: the ``after`` of the next page (None at the end);
    ``searched_to``: when the page is short because the time budget ran out, the id the walk reached."""

    rows: list[dict[str, Any]]
    next_after: int | None
    searched_to: int | None = None


RECORD_COLUMNS = ("id", "queue", "status", "priority", "attempts", "max_attempts", "ordering_key", "dedupe_key",
                  "last_error", "run_at", "created_at", "updated_at", "finished_at", "claimed_by")
DETAIL_COLUMNS = ("id", "queue", "status", "priority", "attempts", "max_attempts", "ordering_key", "dedupe_key",
                  "dedupe_while", "dedupe_held", "key_blocked", "cancel_requested", "last_error", "run_at",
                  "created_at", "updated_at", "finished_at", "claimed_by", "claimed_at", "lease_expires_at",
                  "payload")


@dataclass
class Source(ABC):
    """The reads of one request (see the module docstring)."""

    processor: Any
    down: list[str] = field(default_factory=list)  # "shard 2: why", for the page's warning

    # ------------------------------------------------------------------ per backend

    @abstractmethod
    def queues(self) -> list[QueueRow]:
        """Every queue with records or settings, its counts (capped), oldest due age and limit."""

    @abstractmethod
    def finished_since(self, now: datetime, since: datetime) -> tuple[list[tuple[int, int, int, int]], datetime
                                                                       | None, bool]:
        """Bucketed finished records ((bucket from now, completed, failed, cancelled), the earliest time
        read, whether the cap stopped the read)."""

    @abstractmethod
    def id_range(self) -> tuple[int, int] | None:
        """The lowest and highest id held (None: no record)."""

    @abstractmethod
    def window(self, f: RecordFilter, statuses: list[str] | None, after: int, floor: int,
               limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` records matching with ``floor <= id < after``, newest first."""

    @abstractmethod
    def record(self, record_id: int, payload: bool) -> dict[str, Any] | None: ...

    @abstractmethod
    def neighbours(self, key: str, record_id: int) -> list[dict[str, Any]]:
        """The records of ``key`` its ordering rules look at, nearest ``record_id`` first on each side."""

    @abstractmethod
    def settings(self) -> list[dict[str, Any]]:
        """Queue limits and key concurrency rules."""

    @abstractmethod
    def purge(self, ids: list[int]) -> int:
        """Delete the finished records among ``ids``; how many went."""

    window_size = WINDOW

    def health_parts(self) -> tuple[dict[str, Any] | None, list[str]]:
        """What holds the MVCC horizon back (``processor.horizon()``: catalog views only, cheap at any size)
        and the reasons the dashboard shows health as degraded: shards down, a horizon held too long."""
        reasons = [f"{d.split(' (', 1)[0].split(':', 1)[0]} unreachable" for d in self.down]
        try:
            horizon = dict(self.processor.horizon())
        except (DatabaseUnavailable, SchemaNotMigrated) as exc:
            return None, [*reasons, f"horizon unknown: {' '.join(str(exc).split())[:200]}"]
        holder = horizon.get("holder")
        if "shards" in horizon:  # several databases: the worst holder, the dead row versions of all
            horizon["dead_tuples"] = sum(int(s.get("dead_tuples") or 0) for s in horizon["shards"])
        limit = getattr(self.processor.settings, "horizon_warning_seconds", None)
        if holder and limit is not None and holder["age_seconds"] > limit:
            reasons.append(f"MVCC horizon held back for {holder['age_seconds']:.0f}s by {holder_text(holder)}")
        return horizon, reasons

    def shards(self) -> list[dict[str, Any]]:
        return []

    # ------------------------------------------------------------------ shared

    def instances(self, include_stopped: bool = False) -> list[dict[str, Any]]:
        """The registry through the public API (cheap: a count over in-flight records per instance)."""
        return list(self.processor.list_instances(include_stopped=include_stopped))

    def paused(self) -> dict[str, dict[str, Any]]:
        """Paused queues ``{queue: {"until": ..., "reason": ...}}``, when the processor can pause queues.

        The one place the dashboard learns it: a processor with ``paused_queues()`` answers it."""
        read = getattr(self.processor, "paused_queues", None)
        if not callable(read):
            return {}
        return {str(q): dict(info or {}) for q, info in dict(read()).items()}

    def chart(self, now: datetime | None = None) -> Chart:
        now = now or datetime.now(timezone.utc)
        start = now - timedelta(seconds=CHART_SPAN)
        n = int(CHART_SPAN // CHART_BUCKET)
        rows, earliest, capped = self.finished_since(now, start)
        buckets = [{"completed": 0, "failed": 0, "cancelled": 0} for _ in range(n)]
        for back, completed, failed, cancelled in rows:
            if 0 <= back < n:
                b = buckets[n - 1 - back]
                b["completed"] += completed
                b["failed"] += failed
                b["cancelled"] += cancelled
        since = start
        if capped and earliest is not None:
            # The oldest bucket read is partial: it and those before it show nothing rather than too little.
            cut = n - 1 - int((now - earliest).total_seconds() // CHART_BUCKET)
            for i in range(max(0, cut + 1)):
                buckets[i] = {"completed": 0, "failed": 0, "cancelled": 0}
            since = start + timedelta(seconds=(cut + 1) * CHART_BUCKET)
        return Chart(start, CHART_BUCKET, buckets, since, capped)

    def records(self, f: RecordFilter, after: int | None, limit: int, *, budget: float = PAGE_BUDGET,
                only: tuple[str, ...] | None = None) -> RecordsPage:
        """A page of matching records below ``after``: window by window down the ids (or straight through an
        index that serves the filter) until the page is full, the ids end, or ``budget`` seconds passed."""
        span = self.id_range()
        statuses = f.statuses(only)
        if span is None or statuses == []:
            return RecordsPage([], None)
        low, high = span
        cursor = high + 1 if after is None else min(after, high + 1)
        step = None if f.indexed(statuses) else self.window_size
        deadline = time.monotonic() + budget
        rows: list[dict[str, Any]] = []
        while cursor > low:
            floor = low if step is None else max(low, cursor - step)
            want = limit + 1 - len(rows)
            got = self.window(f, statuses, cursor, floor, want)
            rows.extend(got)
            if len(got) >= want:
                return RecordsPage(rows[:limit], rows[limit - 1]["id"])
            cursor = floor
            if time.monotonic() > deadline:
                break
        if cursor > low:
            return RecordsPage(rows, cursor, searched_to=cursor)
        return RecordsPage(rows, None)

    def matching_ids(self, f: RecordFilter, only: tuple[str, ...], upto: int | None, limit: int,
                     budget: float) -> tuple[list[int], bool]:
        """Ids of the records an action on everything the filter matches would touch (at or below ``upto``),
        newest first, at most ``limit``; and whether that is all of them (False: more, or out of time)."""
        ids: list[int] = []
        after = None if upto is None else upto + 1
        deadline = time.monotonic() + budget
        while len(ids) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return ids, False
            page = self.records(f, after, min(1000, limit - len(ids)), budget=left, only=only)
            ids.extend(r["id"] for r in page.rows)
            if page.next_after is None:
                return ids, True
            after = page.next_after
        more = self.records(f, after, 1, budget=max(0.0, deadline - time.monotonic()), only=only)
        return ids, not more.rows and more.next_after is None

