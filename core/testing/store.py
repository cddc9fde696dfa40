"""The in-memory store behind :class:`core.testing.InMemoryProcessor` (:class:`core.backend.Store`): the
record state changes of :mod:`core.testing.records`, operator actions, admission settings, observation, and
a worker store for each ``run()``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from core.appconn import AppConn
from core.backend import CountRow, NewRecords
from core.flows.run import FlowRun, StartRequest
from core.plans import Plan, later
from core.record import AddResult
from core.runstore import RETENTION_BATCH, RETENTION_BATCHES
from core.testing import pg
from core.testing.controlstore import MemoryControlOps
from core.testing.errors import NoDatabase
from core.testing.records import REGISTRY_COLUMNS
from core.testing.run import MemoryRun
from core.testing.tables import KeyLimit


class MemoryStore(MemoryControlOps):
    """One processor's store over its :class:`~core.testing.tables.MemoryTables`."""

    def for_run(self, *, claimers: int, handler_slots: int, listen_to: Sequence[str]) -> MemoryRun:
        return MemoryRun(self.tables, self.settings, self.facts, handler_slots=handler_slots,
                         listen=bool(listen_to))

    # ------------------------------------------------------------------ the facade's operations (plans)

    def add(self, batch: NewRecords, conn: Any = None) -> Plan[AddResult]:
        return later(lambda: self.insert(batch))

    def cancel(self, ids: list[int]) -> Plan[dict[int, str]]:
        return later(lambda: self.cancel_now(ids))

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> Plan[int]:
        return later(lambda: self.retry_failed_now(ids, queue, pattern, batch))

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> Plan[int]:
        return later(lambda: self.purge_now(older_than, batch, max_batches))

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> Plan[None]:
        return later(lambda: self.set_key_concurrency_now(pattern, n, block_on_failure))

    def set_queue_limit(self, queue: str, n: int | None) -> Plan[None]:
        return later(lambda: self.set_queue_limit_now(queue, n))

    def counts(self, queue: str | None) -> Plan[list[CountRow]]:
        return later(lambda: self.counts_now(queue))

    def list_instances(self, include_stopped: bool) -> Plan[list[dict[str, Any]]]:
        return later(lambda: self.list_instances_now(include_stopped))

    def probe(self, report: dict[str, Any], timeout: float) -> Plan[list[CountRow] | None]:
        return later(lambda: self.probe_now(report, timeout))

    def horizon(self) -> Plan[dict[str, Any]]:
        return later(lambda: self.horizon_now())

    def retain(self) -> int:
        retention = self.settings.retention
        if retention is None:
            return 0
        records = self.purge_now(retention, RETENTION_BATCH, RETENTION_BATCHES)
        runs: int = self._locked(lambda now: self.flows.purge_runs(retention, RETENTION_BATCH, now))
        return records + runs

    # ------------------------------------------------------------------ flows (core/testing/flows.py)

    def start_flow(self, req: StartRequest, conn: AppConn | None = None) -> Plan[FlowRun]:
        if conn is not None:
            raise NoDatabase("an in-memory processor has no database transaction to start a flow run in")
        pg.text(req.flow, req.dedupe_key)
        return later(lambda: self._locked(lambda now: self.flows.start(req, now)))

    def flow_status(self, run_id: int) -> Plan[dict[str, Any] | None]:
        pg.int8(run_id)
        return later(lambda: self._locked(lambda now: self.flows.status(run_id)))

    def cancel_flow(self, run_id: int) -> Plan[str | None]:
        pg.int8(run_id)
        return later(lambda: self._locked(lambda now: self.flows.cancel(run_id, now)))

    def list_flow_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]:
        pg.text(flow, status)
        return later(lambda: self._locked(lambda now: self.flows.list_runs(flow, status, limit)))

    def flow_defects(self) -> Plan[list[int]]:
        return later(lambda: self._locked(lambda now: self.flows.defects()[1]))

    # ------------------------------------------------------------------ operator actions

    def cancel_now(self, ids: list[int]) -> dict[int, str]:
        """``cancel``: pending, waiting and failed records end ``cancelled`` at once; processing ones are
        flagged. A flow step cancelled from pending or waiting settles its run (a failed one did already)."""
        if not ids:
            return {}
        pg.int8(*ids)
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            out = {}
            ended = []
            for rid in sorted(set(ids)):
                row = t.rows.get(rid)
                if row is None or row.status not in ("pending", "processing", "failed", "waiting"):
                    continue
                if row.status in ("pending", "waiting"):
                    ended.append(row)
                if row.status != "processing":
                    t.move(row, "cancelled")
                    row.finished_at = now
                    row.waiting_on = 0
                    t.drop_dedupe(row)
                row.cancel_requested = True
                row.updated_at = now
                out[rid] = row.status
            self.flows.settle_rows(ended, now)
            return out

    def retry_failed_now(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> int:
        """``retry_failed``: failed records back to ``pending`` with a fresh attempt budget, in batches of
        ``batch`` by id (one batch only when ``ids`` are given, as the real one)."""
        pg.text(queue, pattern)
        wanted = None if ids is None else set(ids)
        regex = None if pattern is None else re.compile(pattern)
        t = self.tables
        total = 0
        while True:
            self.check_open()
            with t.lock:
                if ids and any(status == "failed" for _, status in t.finished):
                    pg.int8(*ids)  # the server casts the ids only when it has a failed record to compare
                now = t.now()
                rows = sorted((r for r in t.rows.values() if r.status == "failed"
                               and (wanted is None or r.id in wanted) and (queue is None or r.queue == queue)
                               and (regex is None or (r.last_error is not None and regex.search(r.last_error)))),
                              key=lambda r: r.id)[:batch]
                for row in rows:
                    t.move(row, "pending", now)
                    row.finished_at = None
                    row.attempts = 0
                    row.cancel_requested = False
                    row.updated_at = now
            total += len(rows)
            if len(rows) < batch:  # as the real one: more ids than a batch take several
                return total

    # ------------------------------------------------------------------ admission settings

    def set_key_concurrency_now(self, pattern: str, n: int | None, block_on_failure: bool) -> None:
        pg.text(pattern)
        if n is not None:
            pg.int4(n)
        self.check_open()
        with self.tables.lock:
            if n is None:
                self.tables.key_limits.pop(pattern, None)
            else:
                self.tables.key_limits[pattern] = KeyLimit.build(pattern, n, block_on_failure)

    def set_queue_limit_now(self, queue: str, n: int | None) -> None:
        pg.text(queue)
        if n is not None:
            pg.int4(n)
        self.check_open()
        with self.tables.lock:
            if n is None:
                self.tables.queue_limits.pop(queue, None)
            else:
                self.tables.queue_limits[queue] = n

    # ------------------------------------------------------------------ observing

    def counts_now(self, queue: str | None) -> list[CountRow]:
        """``queue_status_active`` and ``queue_status_finished``: pending (with the age of its oldest
        record by created_at, and how many are due), processing, waiting, and the finished counts."""
        pg.text(queue)
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            out: list[CountRow] = []
            for q in t.pending_queues():
                if queue is not None and q != queue:
                    continue
                rows = [t.rows[i] for i in t.pending_ids(q)]
                oldest = min(r.created_at for r in rows)
                out.append((q, "pending", len(rows), (now - oldest).total_seconds(),
                            sum(1 for r in rows if r.run_at <= now)))
            held: dict[str, int] = {}
            for i in t.processing:
                q = t.rows[i].queue
                held[q] = held.get(q, 0) + 1
            out += [(q, "processing", n, None, 0) for q, n in held.items() if queue is None or q == queue]
            out += [(q, s, n, None, 0) for (q, s), n in t.finished.items() if queue is None or q == queue]
            out += [(q, "waiting", len(w), None, 0) for q, w in t.waiting_ids().items()
                    if w and (queue is None or q == queue)]
            return out

    def list_instances_now(self, include_stopped: bool) -> list[dict[str, Any]]:
        t = self.tables
        self.check_open()
        with t.lock:
            holding: dict[str | None, int] = {}
            for i in t.processing:
                owner = t.rows[i].claimed_by
                holding[owner] = holding.get(owner, 0) + 1
            rows = [{**{c: inst[c] for c in REGISTRY_COLUMNS}, "processing": holding.get(iid, 0)}
                    for iid, inst in t.instances.items()
                    if include_stopped or inst["status"] in ("running", "stopping")]
        return sorted(rows, key=lambda r: r["started_at"])

    def next_due(self, queues: Sequence[str] | None = None) -> datetime | None:
        """When the earliest pending record not yet due (of ``queues``, default all) comes due; None if none
        waits for its run_at."""
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            names = t.pending_queues() if queues is None else list(queues)
            later = [t.rows[i].run_at for q in names for i in t.pending_ids(q) if t.rows[i].run_at > now]
            return min(later, default=None)

    def probe_now(self, report: dict[str, Any], timeout: float) -> list[CountRow] | None:
        """The database part of the health report, in the real one's keys: always reachable and migrated
        (until closed), no round trip, no pool, nothing holding a horizon back."""
        report["database"].update(host="(in memory)", port="", dbname="", schema="")
        self.check_open()
        report["pool"] = {"pool_min": 0, "pool_max": 0, "pool_size": 0, "pool_available": 0, "requests_waiting": 0}
        report["database"].update(reachable=True, latency_ms=0.0, server_version="in-memory", migrated=True)
        counts = self.counts_now(None)
        report["horizon"] = self.horizon_now()
        return counts

    def horizon_now(self) -> dict[str, Any]:
        """No MVCC here: nothing holds a horizon back and no row version is dead."""
        self.check_open()
        with self.tables.lock:
            live = len(self.tables.rows)
        return {"age_seconds": 0.0, "holder": None, "holders": [], "live_tuples": live, "dead_tuples": 0,
                "last_autovacuum": None}

    def ready(self) -> tuple[bool, str | None]:
        if self.closed:
            return False, "database unreachable: DatabaseUnavailable"
        return True, None

    def close(self) -> None:
        self.closed = True
