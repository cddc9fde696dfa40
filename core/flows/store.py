"""Flows in one PostgreSQL database: starting a run (one call of ``dp_start_flow``), observing and cancelling
it, the health check of waiting records and its repair, the retention of finished runs. The settling of a
run's records happens in the statements that finish them (core/sql/claims.sql, recovery, cancel)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from core.appconn import AppConn
from core.db import Database
from core.flows.run import FlowRun, StartRequest
from core.plans import Plan, Stmt, on, run, using

log = logging.getLogger("core.flows")

# How many defects one health check counts and one repair round fixes.
DEFECT_LIMIT = 1000


class StartRefused(Exception):
    """dp_start_flow wrote nothing: ``status`` says why (``changed``, or a shard's guard), ``owner`` the shard."""

    def __init__(self, status: str, owner: int | None) -> None:
        self.status = status
        self.owner = owner
        super().__init__(status)


def run_status(run: Any, records: list[Any]) -> dict[str, Any]:
    """``flow_status()``'s dict from the run's row and its records' rows (flow_run and flow_records)."""
    steps: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r[2] == -1 and r[3] == "waiting":
            continue  # a for_each step's placeholder: its records are made when its source completes
        steps.setdefault(r[1], []).append({
            "id": int(r[0]), "status": r[3], "attempts": int(r[4]), "max_attempts": int(r[5]), "last_error": r[6],
            "result": r[7], "index": r[2], "queue": r[8], "created_at": r[10], "finished_at": r[11]})
    unfinished = sum(1 for r in records if r[3] in ("waiting", "pending", "processing"))
    return {"id": int(run[0]), "flow": run[1], "version": int(run[2]), "status": run[3], "input": run[4],
            "dedupe_key": run[5], "unfinished": unfinished, "failed_step": run[6], "error": run[7],
            "on_failure_id": run[8], "created_at": run[9], "updated_at": run[10], "finished_at": run[11],
            "steps": steps}


class PostgresFlows:
    """The flow statements of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q

    def start(self, req: StartRequest, conn: AppConn | None = None, *,
              expect_shard: int | None = None) -> Plan[FlowRun]:
        """Write the run and its records in one statement (on ``conn``: inside the application's transaction).
        Raises :class:`StartRefused` when nothing was written."""
        params = {"flow": req.flow, "version": req.version, "hash": req.hash,
                  "definition": json.dumps(req.definition), "input": req.input_text, "dedupe": req.dedupe_key,
                  "steps": json.dumps(req.steps), "expect_shard": expect_shard, "trace": req.trace}
        stmt = Stmt(self.q.start_flow, params, "one")
        if conn is not None:
            row = yield from using(conn, _one(stmt))
        else:
            # Not retried on a broken connection: whether the run was written is unknown then (a dedupe key
            # makes a retry by the caller safe).
            row = yield from on(self.db, stmt, attempts=1)
        status, run_id, ids, owner = row
        if status not in ("ok", "deduplicated"):
            raise StartRefused(str(status), owner)
        return FlowRun(int(run_id), req.flow, req.version, {k: int(v) for k, v in (ids or {}).items()},
                       status == "deduplicated", self.db.shard)

    def put_template(self, req: StartRequest) -> Plan[str]:
        """Store the template's definition for its version unless one is already; the stored one's hash."""
        params = {"flow": req.flow, "version": req.version, "hash": req.hash,
                  "definition": json.dumps(req.definition)}
        row = yield from on(self.db, Stmt(self.q.flow_template_put, params, "one"))
        return str(row[0])

    def status(self, run_id: int) -> Plan[dict[str, Any] | None]:
        run = yield from on(self.db, Stmt(self.q.flow_run, {"run": run_id}, "one"))
        if run is None:
            return None
        records = yield from on(self.db, Stmt(self.q.flow_records, {"run": run_id}, "all"))
        return run_status(run, records)

    def cancel(self, run_id: int) -> Plan[str | None]:
        row = yield from on(self.db, Stmt(self.q.cancel_flow, {"run": run_id}, "one"))
        return None if row is None else row[0]

    def list_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]:
        rows = yield from on(self.db, Stmt(self.q.list_flow_runs, {"flow": flow, "status": status, "limit": limit}))
        keys = ("id", "flow", "version", "status", "failed_step", "error", "created_at", "finished_at")
        return [dict(zip(keys, r, strict=True)) | {"shard": self.db.shard} for r in rows]

    def defects(self, after: int = 0, limit: int = DEFECT_LIMIT) -> Plan[tuple[int | None, list[int]]]:
        """A slice of the waiting records after the id ``after``: (where the next slice starts, None when this
        one was the last; the defects in it: waiting records none of whose parents is unfinished)."""
        row = yield from on(self.db, Stmt(self.q.flow_defects, {"after": after, "limit": limit}, "one"))
        if row is None:
            return None, []
        last, n, found = row
        return (int(last) if last is not None and n >= limit else None), [int(i) for i in found or []]

    def repair(self, ids: list[int]) -> int:
        """Repair the defects ``ids`` (each checked again); how many were repaired."""
        if not ids:
            return 0
        row = self.db.with_retry(lambda conn: conn.execute(self.q.flow_repair, {"ids": ids}).fetchone())
        return int(row[0]) if row and row[0] else 0

    def purge_runs(self, older_than: float, batch: int) -> int:
        """One batch of the retention of finished runs (their edges and results with them)."""
        row = self.db.with_retry(lambda conn: conn.execute(
            self.q.purge_flow_runs, {"older_than": older_than, "batch": batch}).fetchone())
        return int(row[0]) if row else 0


class CountedStep:
    """A maintenance step whose result counts in the metric ``metric`` (the maintainer adds it)."""

    def __init__(self, step: Callable[[], int], metric: str) -> None:
        self.step = step
        self.metric = metric

    def __call__(self) -> int:
        return self.step()


class DefectSweep:
    """The maintenance step that goes through the waiting records slice by slice and repairs a defect."""

    def __init__(self, flows: PostgresFlows) -> None:
        self.flows = flows
        self.after = 0

    def __call__(self) -> int:
        nxt, defects = run(self.flows.defects(self.after))
        self.after = nxt or 0
        if not defects:
            return 0
        log.error("flow records were waiting although none of their parents is unfinished; repairing them",
                  extra={"records": defects[:20], "count": len(defects)})
        return self.flows.repair(defects)


def _one(stmt: Stmt) -> Plan[Any]:
    return (yield stmt)
