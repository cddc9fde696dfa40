"""The dashboard's pages: a registry (path, title, nav entry, whether the processor has the feature) and one
view per page, which reads through the request's source and returns its template's context.

A page is added with a view decorated by :func:`page`, a template ``templates/<name>.html``, and what it
reads as a method of :class:`core.web.source.Source`. Its nav entry appears when ``available(processor)``
says the processor has the feature (so pages of features still to come can be registered behind a
``hasattr`` check). Actions (POST) are registered the same way in :mod:`core.web.actions`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlencode

from starlette.datastructures import FormData
from starlette.requests import Request

from core.constants import STATUSES
from core.web import charts
from core.web.filters import (
    ACTION_STATUSES,
    DEFAULT_LIMIT,
    NotFound,
    RecordFilter,
    cursor_time,
    limit,
    optional_id,
    record_id,
)
from core.web.flowdata import FlowsUnavailable
from core.web.source import Count, QueueRow, Source


def always(processor: Any) -> bool:
    return True


def _has(processor: Any, *methods: str) -> bool:
    return all(callable(getattr(processor, m, None)) for m in methods)


def can_pause(processor: Any) -> bool:
    return _has(processor, "pause", "resume", "paused_queues")


def can_rate(processor: Any) -> bool:
    return _has(processor, "set_queue_rate", "set_key_rate", "rates")


def has_schedules(processor: Any) -> bool:
    return _has(processor, "list_schedules", "unschedule", "fire_due_schedules")


def has_flows(processor: Any) -> bool:
    return _has(processor, "list_flow_runs", "flow_status", "cancel_flow")


def sharded(processor: Any) -> bool:
    return hasattr(processor.store, "stores")


@dataclass(frozen=True)
class Options:
    read_only: bool = False
    hide_payloads: bool = False


@dataclass
class View:
    """One request as views and actions see it."""

    request: Request
    processor: Any
    source: Source
    options: Options
    form: FormData = field(default_factory=FormData)

    @property
    def params(self) -> Mapping[str, Any]:
        return self.request.query_params

    @property
    def prefix(self) -> str:
        """Where the app is mounted (links work under any path: FastAPI's mount, uvicorn's --root-path)."""
        return str(self.request.scope.get("root_path", "")).rstrip("/")

    def url(self, name: str, **params: Any) -> str:
        """The link to page or action ``name``: its path parameters filled in, the others as the query."""
        path = ROUTES[name]
        query = {}
        for key, value in params.items():
            if value is None or value == "":
                continue
            if "{" + key + "}" in path:
                path = path.replace("{" + key + "}", quote(str(value), safe=""))
            else:
                query[key] = value
        return self.prefix + path + (f"?{urlencode(query)}" if query else "")

    def static(self, name: str) -> str:
        return f"{self.prefix}/static/{quote(name)}"


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    title: str
    view: Callable[[View], dict[str, Any]]
    nav: bool = True
    available: Callable[[Any], bool] = always


PAGES: list[Page] = []
ROUTES: dict[str, str] = {}  # every page's and action's path, by name


def page(name: str, path: str, title: str, *, nav: bool = True,
         available: Callable[[Any], bool] = always) -> Callable[[Callable[[View], dict[str, Any]]],
                                                                Callable[[View], dict[str, Any]]]:
    """Register a view as page ``name`` (template ``<name>.html``)."""
    def register(view: Callable[[View], dict[str, Any]]) -> Callable[[View], dict[str, Any]]:
        PAGES.append(Page(name, path, title, view, nav, available))
        ROUTES[name] = path
        return view

    return register


DONE = {"retry": "Retried {n} record(s): pending again.", "cancel": "Cancelled {n} record(s).",
        "purge": "Purged {n} finished record(s).", "limit": "Queue limit saved.",
        "pause": "Queue paused: no record of it is claimed until it is resumed.",
        "resume": "Queue resumed.", "not_paused": "The queue was not paused: nothing to resume.",
        "rate": "Queue rate saved.", "unrate": "Queue rate removed.",
        "key_rate": "Key rate saved.", "key_unrate": "Key rate removed.",
        "fire": "Fired the due schedules: {n} record(s) added.", "unschedule": "Schedule removed.",
        "no_schedule": "No such schedule: nothing removed.",
        "flow_cancel": "Run cancelled: its records that had not finished are cancelled (one being processed ends "
                       "cancelled when its handler returns); its on_failure step does not run.",
        "flow_ended": "The run had already ended and keeps its status; its records that had not finished are "
                      "cancelled."}


def flash(params: Mapping[str, Any]) -> str | None:
    """The message of an action just done (a fixed text per action: nothing from the link is shown)."""
    done = params.get("done")
    if done not in DONE:
        return None
    n = params.get("n", "0")
    return DONE[str(done)].format(n=f"{int(n):,}" if str(n).isdigit() and len(str(n)) < 10 else "?")


def with_control(source: Source, queues: list[QueueRow], rates: dict[str, dict[str, Any]] | None = None
                 ) -> list[QueueRow]:
    """The queues with their paused state and rate; a queue paused or rated without records is listed too."""
    paused = source.paused()
    rates = rates or {}
    rows = {q.name: q for q in queues}
    for name in (set(paused) | set(rates)) - set(rows):
        rows[name] = QueueRow(name)
    for q in rows.values():
        q.paused = paused.get(q.name)
        q.rate = rates.get(q.name)
    return [rows[name] for name in sorted(rows)]


# ---------------------------------------------------------------------- pages


@page("overview", "/", "Overview")
def overview(v: View) -> dict[str, Any]:
    queues = with_control(v.source, v.source.queues())
    horizon, reasons = v.source.health_parts()  # a paused queue is a state, not a reason to be degraded
    instances = v.source.instances()
    now = datetime.now(timezone.utc)
    for inst in instances:
        inst["heartbeat_age"] = (now - inst["last_heartbeat_at"]).total_seconds()
    return {"queues": queues, "chart": charts.bars(v.source.chart(now)), "instances": instances,
            "horizon": horizon, "reasons": reasons, "paused": [q for q in queues if q.paused is not None],
            "status": "degraded" if reasons else "healthy", "failed_runs": failed_runs(v)}


def failed_runs(v: View) -> Count | None:
    """Flow runs failed in the last hour (at least, when the read stopped at its cap); None without flows."""
    if not has_flows(v.processor):
        return None
    try:
        found = v.source.failed_runs()
    except FlowsUnavailable:
        return None
    return None if found is None else Count(found[0], found[1])


@page("records", "/records", "Records")
def records(v: View) -> dict[str, Any]:
    f = RecordFilter.parse(v.params)
    after = optional_id(v.params, "after")
    size = limit(v.params)
    found = v.source.records(f, after, size, at=cursor_time(v.params))
    return {"filter": f, "found": found, "after": after or v.params.get("at"), "states": STATUSES,
            "actions": ACTION_STATUSES, "size": None if size == DEFAULT_LIMIT else size}


@page("record", "/records/{id}", "Record", nav=False)
def record(v: View) -> dict[str, Any]:
    rid = record_id(v.request.path_params["id"])
    row = v.source.record(rid, payload=not v.options.hide_payloads)
    if row is None:
        raise NotFound(f"no record {rid}" + (" on the shards that answered" if v.source.down else ""))
    neighbours = v.source.neighbours(row["ordering_key"], rid) if row["ordering_key"] is not None else []
    return {"r": row, "neighbours": neighbours, "actions": ACTION_STATUSES}


@page("queues", "/queues", "Queues")
def queues(v: View) -> dict[str, Any]:
    rates = v.source.rates()
    return {"queues": with_control(v.source, v.source.queues(), rates["queues"]), "settings": v.source.settings(),
            "key_rates": sorted(rates["keys"].items()), "can_pause": can_pause(v.processor),
            "can_rate": can_rate(v.processor)}


@page("instances", "/instances", "Instances")
def instances(v: View) -> dict[str, Any]:
    rows = v.source.instances(include_stopped=True)
    now = datetime.now(timezone.utc)
    for inst in rows:
        inst["heartbeat_age"] = (now - inst["last_heartbeat_at"]).total_seconds()
    return {"instances": rows}


@page("shards", "/shards", "Shards", available=sharded)
def shards(v: View) -> dict[str, Any]:
    return {"shards": v.source.shards()}


@page("schedules", "/schedules", "Schedules", available=has_schedules)
def schedules(v: View) -> dict[str, Any]:
    v.source.reach()
    paused = v.source.paused()
    now = datetime.now(timezone.utc)
    rows = []
    for s in v.source.schedules():
        every = s.get("every")
        next_fire = s.get("next_fire")
        rows.append({**s, "every_seconds": every.total_seconds() if isinstance(every, timedelta) else every,
                     "fired": int(s.get("fired") or 0), "paused": paused.get(str(s["queue"])),
                     "late": None if next_fire is None else (now - next_fire).total_seconds(),
                     "payload_text": payload_text(s.get("payload"))})
    return {"schedules": rows, "now": now}


PAYLOAD_SHOWN = 300  # characters of a schedule's payload shown on its line


def payload_text(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= PAYLOAD_SHOWN else text[:PAYLOAD_SHOWN] + "…"
