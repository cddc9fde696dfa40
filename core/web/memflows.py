"""The dashboard's flow reads over the in-memory processor, through its public methods (``list_flow_runs``,
``flow_status``): what any processor offers, so the pages work whatever the in-memory tables hold. The one
thing those methods do not give, a template's definition (the steps' parents: the graph), is read from the
tables when they keep it; without it the steps are drawn without edges. A processor whose store has no flows
(the methods raise) makes the flows pages say so (:class:`~core.web.flowdata.FlowsUnavailable`)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from core.web.filters import RunFilter
from core.web.flowdata import (
    ERROR_SHOWN,
    FAILED_CAP,
    FlowsUnavailable,
    Position,
    RunDetail,
    build_steps,
    pick_records,
    position_of,
    pretty,
    shown,
)

MEMORY_RUNS = 10_000  # runs list_flow_runs gives at most: an in-memory processor's runs, newest first


class MemoryFlowReads:
    """Mixed into :class:`core.web.memsource.MemorySource` (``processor``, ``tables``)."""

    processor: Any
    tables: Any

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.processor, method, None)
        if not callable(fn):
            raise FlowsUnavailable(f"this processor has no {method}()")
        try:
            return fn(*args, **kwargs)
        except (AttributeError, NotImplementedError) as exc:  # a store without flows
            raise FlowsUnavailable(f"this processor's store does not run flows ({type(exc).__name__})") from None

    def _definition(self, flow: str, version: int) -> dict[str, Any] | None:
        """The stored definition of ``flow`` at ``version``, when the in-memory tables keep templates."""
        with self.tables.lock:
            templates = getattr(getattr(self.tables, "flows", None), "templates", None)
            found = templates.get((flow, version)) if isinstance(templates, dict) else None
        if isinstance(found, tuple) and len(found) == 2 and isinstance(found[1], dict):
            return found[1]
        return None

    def _waiting_on(self, record_id: int) -> int | None:
        """A waiting record's count of unfinished parents (``flow_status`` does not give it)."""
        with self.tables.lock:
            row = self.tables.rows.get(record_id)
            return getattr(row, "waiting_on", None) if row is not None and row.status == "waiting" else None

    def runs_window(self, f: RunFilter, position: Position | None, limit: int
                    ) -> list[tuple[list[dict[str, Any]], Position | None]]:
        by_flow = f.flow is not None
        runs = [dict(r) for r in self._call("list_flow_runs", flow=f.flow, status=f.status, limit=MEMORY_RUNS)]
        runs.sort(key=lambda r: position_of(r, by_flow), reverse=True)
        if position is not None:
            runs = [r for r in runs if position_of(r, by_flow) < position]
        for r in runs:
            r["error"] = shown(r.get("error"), 300)
        return [(runs[:limit], None)]

    def flow_run(self, run_id: int, payloads: bool) -> RunDetail | None:
        status = self._call("flow_status", run_id)
        if status is None:
            return None
        status = dict(status)
        run = {k: status.get(k) for k in ("id", "flow", "version", "status", "dedupe_key", "failed_step", "error",
                                           "on_failure_id", "created_at", "updated_at", "finished_at")}
        run["input"] = pretty(status.get("input"), 2**31) if payloads else None
        definition = self._definition(str(run["flow"]), int(run["version"] or 0))
        counts: list[tuple[str, str, int, bool]] = []
        records: list[dict[str, Any]] = []
        for step, rows in dict(status.get("steps") or {}).items():
            rows = sorted((dict(r) for r in rows), key=lambda r: int(r["id"]))
            tally: dict[str, int] = {}
            for r in rows:
                tally[str(r["status"])] = tally.get(str(r["status"]), 0) + 1
            counts += [(str(step), s, n, False) for s, n in tally.items()]
            for r in pick_records(rows):
                records.append({"step": step, "id": r["id"], "status": r["status"], "attempts": r.get("attempts"),
                                "max_attempts": r.get("max_attempts"), "index": r.get("index"),
                                "last_error": shown(r.get("last_error"), ERROR_SHOWN),
                                "result": pretty(r.get("result")) if payloads else None, "queue": r.get("queue"),
                                "finished_at": r.get("finished_at"), "waiting_on": self._waiting_on(r["id"])})
        if run["status"] == "running" and definition is not None:
            have = {c[0] for c in counts}
            counts += [(str(s["name"]), "waiting", 1, True) for s in definition.get("steps") or []
                       if s.get("each") is not None and s.get("name") not in have]  # not fanned out yet
        return RunDetail(run, build_steps(definition, counts, records))

    def failed_runs(self) -> tuple[int, bool] | None:
        runs = self._call("list_flow_runs", status="failed", limit=FAILED_CAP)
        since = self.tables.now() - timedelta(hours=1)
        return sum(1 for r in runs if r.get("finished_at") and r["finished_at"] >= since), len(runs) >= FAILED_CAP

    def flow_names(self) -> list[str]:
        with self.tables.lock:
            templates = getattr(getattr(self.tables, "flows", None), "templates", None)
            names = {str(k[0]) for k in templates} if isinstance(templates, dict) else set()
        if not names:
            names = {str(r["flow"]) for r in self._call("list_flow_runs", limit=MEMORY_RUNS)}
        return sorted(names)

    def step_result(self, record: dict[str, Any], payloads: bool) -> str | None:
        """A flow record's result, pretty-printed (``flow_status`` of its run holds it); None outside flows,
        for a record without one, or with payloads hidden."""
        run_id = record.get("flow_run_id")
        if not payloads or run_id is None:
            return None
        try:
            status = self._call("flow_status", run_id)
        except FlowsUnavailable:
            return None
        for rows in dict((status or {}).get("steps") or {}).values():
            for r in rows:
                if r.get("id") == record["id"] and r.get("result") is not None:
                    return json.dumps(r["result"], indent=4, ensure_ascii=False, sort_keys=True, default=str)
        return None
