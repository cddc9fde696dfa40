"""Flows in memory: the twins of migration 0010's functions (core/sql/ddl/0010_flows.sql) over the flow
tables of :class:`~core.testing.tables.MemoryTables` (the statements of core/sql/flows.sql are
:mod:`core.testing.flowqueries`).

Each method names the function it twins and follows it step by step: the same guards, the same columns
changed, the same order of rounds, so a run settles here exactly as it does in the database. Callers hold the
tables' lock (a statement, or a transaction, is one lock hold) and call :meth:`MemoryFlows.settle_rows` with
the rows their fenced update changed, where the real statements call ``dp_flow_settle``: only rows that update
moved settle. What the functions do only for the database (row locks, floor announcements, NOTIFY) has no
twin but the wake-up of idle runs when records become claimable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from core.constants import FINAL_STATUSES
from core.errors import FlowDefinitionChanged
from core.flows.run import FlowRun, StartRequest
from core.testing import pg
from core.testing.tables import Edge, MemoryTables, Row, RunRow

_loads = json.JSONDecoder().decode
UNFINISHED = ("waiting", "pending", "processing")


def jsonb_text(value: Any) -> str:
    """A decoded JSON value as the text JSONB gives back (what a row's payload holds)."""
    return json.dumps(pg.jsonb(value), separators=(",", ":"))


def jsonb_typeof(value: Any) -> str:
    kinds = ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"), (type(None), "null"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "number")


class MemoryFlows:
    """The flow functions of one processor's view of ``tables``."""

    def __init__(self, tables: MemoryTables) -> None:
        self.tables = tables
        self.after = 0  # where the defect sweep's next slice starts

    # ------------------------------------------------------------------ helpers

    def _new_id(self) -> int:
        t = self.tables
        rid, t.next_id = t.next_id, t.next_id + 1
        return rid

    def _edge(self, edge: Edge) -> None:
        f = self.tables.flows
        f.children.setdefault(edge.parent, []).append(edge)
        f.parents.setdefault(edge.child, []).append(edge)

    def _insert(self, row: Row, run: RunRow) -> None:
        self.tables.insert(row)
        run.records.append(row.id)

    def _result(self, rid: int) -> Any:
        row = self.tables.rows.get(rid)
        return None if row is None or row.result is None else pg.jsonb(_loads(row.result))

    def _run_rows(self, run: RunRow) -> list[Row]:
        rows = self.tables.rows
        return [rows[i] for i in sorted(run.records) if i in rows]

    def _unfinished_parent(self, rid: int) -> bool:
        rows = self.tables.rows
        return any(p is not None and p.status not in FINAL_STATUSES
                   for p in (rows.get(e.parent) for e in self.tables.flows.parents.get(rid, ())))

    def unfinished(self, run: RunRow) -> bool:
        """A record of ``run`` has not finished (waiting, pending or processing)."""
        return any(r.status in UNFINISHED for r in self._run_rows(run))

    def unfinished_run(self, row: Row) -> bool:
        """``purge``'s guard: ``row`` is a step of a run with a record not finished (retention keeps it)."""
        run = None if row.flow_run_id is None else self.tables.flows.runs.get(row.flow_run_id)
        return run is not None and self.unfinished(run)

    # ------------------------------------------------------------------ starting

    def start(self, req: StartRequest, now: datetime) -> FlowRun:
        """``dp_start_flow``: the template checked against the stored definition of its version (changed:
        nothing written), the dedupe key (the running run of the flow holding it is returned), the run, its
        records in the template's order (roots pending, every other step waiting on its count of parents),
        their edges."""
        f = self.tables.flows
        stored = f.templates.setdefault((req.flow, req.version), (req.hash, req.definition))
        if stored[0] != req.hash:
            raise FlowDefinitionChanged(req.flow, req.version)
        run_id = self._new_id()  # nextval: taken whether or not the run is written
        if req.dedupe_key is not None:
            held = next((r for r in f.runs.values() if r.flow == req.flow and r.dedupe_key == req.dedupe_key
                         and r.status == "running"), None)
            if held is not None:
                ids: dict[str, int] = {}
                for row in self._run_rows(held):
                    if row.id != held.on_failure_id and row.step is not None:
                        ids.setdefault(row.step, row.id)
                return FlowRun(held.id, req.flow, req.version, ids, True, 0)
        text = jsonb_text(req.input)
        run = f.runs[run_id] = RunRow(run_id, req.flow, req.version, text, req.dedupe_key, now, now,
                                      trace_context=req.trace)
        ids = {}
        for s in req.steps:
            each = s["each"]
            row = Row(self._new_id(), s["queue"], text, s["priority"], now, s["max_attempts"], now,
                      ordering_key=s["ordering_key"], status="waiting", updated_at=now, flow_run_id=run_id,
                      step=s["name"], flow_index=None if each is None else -1,
                      waiting_on=len(s["after"]) + (each is not None), trace_context=req.trace)
            self._insert(row, run)
            ids[s["name"]] = row.id
        for s in req.steps:
            for parent in dict.fromkeys([*s["after"], *([] if s["each"] is None else [s["each"]])]):
                self._edge(Edge(ids[parent], ids[s["name"]], run_id, parent == s["each"], s["policy"] == "run"))
        self.release([ids[s["name"]] for s in req.steps if not s["after"] and s["each"] is None], now)
        return FlowRun(run_id, req.flow, req.version, ids, False, 0)

    # ------------------------------------------------------------------ settling

    def release(self, ids: Iterable[int], now: datetime) -> int:
        """``dp_flow_release``: waiting records made pending from now (and idle runs woken)."""
        t, n = self.tables, 0
        for rid in sorted(set(ids)):
            row = t.rows.get(rid)
            if row is not None and row.status == "waiting":
                row.waiting_on = 0
                t.move(row, "pending", now)
                row.updated_at = now
                n += 1
        if n:
            t.changed()
        return n

    def expand(self, ph: Row, result: str | None, now: datetime) -> int:
        """``dp_flow_expand``: a for_each placeholder given its source's result (JSON text, None: NULL): one
        record per element in element order, each with the placeholder's parents and children (whose counts
        grow by the copies). The number of elements; 0: completed with none; -1: not a list, failed."""
        t, f = self.tables, self.tables.flows
        value = None if result is None else _loads(result)
        kind = "missing" if result is None else jsonb_typeof(value)
        if not isinstance(value, list):
            t.move(ph, "failed")
            ph.finished_at = ph.updated_at = now
            ph.last_error = f"for_each: the result its source gave is {kind}, not a list"
            return -1
        n = len(value)
        if n == 0:
            t.move(ph, "completed")
            ph.finished_at = ph.updated_at = now
            ph.waiting_on = 0
            return 0
        ph.payload, ph.flow_index, ph.updated_at = jsonb_text(value[0]), 0, now
        if n == 1:
            return 1
        assert ph.flow_run_id is not None
        run = f.runs[ph.flow_run_id]
        new = []
        for i in range(1, n):
            row = Row(self._new_id(), ph.queue, jsonb_text(value[i]), ph.priority, ph.run_at, ph.max_attempts, now,
                      ordering_key=ph.ordering_key, status="waiting", updated_at=now, flow_run_id=ph.flow_run_id,
                      step=ph.step, flow_index=i, waiting_on=ph.waiting_on, trace_context=ph.trace_context)
            self._insert(row, run)
            new.append(row.id)
        ups, downs = list(f.parents.get(ph.id, ())), list(f.children.get(ph.id, ()))
        for c in new:
            for e in ups:
                self._edge(Edge(e.parent, c, e.run, e.each, e.run_on_failure))
        for c in new:
            for e in downs:
                self._edge(Edge(c, e.child, e.run, e.each, e.run_on_failure))
        for child in {e.child for e in downs}:
            below = t.rows.get(child)
            if below is not None and below.status == "waiting":
                below.waiting_on += n - 1
        return n

    def settle_rows(self, rows: Iterable[Row], now: datetime) -> int:
        """The ``settled`` step of a fenced statement (claim, fail, recovery, cancel): of the flow records it
        moved, the completed ones and those ended failed or cancelled settle their runs."""
        done: list[int] = []
        ended: list[int] = []
        for row in rows:
            if row.flow_run_id is None:
                continue
            if row.status == "completed":
                done.append(row.id)
            elif row.status in ("failed", "cancelled"):
                ended.append(row.id)
        return self.settle(done, ended, now) if done or ended else 0

    def settle(self, done: list[int], ended: list[int], now: datetime) -> int:
        """``dp_flow_settle``: ``done`` completed (their results on their rows), ``ended`` failed or cancelled.
        Round by round: completed sources fan out their for_each placeholders; children of an ended parent that
        do not run without it are cancelled naming the step; the others count every finished parent of the
        round at once, those at zero pending at once (a placeholder at zero finishes with no element); the
        completed records without children (sinks) kept. Then the first failure fails its run (ended then) and
        makes its on_failure step claimable (once), and a run with a sink completed here and no record left
        unfinished completes. Returns how many records became claimable."""
        t, f = self.tables, self.tables.flows
        done, ended = sorted(done), sorted(ended)
        if not done and not ended:
            return 0
        failed, sinks, released = list(ended), list[int](), 0
        while True:
            next_done: list[int] = []
            next_ended: list[int] = []
            fan = sorted({(e.child, e.parent) for p in set(done) for e in f.children.get(p, [])
                          if e.each and self._placeholder(e.child)})
            for child, parent in fan:  # the query's rows are read before the loop changes them
                src = t.rows.get(parent)
                n = self.expand(t.rows[child], None if src is None else src.result, now)
                if n == 0:
                    next_done.append(child)
                elif n < 0:
                    next_ended.append(child)
                    failed.append(child)
            next_ended += self._cancel_children(ended, now)
            pairs = [e for p in sorted(set(done)) for e in f.children.get(p, [])]
            pairs += [e for p in sorted(set(ended)) for e in f.children.get(p, []) if e.run_on_failure]
            parents_here = {e.parent for e in pairs}
            sinks += [d for d in done if d not in parents_here]
            empty: list[int] = []
            for child, k in sorted(Counter(e.child for e in pairs).items()):
                row = t.rows.get(child)
                if row is None or row.status != "waiting":
                    continue
                row.waiting_on -= k
                row.updated_at = now
                if row.waiting_on > 0:
                    continue
                if row.flow_index == -1:  # run_at moves too, as the statement's
                    row.run_at = now
                    empty.append(child)
                else:
                    t.move(row, "pending", now)
                    released += 1
            for child in empty:  # a placeholder whose source ended and which runs without it: finished with []
                row = t.rows[child]
                t.move(row, "completed")
                row.finished_at = row.updated_at = now
                next_done.append(child)
            if not next_done and not next_ended:
                break
            done, ended = next_done, next_ended
        if released:
            t.changed()  # dp_flow_announce: idle runs look again
        return released + self._settle_runs(failed, sinks, now)

    def _cancel_children(self, ended: list[int], now: datetime) -> list[int]:
        """The waiting children of ``ended`` that do not run without them, cancelled naming the first parent."""
        t, f = self.tables, self.tables.flows
        why: dict[int, str] = {}
        for p in sorted(set(ended)):  # DISTINCT ON (child), the first parent by id
            prow = t.rows.get(p)
            if prow is None:
                continue
            for e in f.children.get(p, []):
                if not e.run_on_failure and e.child not in why:
                    why[e.child] = f"dependency {prow.step or ''} {prow.status}"
        out = []
        for child in sorted(why):
            row = t.rows.get(child)
            if row is not None and row.status == "waiting":
                t.move(row, "cancelled")
                row.finished_at = row.updated_at = now
                row.waiting_on = 0
                row.last_error = why[child]
                out.append(child)
        return out

    def _placeholder(self, rid: int) -> bool:
        row = self.tables.rows.get(rid)
        return row is not None and row.status == "waiting" and row.flow_index == -1

    def _settle_runs(self, failed: list[int], sinks: list[int], now: datetime) -> int:
        """The runs' part of ``dp_flow_settle``, in run id order: failures first, then completions."""
        t, f = self.tables, self.tables.flows
        first: dict[int, int] = {}
        for rid in sorted(failed):
            row = t.rows.get(rid)
            if row is not None and row.flow_run_id is not None:
                first.setdefault(row.flow_run_id, rid)
        released = 0
        for run_id, fid in sorted(first.items()):
            run = f.runs.get(run_id)
            if run is None or run.status != "running":
                continue
            r = t.rows[fid]
            run.status, run.failed_step, run.finished_at, run.updated_at = "failed", r.step, now, now
            run.error = r.last_error if r.last_error is not None else f"step {r.step} {r.status}"
            handler = f.templates.get((run.flow, run.version), ("", {}))[1].get("on_failure")
            if isinstance(handler, dict):
                row = Row(self._new_id(), handler["queue"], run.input, int(handler["priority"]), now,
                          int(handler["max_attempts"]), now, status="waiting", updated_at=now,
                          flow_run_id=run.id, step=handler["name"], trace_context=run.trace_context)
                self._insert(row, run)
                run.on_failure_id = row.id
                released += self.release([row.id], now)
        for run_id in sorted({r.flow_run_id for r in (t.rows.get(i) for i in sinks)
                              if r is not None and r.flow_run_id is not None}):
            run = f.runs.get(run_id)
            if run is not None and run.status == "running" and not self.unfinished(run):
                run.status, run.finished_at, run.updated_at = "completed", now, now
        return released

    def parents(self, row: Row) -> dict[str, Any]:
        """``dp_flow_parents``: {step: result} of the parents that completed; a for_each step's results as a list
        in element order (an element not completed: null; none: []). A run's on_failure record: every step."""
        t, f = self.tables, self.tables.flows
        src = [t.rows[e.parent] for e in f.parents.get(row.id, ()) if e.parent in t.rows]
        run = None if row.flow_run_id is None else f.runs.get(row.flow_run_id)
        if run is not None and run.on_failure_id == row.id:
            src += [r for r in self._run_rows(run) if r.id != row.id]
        groups: dict[str, list[Row]] = {}
        for r in src:
            if r.status == "completed" or r.flow_index is not None:
                groups.setdefault(r.step or "", []).append(r)
        out: dict[str, Any] = {}
        for step, rs in groups.items():
            if all(r.flow_index is None for r in rs):
                out[step] = self._result(rs[0].id)
            else:
                each = sorted((r for r in rs if r.flow_index is not None and r.flow_index >= 0),
                              key=lambda r: r.flow_index or 0)
                out[step] = [self._result(r.id) if r.status == "completed" else None for r in each]
        return pg.jsonb(out)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ operator actions

    def cancel(self, run_id: int, now: datetime) -> str | None:
        """``dp_cancel_flow``: the run cancelled (if running); its waiting and pending records cancelled at
        once, processing ones flagged; the records cancelled settle. The run's status after (None: no run)."""
        t = self.tables
        run = t.flows.runs.get(run_id)
        if run is None:
            return None
        if run.status == "running":
            run.status, run.finished_at, run.updated_at = "cancelled", now, now
        status = run.status
        cancelled = []
        for row in self._run_rows(run):
            if row.status not in ("waiting", "pending", "processing"):
                continue
            if row.status != "processing":
                t.move(row, "cancelled")
                row.finished_at = now
                t.drop_dedupe(row)
                row.last_error = "flow run cancelled"
                cancelled.append(row.id)
            row.cancel_requested, row.waiting_on, row.updated_at = True, 0, now
        self.settle([], cancelled, now)
        return status

    def repair(self, ids: Iterable[int], now: datetime) -> int:
        """``dp_flow_repair``: each waiting record none of whose parents is unfinished (checked again) set
        right: cancelled when a parent it does not run without did not complete, a placeholder fanned out from
        its source's stored result, released otherwise. How many were repaired."""
        t, f = self.tables, self.tables.flows
        n = 0
        for rid in sorted(set(ids)):
            d = t.rows.get(rid)
            if d is None or d.status != "waiting" or self._unfinished_parent(rid):
                continue
            n += 1
            if any(not e.run_on_failure and (p := t.rows.get(e.parent)) is not None and p.status != "completed"
                   for e in f.parents.get(rid, ())):
                t.move(d, "cancelled")
                d.finished_at = d.updated_at = now
                d.waiting_on = 0
                d.last_error = "dependency failed (repaired)"
                self.settle([], [rid], now)
                continue
            if d.flow_index == -1:
                src = next((e.parent for e in f.parents.get(rid, ()) if e.each), None)
                found = None if src is None else t.rows.get(src)
                k = self.expand(d, None if found is None else found.result, now)
                if k == 0:
                    self.settle([rid], [], now)
                elif k < 0:
                    self.settle([], [rid], now)
                else:
                    run = f.runs[d.flow_run_id] if d.flow_run_id is not None else None
                    self.release([r.id for r in (self._run_rows(run) if run else ())
                                  if r.step == d.step and r.status == "waiting"], now)
                continue
            self.release([rid], now)
        return n
