"""Flows in memory, the statements of core/sql/flows.sql (``flow_run`` and ``flow_records`` for
``flow_status()``, ``list_flow_runs``, ``flow_defects`` and the maintenance sweep that repairs them,
``purge_flow_runs``) over the tables :class:`~core.testing.flows.MemoryFlows` keeps. Callers hold the lock."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

from core.flows.store import DEFECT_LIMIT, run_status
from core.testing.flows import MemoryFlows

log = logging.getLogger("core.flows")
_loads = json.JSONDecoder().decode
RUN_KEYS = ("id", "flow", "version", "status", "failed_step", "error", "created_at", "finished_at")


class MemoryFlowQueries(MemoryFlows):
    """The flow functions (:class:`MemoryFlows`) and the flow statements of one processor."""


    def defects(self, after: int = 0, limit: int = DEFECT_LIMIT) -> tuple[int | None, list[int]]:
        """``flow_defects``: a slice of the waiting records after the id ``after`` (where the next starts, None
        when this was the last) and its defects: waiting records none of whose parents is unfinished."""
        waiting = sorted(i for ids in self.tables.waiting_ids().values() for i in ids if i > after)[:limit]
        if not waiting:
            return None, []
        found = [i for i in waiting if not self._unfinished_parent(i)]
        return (waiting[-1] if len(waiting) >= limit else None), found

    def sweep(self, now: datetime) -> int:
        """The maintenance sweep (core.flows.store.DefectSweep): the next slice's defects repaired."""
        nxt, found = self.defects(self.after)
        self.after = nxt or 0
        if not found:
            return 0
        log.error("flow records were waiting although none of their parents is unfinished; repairing them",
                  extra={"records": found[:20], "count": len(found)})
        return self.repair(found, now)

    def status(self, run_id: int) -> dict[str, Any] | None:
        """``flow_run`` and ``flow_records``, as ``flow_status()`` gives them."""
        run = self.tables.flows.runs.get(run_id)
        if run is None:
            return None
        head = (run.id, run.flow, run.version, run.status, _loads(run.input), run.dedupe_key, run.failed_step,
                run.error, run.on_failure_id, run.created_at, run.updated_at, run.finished_at)
        rows = [(r.id, r.step, r.flow_index, r.status, r.attempts, r.max_attempts, r.last_error, self._result(r.id),
                 r.queue, r.waiting_on, r.created_at, r.finished_at) for r in self._run_rows(run)]
        return run_status(head, rows)

    def list_runs(self, flow: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
        """``list_flow_runs``: the latest runs, newest first."""
        runs = sorted((r for r in self.tables.flows.runs.values()
                       if (flow is None or r.flow == flow) and (status is None or r.status == status)),
                      key=lambda r: (r.created_at, r.id), reverse=True)[:limit]
        return [{k: getattr(r, k) for k in RUN_KEYS} | {"shard": 0} for r in runs]

    def purge_runs(self, older_than: float, batch: int, now: datetime) -> int:
        """``purge_flow_runs``: runs ended before the cutoff with no record left unfinished, with their edges
        (their records, which hold the results, go by the records' own retention)."""
        f = self.tables.flows
        try:
            cutoff = now - timedelta(seconds=older_than)
        except (OverflowError, ValueError):
            return 0
        gone = sorted((r for r in f.runs.values()
                       if r.finished_at is not None and r.finished_at < cutoff and not self.unfinished(r)),
                      key=lambda r: (r.finished_at or cutoff, r.id))[:batch]
        for run in gone:
            del f.runs[run.id]
            for rid in run.records:
                f.children.pop(rid, None)
                f.parents.pop(rid, None)
        return len(gone)
