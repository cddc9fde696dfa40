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

from core.constants import FINAL_STATUSES
from core.health import holder_text
from core.web.filters import MAX_ID, RecordFilter
from core.web.flowdata import FlowReads

COUNT_CAP = 10_000          # counts above it are shown as "10,000+" (or estimated)
WINDOW = 100_000            # ids read by one statement of a walk (about 15 ms beside 10 M rows)
PAGE_BUDGET = 0.04          # seconds a records page may walk windows for
CHART_CAP = 20_000          # finished records the chart reads at most
CHART_SPAN = 3600.0         # the chart's hour
CHART_BUCKET = 120.0        # seconds per bar
MAX_QUEUES = 500            # queues listed at most
NEIGHBOURS = 5              # records of a key shown on each side of one
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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
    paused: dict[str, Any] | None = None    # {"since", "until", "reason"} while paused
    rate: dict[str, Any] | None = None      # {"n", "per"}: at most n records start per `per` seconds
    waiting: Count = Count(0)               # flow steps waiting for their parents

    def merge(self, other: QueueRow) -> None:
        """Add another shard's line of the same queue."""
        self.pending += other.pending
        self.processing += other.processing
        self.waiting += other.waiting
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
    next_at: int | None = None  # finished records: the finished_at part of the cursor (see micros)
    searched_at: datetime | None = None


RECORD_COLUMNS = ("id", "queue", "status", "priority", "attempts", "max_attempts", "ordering_key", "dedupe_key",
                  "last_error", "run_at", "created_at", "updated_at", "finished_at", "claimed_by", "flow_run_id",
                  "step")
DETAIL_COLUMNS = ("id", "queue", "status", "priority", "attempts", "max_attempts", "ordering_key", "dedupe_key",
                  "dedupe_while", "dedupe_held", "key_blocked", "cancel_requested", "last_error", "run_at",
                  "created_at", "updated_at", "finished_at", "claimed_by", "claimed_at", "lease_expires_at",
                  "payload", "flow_run_id", "step", "flow_index", "waiting_on", "result")


@dataclass
class Source(FlowReads, ABC):
    """The reads of one request (see the module docstring); the flow reads are :class:`FlowReads`'."""

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
    def finished_window(self, f: RecordFilter, statuses: list[str], position: tuple[datetime, int] | None,
                        limit: int, upto: int | None) -> list[tuple[list[dict[str, Any]], datetime | None]]:
        """Per database: up to ``limit`` matching finished records below ``position`` in (finished_at, id)
        order (None: from the latest), within a window of about :data:`WINDOW` finished records; and the
        finished_at the window reaches down to, every record finished then included (None: the oldest)."""

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
        except Exception as exc:  # like health_check(): a health read reports, it never fails the page
            return None, [*reasons, f"horizon unknown: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"]
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

    def reach(self) -> None:
        """Note the databases that do not answer in ``down`` (a page whose reads all go through the processor's
        public methods, which skip a shard that is down, still names it). In memory: nothing to reach."""
        return None

    def paused(self) -> dict[str, dict[str, Any]]:
        """Paused queues ``{queue: {"since", "until", "reason"}}`` (``processor.paused_queues()``), when the
        processor can pause queues. The one place the dashboard learns it."""
        read = getattr(self.processor, "paused_queues", None)
        if not callable(read):
            return {}
        return {str(q): dict(info or {}) for q, info in dict(read()).items()}

    def rates(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The rates set (``processor.rates()``): ``{"queues": {queue: {"n", "per"}}, "keys": {pattern: ...}}``;
        empty for a processor without rates."""
        read = getattr(self.processor, "rates", None)
        found = dict(read()) if callable(read) else {}
        return {kind: {str(name): dict(rate) for name, rate in dict(found.get(kind) or {}).items()}
                for kind in ("queues", "keys")}

    def schedules(self) -> list[dict[str, Any]]:
        """Every schedule (``processor.list_schedules()``), by name; none for a processor without schedules."""
        read = getattr(self.processor, "list_schedules", None)
        return sorted((dict(s) for s in read()), key=lambda s: str(s["name"])) if callable(read) else []

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

    def records(self, f: RecordFilter, after: int | None, limit: int, *, at: int | None = None,
                budget: float | None = None, only: tuple[str, ...] | None = None,
                upto: int | None = None) -> RecordsPage:
        """A page of matching records below the cursor (``after``, and ``at`` for finished records), none above
        id ``upto``, until the page is full, the records end, or ``budget`` seconds (:data:`PAGE_BUDGET`) passed.

        Finished states alone are read most recently finished first, window by window down the finished_at
        index (pending and processing rows never enter it); any other filter walks down the ids window by
        window, or straight through an index that serves it (a key's active records, processing ones)."""
        statuses = f.statuses(only)
        if statuses == []:
            return RecordsPage([], None)
        deadline = time.monotonic() + (PAGE_BUDGET if budget is None else budget)
        if statuses is not None and set(statuses) <= set(FINAL_STATUSES) and not f.indexed(statuses):
            return self._finished(f, statuses, after, at, limit, upto, deadline)
        span = self.id_range()
        if span is None:
            return RecordsPage([], None)
        low, high = span
        cursor = min(high + 1, after or high + 1, (upto or high) + 1)
        step = None if f.indexed(statuses) else self.window_size
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
                return RecordsPage(rows, cursor, searched_to=cursor)
        return RecordsPage(rows, None)

    def _finished(self, f: RecordFilter, statuses: list[str], after: int | None, at: int | None, limit: int,
                  upto: int | None, deadline: float) -> RecordsPage:
        """Finished records by (finished_at, id) descending. Each database reads its own window; what they
        all covered is the rows at or after the latest of their window ends (a database that filled its share
        covered down to its last row): rows below that are read again by the next window, not shown now."""
        position = None if at is None else (from_micros(at), after or 0)
        rows: list[dict[str, Any]] = []
        while True:
            want = limit + 1 - len(rows)
            parts = self.finished_window(f, statuses, position, want, upto)
            ends = []
            for got, end in parts:
                if len(got) >= want:
                    ends.append((got[-1]["finished_at"], got[-1]["id"]))
                elif end is not None:
                    # below every record finished at `end`: just before that moment, above every id (a
                    # position a link carries as it is; (end, 0) would be an id no link takes)
                    ends.append((end - timedelta(microseconds=1), MAX_ID))
            cutoff = max(ends, default=None)
            merged = sorted((r for got, _ in parts for r in got), key=lambda r: (r["finished_at"], r["id"]),
                            reverse=True)
            rows.extend(r for r in merged if cutoff is None or (r["finished_at"], r["id"]) >= cutoff)
            if len(rows) > limit:
                last = rows[limit - 1]
                return RecordsPage(rows[:limit], last["id"], next_at=micros(last["finished_at"]))
            if cutoff is None:
                return RecordsPage(rows, None)
            position = cutoff
            if time.monotonic() > deadline:
                return RecordsPage(rows, cutoff[1], next_at=micros(cutoff[0]), searched_to=cutoff[1],
                                   searched_at=cutoff[0])

    def matching_ids(self, f: RecordFilter, only: tuple[str, ...], upto: int | None, limit: int,
                     budget: float) -> tuple[list[int], bool]:
        """Ids of the records an action on everything the filter matches would touch (at or below ``upto``),
        at most ``limit``; and whether that is all of them (False: more, or out of time)."""
        ids: list[int] = []
        after: int | None = None
        at: int | None = None
        deadline = time.monotonic() + budget
        while len(ids) < limit + 1:
            left = deadline - time.monotonic()
            if left <= 0:
                return ids, False
            page = self.records(f, after, min(1000, limit + 1 - len(ids)), at=at, budget=left, only=only,
                                upto=upto)
            ids.extend(r["id"] for r in page.rows)
            if page.next_after is None and page.next_at is None:
                break
            after, at = page.next_after, page.next_at
        return ids[:limit], len(ids) <= limit


def micros(value: datetime) -> int:
    """A moment as an integer for a link (microseconds since 1970, exact)."""
    return (value - EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)
