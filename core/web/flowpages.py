"""The dashboard's flow pages and action: ``flows`` (the latest runs, by flow and status, keyset-paginated),
``flow`` (a run: its steps as a graph with their states, each step's records, its input) and ``flow_cancel``
(cancel a run, confirmed first: ``processor.cancel_flow``). Registered where the processor has flows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.constants import FLOW_RUN_STATUSES
from core.web.actions import Redirect, Render, Result, action
from core.web.charts import timestamp
from core.web.filters import (
    DEFAULT_LIMIT,
    BadRequest,
    NotFound,
    RunFilter,
    cursor_time,
    limit,
    optional_id,
    record_id,
)
from core.web.flowdata import FlowsUnavailable, Position, RunDetail
from core.web.graph import layout
from core.web.pages import View, has_flows, page
from core.web.source import from_micros, micros


def run_cursor(params: Mapping[str, Any], f: RunFilter) -> Position | None:
    """Where a page of runs starts: below run ``after`` (by id), or, within one flow, below (``at``, ``after``)
    in (created_at, id) order: both go together there, and ``at`` nowhere else."""
    after = optional_id(params, "after")
    at = cursor_time(params)
    if f.flow is None:
        if at is not None:
            raise BadRequest("at is only a cursor within one flow's runs (with flow=...)")
        return None if after is None else (after,)
    if (after is None) != (at is None):
        raise BadRequest("within one flow's runs, after and at go together")
    return None if after is None or at is None else (from_micros(at), after)


def cursor_query(position: Position | None, by_flow: bool) -> dict[str, Any]:
    if position is None:
        return {}
    return {"at": micros(position[0]), "after": position[1]} if by_flow else {"after": position[0]}


@page("flows", "/flows", "Flows", available=has_flows)
def flows(v: View) -> dict[str, Any]:
    f = RunFilter.parse(v.params)
    cursor = run_cursor(v.params, f)
    size = limit(v.params)
    shown = None if size == DEFAULT_LIMIT else size
    newest = v.url("flows", limit=shown, **f.query()) if cursor else None
    base = {"filter": f, "states": FLOW_RUN_STATUSES, "newest": newest}
    try:
        found = v.source.runs(f, cursor, size)
        names = v.source.flow_names()
    except FlowsUnavailable as exc:
        return {**base, "unavailable": str(exc), "runs": [], "names": [], "older": None, "searched": None}
    older = None
    if found.next is not None:
        older = v.url("flows", limit=shown, **f.query(), **cursor_query(found.next, f.flow is not None))
    searched = None
    if found.searched and found.next is not None:
        searched = (f"runs started at {timestamp(found.next[0])} or before" if f.flow is not None
                    else f"run {found.next[0]}")
    return {**base, "unavailable": None, "runs": found.rows, "names": names, "older": older, "searched": searched}


def run_of(v: View, rid: int, payloads: bool) -> RunDetail:
    try:
        found = v.source.flow_run(rid, payloads)
    except FlowsUnavailable as exc:
        raise NotFound(f"no flow run {rid}: {exc}") from None
    if found is None:
        raise NotFound(f"no flow run {rid}" + (" on the shards that answered" if v.source.down else ""))
    return found


def cancellable(d: RunDetail) -> bool:
    """A run is offered Cancel while it runs, or while records of it are unfinished (steps that run despite a
    failed parent, its on_failure step)."""
    return d.run["status"] == "running" or d.unfinished > 0


@page("flow", "/flows/{id}", "Flow run", nav=False, available=has_flows)
def flow(v: View) -> dict[str, Any]:
    rid = record_id(v.request.path_params["id"], "run")
    d = run_of(v, rid, not v.options.hide_payloads)
    return {"d": d, "r": d.run, "graph": layout(d.steps, d.run.get("failed_step")), "cancellable": cancellable(d)}


@action("flow_cancel", "/flows/cancel", available=has_flows)
def flow_cancel(v: View) -> Result:
    """Cancel run ``run``, confirmed first (``confirm=1``): ``processor.cancel_flow`` cancels what of it has not
    finished (processing records are flagged) and ends it cancelled."""
    rid = record_id(v.form.get("run") or "", "run")
    if v.form.get("confirm") != "1":
        d = run_of(v, rid, False)
        return Render("flow_cancel.html", {"d": d, "r": d.run})
    status = v.processor.cancel_flow(rid)
    if status is None:
        raise NotFound(f"no flow run {rid}")
    return Redirect(v.url("flow", id=rid, done="flow_cancel" if status == "cancelled" else "flow_ended"))
