"""The dashboard's flow reads over PostgreSQL (core/web/pgsource.py calls them with its ``each``, which runs a
read on every database in a read-only transaction with a statement timeout): runs by index and keyset, a run
by its primary key and its records by the flow index, the runs failed in the last hour by the finished index.
The statements are core/sql/dashboard.sql's ``dashboard_flow_*``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from core.db import Conn
from core.queries import Queries
from core.web.filters import MAX_ID, RunFilter
from core.web.flowdata import (
    ERROR_SHOWN,
    FAILED_CAP,
    PER_STEP,
    RESULT_SHOWN,
    RUN_CAP,
    RUN_COLUMNS,
    RUN_WINDOW,
    Position,
    RunDetail,
    build_steps,
    shown,
)

T = TypeVar("T")
Each = Callable[[Callable[[Conn, Queries], Any]], list[Any]]
RUN_DETAIL = ("id", "flow", "version", "status", "input", "dedupe_key", "failed_step", "error", "on_failure_id",
              "created_at", "updated_at", "finished_at")
STEP_RECORD = ("step", "id", "status", "attempts", "max_attempts", "index", "last_error", "result", "queue",
               "finished_at", "waiting_on")
MAX_FLOWS = 200
MICROSECOND = timedelta(microseconds=1)


def runs_window(each: Each, f: RunFilter, position: Position | None, limit: int
                ) -> list[tuple[list[dict[str, Any]], Position | None]]:
    """Per database, a window of runs (see :meth:`core.web.flowdata.FlowReads.runs_window`). Without a status
    every run read matches: no window end is read, the page's LIMIT is the window."""
    if f.flow is not None:
        at, after = position if position is not None else (None, None)
        params: dict[str, Any] = {"flow": f.flow, "status": f.status, "at": at, "after": after,
                                  "window": RUN_WINDOW, "limit": limit}

        def by_flow(conn: Conn, q: Queries) -> tuple[list[dict[str, Any]], Position | None]:
            end = None
            if f.status is not None:
                found = conn.execute(q.dashboard_flow_runs_by_flow_end, params).fetchone()
                end = None if found is None else found[0]
            rows = conn.execute(q.dashboard_flow_runs_by_flow, {**params, "end_at": end}).fetchall()
            # The window ends below every run started at `end`: the position just before that moment, with
            # an id above all (timestamps are in microseconds), which a link carries as it is.
            return ([dict(zip(RUN_COLUMNS, r, strict=True)) for r in rows],
                    None if end is None else (end - MICROSECOND, MAX_ID))

        return each(by_flow)
    params = {"status": f.status, "after": position[0] if position else None, "window": RUN_WINDOW,
              "limit": limit}

    def by_id(conn: Conn, q: Queries) -> tuple[list[dict[str, Any]], Position | None]:
        end = conn.execute(q.dashboard_flow_runs_end, params).fetchone() if f.status is not None else None
        rows = conn.execute(q.dashboard_flow_runs, {**params, "end": end[0] if end else None}).fetchall()
        return [dict(zip(RUN_COLUMNS, r, strict=True)) for r in rows], (end[0],) if end else None

    return each(by_id)


def flow_run(each: Each, run_id: int, payloads: bool) -> RunDetail | None:
    """The run on whichever database holds it: its row and definition, its records counted by step and state
    (up to :data:`RUN_CAP`), and the records shown per step."""

    def read(conn: Conn, q: Queries) -> RunDetail | None:
        row = conn.execute(q.dashboard_flow_run, {"run": run_id, "payload": payloads}).fetchone()
        if row is None:
            return None
        run = dict(zip(RUN_DETAIL, row[:-1], strict=True))
        counts = [(str(s), str(st), int(n), bool(ph)) for s, st, n, ph in
                  conn.execute(q.dashboard_flow_counts, {"run": run_id, "cap": RUN_CAP}).fetchall()]
        capped = sum(n for _, _, n, _ in counts) >= RUN_CAP
        per_step: dict[str, list[int]] = {}
        for step, status, n, _ in counts:
            tally = per_step.setdefault(step, [0, 0])
            tally[0] += n
            tally[1] += n if status in ("failed", "processing") else 0
        steps = sorted(per_step)
        # At most as many as counted: a walk never looks for records that are not there (past the cap, a
        # step's records are not shown: its counts say the run is larger than they cover).
        firsts = [min(PER_STEP, per_step[s][0]) for s in steps]
        hots = [min(PER_STEP, per_step[s][1]) for s in steps]
        rows = conn.execute(q.dashboard_flow_step_records, {
            "run": run_id, "steps": steps, "firsts": firsts, "hots": hots, "payload": payloads,
            "error_chars": ERROR_SHOWN + 1, "result_chars": RESULT_SHOWN + 1}).fetchall()
        records = []
        for r in rows:
            rec = dict(zip(STEP_RECORD, r, strict=True))
            rec["last_error"] = shown(rec["last_error"], ERROR_SHOWN)
            rec["result"] = shown(rec["result"], RESULT_SHOWN)
            records.append(rec)
        return RunDetail(run, build_steps(row[-1], counts, records), capped)

    for found in each(read):
        if found is not None:
            return found  # type: ignore[no-any-return]
    return None


def failed_runs(each: Each) -> tuple[int, bool]:
    """Runs failed in the last hour, summed over the databases; a lower bound when one read stopped at its cap."""
    parts = each(lambda c, q: c.execute(q.dashboard_flow_failed_recent, {"cap": FAILED_CAP}).fetchone())
    failed = sum(int(p[0]) for p in parts if p)
    return failed, any(int(p[1]) >= FAILED_CAP for p in parts if p)


def flow_names(each: Each) -> list[str]:
    parts = each(lambda c, q: c.execute(q.dashboard_flow_names, {"limit": MAX_FLOWS}).fetchall())
    return sorted({str(r[0]) for rows in parts for r in rows})[:MAX_FLOWS]
