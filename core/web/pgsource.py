"""The dashboard's reads over PostgreSQL: one database, or every shard of a sharded processor merged.

Each read is one transaction per database that first sets a statement timeout and, for pages, read-only
(``dashboard_begin``); the statements are ``core/sql/dashboard.sql``'s. A shard that does not answer is
named in ``down`` and the page shows the others; one database that does not answer is a 503.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from core.db import Conn
from core.errors import DatabaseUnavailable, SchemaNotMigrated
from core.queries import Queries
from core.shardmove import PREFIX
from core.web import pgflows
from core.web.filters import RecordFilter, RunFilter
from core.web.flowdata import Position, RunDetail
from core.web.source import (
    CHART_BUCKET,
    CHART_CAP,
    COUNT_CAP,
    DETAIL_COLUMNS,
    MAX_QUEUES,
    NEIGHBOURS,
    RECORD_COLUMNS,
    WINDOW,
    Count,
    QueueRow,
    Source,
)

T = TypeVar("T")
PAGE_MS = 2000      # a page's statements: each should take milliseconds; this stops a bad plan
ACTION_MS = 10000   # an action's


def _one(name: str, params: dict[str, Any], conn: Conn, q: Queries) -> Any:
    return conn.execute(getattr(q, name), params).fetchone()


@dataclass
class PostgresSource(Source):
    """Reads of a :class:`core.DistributedProcessor`'s database or shards."""

    def __post_init__(self) -> None:
        store = self.processor.store
        self.sharded = hasattr(store, "stores")
        self.parts: list[Any] = list(store.stores) if self.sharded else [store]

    # ------------------------------------------------------------------ plumbing

    def label(self, index: int) -> str:
        store = self.parts[index]
        t = store.db.target()
        where = f"{t['host']}:{t['port']}/{t['dbname']}"
        if not self.sharded:
            return where
        try:
            return f"shard {self.processor.store.topology.number(index)} ({where})"
        except (DatabaseUnavailable, SchemaNotMigrated):
            return f"shard #{index + 1} ({where})"

    def on(self, store: Any, op: Callable[[Conn, Queries], T], *, read_only: bool = True, ms: int = PAGE_MS) -> T:
        db = store.db
        with db.borrow(internal=False) as conn, conn.transaction():
            conn.execute(db.q.dashboard_begin, {"ms": str(ms), "read_only": read_only})
            return op(conn, db.q)

    def each(self, op: Callable[[Conn, Queries], T], *, read_only: bool = True, ms: int = PAGE_MS) -> list[T]:
        """``op`` on every database; over shards, one that fails is noted in ``down`` (all failing raise)."""
        out: list[T] = []
        failed: list[Exception] = []
        for i, store in enumerate(self.parts):
            try:
                out.append(self.on(store, op, read_only=read_only, ms=ms))
            except (DatabaseUnavailable, SchemaNotMigrated) as exc:
                if not self.sharded:
                    raise
                failed.append(exc)
                note = f"{self.label(i)}: {' '.join(str(exc).split())[:300]}"
                if note not in self.down:
                    self.down.append(note)
        if failed and not out:
            raise failed[0]
        return out

    def reach(self) -> None:
        self.each(lambda conn, q: None)  # dashboard_begin alone: one round trip per database

    # ------------------------------------------------------------------ queues and the chart

    def queues(self) -> list[QueueRow]:
        merged: dict[str, QueueRow] = {}
        for rows in self.each(self._queues_on):
            for row in rows:
                if row.name in merged:
                    merged[row.name].merge(row)
                else:
                    merged[row.name] = row
        return [merged[name] for name in sorted(merged)]

    def _queues_on(self, conn: Conn, q: Queries) -> list[QueueRow]:
        waiting = {str(name): int(n) for name, n in
                   conn.execute(q.dashboard_waiting_counts, {"cap": COUNT_CAP + 1}).fetchall()}
        capped = sum(waiting.values()) > COUNT_CAP  # a sample: each queue's count is "at least" then
        names = [str(r[0]) for r in conn.execute(q.dashboard_queue_names, {"limit": MAX_QUEUES}).fetchall()]
        names = sorted(set(names) | set(waiting))[:MAX_QUEUES]
        if not names:
            return []
        rows = conn.execute(q.dashboard_queue_counts, {"queues": names, "cap": COUNT_CAP + 1}).fetchall()
        out = []
        for name, pending, processing, age, completed, failed, cancelled, max_pending in rows:
            out.append(QueueRow(
                str(name), Count.of(int(pending), estimate=partial(self._estimate, conn, q, str(name))),
                Count.of(int(processing)), int(completed), int(failed), int(cancelled),
                None if age is None else float(age), None if max_pending is None else int(max_pending),
                waiting=Count(waiting.get(str(name), 0), capped)))
        return out

    @staticmethod
    def _estimate(conn: Conn, q: Queries, queue: str) -> int | None:
        row = conn.execute(q.dashboard_estimate_pending, {"queue": queue}).fetchone()
        try:
            n = int(row[0][0]["Plan"]["Plan Rows"]) if row else 0
        except (LookupError, TypeError, ValueError):
            return None
        return n if n > COUNT_CAP else None  # below the cap the estimate says less than the count did

    def finished_since(self, now: datetime, since: datetime) -> tuple[list[tuple[int, int, int, int]],
                                                                       datetime | None, bool]:
        def read(conn: Conn, q: Queries) -> list[tuple[Any, ...]]:
            return conn.execute(q.dashboard_finished_recent, {"now": now, "since": since, "cap": CHART_CAP,
                                                              "bucket": CHART_BUCKET}).fetchall()

        totals: dict[int, list[int]] = {}
        earliest: datetime | None = None
        capped = False
        for rows in self.each(read):
            if sum(int(c) + int(f) + int(x) for _, c, f, x, _ in rows) >= CHART_CAP:
                capped = True  # this database's read stopped at the cap: the chart covers from its earliest on
                first = min(r[4] for r in rows)
                earliest = first if earliest is None else max(earliest, first)
            for bucket, c, f, x, _ in rows:
                t = totals.setdefault(int(bucket), [0, 0, 0])
                t[0] += int(c)
                t[1] += int(f)
                t[2] += int(x)
        return [(b, *v) for b, v in sorted(totals.items())], earliest, capped  # type: ignore[misc]

    # ------------------------------------------------------------------ records

    def id_range(self) -> tuple[int, int] | None:
        spans = [r for r in self.each(lambda c, q: c.execute(q.dashboard_id_range).fetchone())
                 if r is not None and r[0] is not None]
        if not spans:
            return None
        return min(int(r[0]) for r in spans), max(int(r[1]) for r in spans)

    def window(self, f: RecordFilter, statuses: list[str] | None, after: int, floor: int,
               limit: int) -> list[dict[str, Any]]:
        params = {"after": after, "floor": floor, "queue": f.queue, "statuses": statuses, "key": f.key,
                  "dedupe": f.dedupe, "error": f.error, "run": f.run, "limit": limit,
                  "processing_only": statuses == ["processing"]}
        parts = self.each(lambda c, q: c.execute(q.dashboard_records, params).fetchall())
        rows = heapq.merge(*parts, key=lambda r: -int(r[0])) if len(parts) > 1 else iter(parts[0] if parts else [])
        return [dict(zip(RECORD_COLUMNS, r, strict=True)) for r, _ in zip(rows, range(limit), strict=False)]

    def finished_window(self, f: RecordFilter, statuses: list[str], position: tuple[datetime, int] | None,
                        limit: int, upto: int | None) -> list[tuple[list[dict[str, Any]], datetime | None]]:
        at, after = position if position is not None else (None, 0)
        params = {"at": at, "after": after, "strict": after == 0, "window": WINDOW, "upto": upto,
                  "statuses": statuses, "queue": f.queue, "key": f.key, "dedupe": f.dedupe, "error": f.error,
                  "run": f.run, "limit": limit}

        def read(conn: Conn, q: Queries) -> tuple[list[dict[str, Any]], datetime | None]:
            end = conn.execute(q.dashboard_finished_end, params).fetchone()
            end_at = end[0] if end else None
            rows = conn.execute(q.dashboard_finished_records, {**params, "end": end_at}).fetchall()
            return [dict(zip(RECORD_COLUMNS, r, strict=True)) for r in rows], end_at

        return self.each(read)

    def record(self, record_id: int, payload: bool) -> dict[str, Any] | None:
        params = {"id": record_id, "payload": payload}
        for row in self.each(lambda c, q: c.execute(q.dashboard_record, params).fetchone()):
            if row is not None:
                return dict(zip(DETAIL_COLUMNS, row, strict=True))
        return None

    def neighbours(self, key: str, record_id: int) -> list[dict[str, Any]]:
        params = {"key": key, "id": record_id, "n": NEIGHBOURS}
        found = [dict(zip(("id", "status", "attempts", "created_at"), r, strict=True))
                 for rows in self.each(lambda c, q: c.execute(q.dashboard_key_neighbours, params).fetchall())
                 for r in rows]
        before = sorted((r for r in found if r["id"] < record_id), key=lambda r: -r["id"])[:NEIGHBOURS]
        after = sorted((r for r in found if r["id"] > record_id), key=lambda r: r["id"])[:NEIGHBOURS]
        return [*reversed(before), *after]

    def settings(self) -> list[dict[str, Any]]:
        for rows in self.each(lambda c, q: c.execute(q.dashboard_settings, {"limit": 1000}).fetchall()):
            cols = ("kind", "name", "n", "block_on_failure", "updated_at")
            return [dict(zip(cols, r, strict=True)) for r in rows]  # every shard carries the same settings
        return []

    def purge(self, ids: list[int]) -> int:
        if not ids:
            return 0
        return sum(self.each(lambda c, q: len(c.execute(q.dashboard_purge, {"ids": ids}).fetchall()),
                             read_only=False, ms=ACTION_MS))

    # ------------------------------------------------------------------ health and shards

    def shards(self) -> list[dict[str, Any]]:
        if not self.sharded:
            return []
        out = []
        for i, store in enumerate(self.parts):
            entry: dict[str, Any] = {"label": self.label(i)}
            params = {"cap": COUNT_CAP + 1, "prefix": f"{PREFIX}{store.db.settings.schema}:%"}
            try:
                row = self.on(store, partial(_one, "dashboard_shard", params))
            except (DatabaseUnavailable, SchemaNotMigrated) as exc:
                entry["error"] = " ".join(str(exc).split())[:300]
                out.append(entry)
                continue
            no, accepting, partitions, moving, pending, processing, waiting, in_doubt = row or (None,) * 8
            entry.update(shard=no, accepting=accepting, partitions=partitions, moving=moving,
                         pending=Count.of(int(pending or 0)), processing=Count.of(int(processing or 0)),
                         waiting=Count.of(int(waiting or 0)), in_doubt=in_doubt)
            out.append(entry)
        return out

    # ------------------------------------------------------------------ flows (core/web/pgflows.py)

    def runs_window(self, f: RunFilter, position: Position | None, limit: int
                    ) -> list[tuple[list[dict[str, Any]], Position | None]]:
        return pgflows.runs_window(self.each, f, position, limit)

    def flow_run(self, run_id: int, payloads: bool) -> RunDetail | None:
        return pgflows.flow_run(self.each, run_id, payloads)

    def failed_runs(self) -> tuple[int, bool] | None:
        return pgflows.failed_runs(self.each)

    def flow_names(self) -> list[str]:
        return pgflows.flow_names(self.each)
