"""The dashboard's reads over the in-memory processor (:class:`core.testing.InMemoryProcessor`): its tables,
read under their lock, with the same answers the PostgreSQL source gives (the tables are small: no windows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.constants import FINAL_STATUSES
from core.web.filters import ACTIVE, RecordFilter
from core.web.memflows import MemoryFlowReads
from core.web.source import (
    CHART_BUCKET,
    CHART_CAP,
    DETAIL_COLUMNS,
    NEIGHBOURS,
    RECORD_COLUMNS,
    Count,
    QueueRow,
    Source,
)


def _matches(row: Any, f: RecordFilter, statuses: list[str] | None) -> bool:
    return ((f.queue is None or row.queue == f.queue) and (statuses is None or row.status in statuses)
            and (f.run is None or getattr(row, "flow_run_id", None) == f.run)
            and (f.key is None or row.ordering_key == f.key) and (f.dedupe is None or row.dedupe_key == f.dedupe)
            and (f.error is None or (row.last_error is not None and f.error.lower() in row.last_error.lower())))


@dataclass
class MemorySource(MemoryFlowReads, Source):
    """Reads of an in-memory processor's :class:`~core.testing.MemoryTables` (its flows through the processor's
    public methods: :class:`~core.web.memflows.MemoryFlowReads`)."""

    window_size = 2**63  # one walk step: everything is in memory

    def __post_init__(self) -> None:
        self.store = self.processor.store
        self.tables = self.store.tables

    def queues(self) -> list[QueueRow]:
        t = self.tables
        self.store.check_open()
        with t.lock:
            now = t.now()
            names = {q for q, _ in t.finished} | set(t.pending_queues()) | set(t.queue_limits)
            names |= {t.rows[i].queue for i in t.processing}
            waiting: dict[str, int] = {}
            for r in t.rows.values():
                if r.status == "waiting":
                    waiting[r.queue] = waiting.get(r.queue, 0) + 1
            names |= set(waiting)
            out = []
            for name in sorted(names):
                pending = [t.rows[i] for i in t.pending_ids(name)]
                due = [r.run_at for r in pending if r.run_at <= now]
                out.append(QueueRow(
                    name, Count.of(len(pending)), Count.of(sum(1 for i in t.processing if t.rows[i].queue == name)),
                    t.finished[(name, "completed")], t.finished[(name, "failed")], t.finished[(name, "cancelled")],
                    (now - min(due)).total_seconds() if due else None, t.queue_limits.get(name),
                    waiting=Count.of(waiting.get(name, 0))))
            return out

    def finished_since(self, now: datetime, since: datetime) -> tuple[list[tuple[int, int, int, int]],
                                                                       datetime | None, bool]:
        with self.tables.lock:
            done = sorted(((r.finished_at, r.status) for r in self.tables.rows.values()
                           if r.status in FINAL_STATUSES and r.finished_at is not None
                           and since <= r.finished_at <= now), reverse=True)[:CHART_CAP]
        totals: dict[int, list[int]] = {}
        for at, status in done:
            t = totals.setdefault(int((now - at).total_seconds() // CHART_BUCKET), [0, 0, 0])
            t[FINAL_STATUSES.index(status)] += 1
        earliest = done[-1][0] if done else None
        return [(b, *v) for b, v in sorted(totals.items())], earliest, len(done) >= CHART_CAP  # type: ignore[misc]

    def id_range(self) -> tuple[int, int] | None:
        self.store.check_open()
        with self.tables.lock:
            ids = self.tables.rows.keys()
            return (min(ids), max(ids)) if ids else None

    def window(self, f: RecordFilter, statuses: list[str] | None, after: int, floor: int,
               limit: int) -> list[dict[str, Any]]:
        with self.tables.lock:
            rows = sorted((r for r in self.tables.rows.values()
                           if floor <= r.id < after and _matches(r, f, statuses)), key=lambda r: -r.id)[:limit]
            return [{c: getattr(r, c, None) for c in RECORD_COLUMNS} for r in rows]

    def finished_window(self, f: RecordFilter, statuses: list[str], position: tuple[datetime, int] | None,
                        limit: int, upto: int | None) -> list[tuple[list[dict[str, Any]], datetime | None]]:
        with self.tables.lock:
            rows = sorted((r for r in self.tables.rows.values()
                           if r.status in FINAL_STATUSES and r.finished_at is not None and _matches(r, f, statuses)
                           and (upto is None or r.id <= upto)
                           and (position is None or (r.finished_at, r.id) < position)),
                          key=lambda r: (r.finished_at, r.id), reverse=True)[:limit]
            return [([{c: getattr(r, c, None) for c in RECORD_COLUMNS} for r in rows], None)]

    def record(self, record_id: int, payload: bool) -> dict[str, Any] | None:
        self.store.check_open()
        with self.tables.lock:
            row = self.tables.rows.get(record_id)
            if row is None:
                return None
            out = {c: getattr(row, c, None) for c in DETAIL_COLUMNS if c not in ("payload", "result")}
            out["key_blocked"] = False  # a hint the in-memory store does not keep
            out["payload"] = json.dumps(json.loads(row.payload), indent=2) if payload else None
        out["result"] = self.step_result(out, payload)
        return out

    def neighbours(self, key: str, record_id: int) -> list[dict[str, Any]]:
        with self.tables.lock:
            rows = [r for r in self.tables.rows.values() if r.ordering_key == key and r.status in ACTIVE]
        before = sorted((r for r in rows if r.id < record_id), key=lambda r: -r.id)[:NEIGHBOURS]
        after = sorted((r for r in rows if r.id > record_id), key=lambda r: r.id)[:NEIGHBOURS]
        return [{"id": r.id, "status": r.status, "attempts": r.attempts, "created_at": r.created_at}
                for r in [*reversed(before), *after]]

    def settings(self) -> list[dict[str, Any]]:
        with self.tables.lock:
            queues = [{"kind": "queue", "name": q, "n": n, "block_on_failure": False, "updated_at": None}
                      for q, n in sorted(self.tables.queue_limits.items())]
            keys = [{"kind": "key", "name": k.pattern, "n": k.limit, "block_on_failure": k.block_on_failure,
                     "updated_at": None} for _, k in sorted(self.tables.key_limits.items())]
        return queues + keys

    def purge(self, ids: list[int]) -> int:
        t = self.tables
        self.store.check_open()
        with t.lock:
            gone = [t.rows[i] for i in set(ids) if i in t.rows and t.rows[i].status in FINAL_STATUSES]
            for row in gone:
                t.delete(row)
        return len(gone)
