"""The dashboard's actions, each a POST (the guard refuses them read-only or cross-origin): retry, cancel and
purge on chosen records or on everything a filter matches; the queue settings (pending limit, rate, pause and
resume) and key rates; firing the due schedules and removing one (confirmed).

Bulk actions go through the processor's public API (``retry_failed(ids)``, ``cancel(ids)``; a purge of chosen
finished records is the source's guarded delete, the API purging by age only). "Everything the filter
matches" is confirmed first: the confirmation shows how many records the action applies to and the highest
id then; confirmed, the action takes the matching records up to that id (none that arrived since), newest
first, at most :data:`BULK_LIMIT` per confirmation, in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.web.filters import (
    ACTION_STATUSES,
    BadRequest,
    NotFound,
    RecordFilter,
    count,
    duration,
    optional_id,
    record_id,
    required,
    text,
)
from core.web.pages import ROUTES, View, can_pause, can_rate, has_schedules

MAX_REASON = 1000         # a pause's reason (the processor takes as much)
MAX_PATTERN = 512         # a key or key pattern (core.checks.MAX_KEY)

BULK_LIMIT = 10_000       # records one confirmation acts on at most
BULK_BUDGET = 20.0        # seconds the search for the matching records may take
CHUNK = 1000              # ids per API call


@dataclass(frozen=True)
class Redirect:
    url: str


@dataclass(frozen=True)
class Render:
    template: str
    context: dict[str, Any]


Result = Redirect | Render


@dataclass(frozen=True)
class Action:
    name: str
    path: str
    handler: Callable[[View], Result]
    available: Callable[[Any], bool]


ACTIONS: list[Action] = []


def action(name: str, path: str, *, available: Callable[[Any], bool] = lambda p: True) -> Callable[
        [Callable[[View], Result]], Callable[[View], Result]]:
    """Register a POST handler as action ``name``."""
    def register(handler: Callable[[View], Result]) -> Callable[[View], Result]:
        ACTIONS.append(Action(name, path, handler, available))
        ROUTES[name] = path
        return handler

    return register


def choice(form: Any, name: str, allowed: tuple[str, ...] | dict[str, Any]) -> str:
    value = form.get(name)
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}")
    return str(value)


def act(v: View, do: str, ids: list[int]) -> int:
    """Run action ``do`` on ``ids`` in chunks; how many records it changed."""
    done = 0
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        if do == "retry":
            done += int(v.processor.retry_failed(chunk))
        elif do == "cancel":
            done += len(v.processor.cancel(chunk))
        else:
            done += v.source.purge(chunk)
    return done


@action("bulk", "/records/bulk")
def bulk(v: View) -> Result:
    form = v.form
    do = choice(form, "do", ACTION_STATUSES)
    scope = choice(form, "scope", ("selected", "filter"))
    confirmed = form.get("confirm") == "1"
    f = RecordFilter.parse(form)
    if scope == "selected":
        ids = sorted({record_id(i) for i in form.getlist("id")}, reverse=True)
        if not ids:
            raise BadRequest("no record selected")
        if len(ids) > BULK_LIMIT:
            raise BadRequest(f"at most {BULK_LIMIT:,} records at once")
        complete, upto = True, None
    else:
        upto = optional_id(form, "upto")
        if upto is None:
            span = v.source.id_range()
            upto = span[1] if span else 0
        ids, complete = v.source.matching_ids(f, ACTION_STATUSES[do], upto, BULK_LIMIT, BULK_BUDGET)
    if not confirmed and (scope == "filter" or do == "purge" or form.get("back") != "record"):
        return Render("confirm.html", {"do": do, "scope": scope, "ids": ids, "filter": f, "upto": upto,
                                       "complete": complete, "limit": BULK_LIMIT,
                                       "applies_to": ACTION_STATUSES[do], "back": form.get("back")})
    n = act(v, do, ids)
    if form.get("back") == "record" and len(ids) == 1:
        return Redirect(v.url("record", id=ids[0], done=do, n=n))
    return Redirect(v.url("records", **f.query(), done=do, n=n))


@action("queue_action", "/queues/action")
def queue_action(v: View) -> Result:
    """A queue's pending limit, rate, pause and resume: ``do`` = limit (``n``, empty removes it), rate (``n``
    records per ``per``, a duration, 1 s when empty), unrate, pause (optional ``reason`` and ``until``, a
    duration from now: it resumes by itself then), resume."""
    form = v.form
    do = choice(form, "do", ("limit", "rate", "unrate", "pause", "resume"))
    queue = required(form, "queue")
    if do == "limit":
        raw = str(form.get("n") or "").strip()
        v.processor.set_queue_limit(queue, None if raw == "" else (0 if raw == "0" else record_id(raw, "n")))
    elif do in ("rate", "unrate"):
        n, per = (count(form, "n"), duration(form, "per") or 1.0) if do == "rate" else (None, 1.0)
        if not can_rate(v.processor):
            raise BadRequest("this processor cannot limit rates")
        v.processor.set_queue_rate(queue, n, per)
    else:
        reason = text(form, "reason", MAX_REASON) if do == "pause" else None
        until = duration(form, "until") if do == "pause" else None
        if not can_pause(v.processor):
            raise BadRequest("this processor cannot pause queues")
        if do == "pause":
            v.processor.pause(queue, until=until, reason=reason)
        elif not v.processor.resume(queue):
            do = "not_paused"
    return Redirect(v.url("queues", done=do))


@action("key_rate", "/queues/key-rates", available=can_rate)
def key_rate(v: View) -> Result:
    """A key rate: ``do`` = set (``pattern``, ``n`` records per ``per``) or remove (``pattern``)."""
    form = v.form
    do = choice(form, "do", ("set", "remove"))
    pattern = required(form, "pattern", MAX_PATTERN)
    if do == "set":
        v.processor.set_key_rate(pattern, count(form, "n"), duration(form, "per") or 1.0)
    else:
        v.processor.set_key_rate(pattern, None)
    return Redirect(v.url("queues", done="key_rate" if do == "set" else "key_unrate"))


@action("schedule_fire", "/schedules/fire", available=has_schedules)
def schedule_fire(v: View) -> Result:
    """Fire the due ticks now (``fire_due_schedules()``: what a running worker does; each tick fires once)."""
    return Redirect(v.url("schedules", done="fire", n=int(v.processor.fire_due_schedules())))


@action("schedule_remove", "/schedules/remove", available=has_schedules)
def schedule_remove(v: View) -> Result:
    """Remove schedule ``name``, confirmed first (``confirm=1``); the records it added stay."""
    name = required(v.form, "name")
    if v.form.get("confirm") != "1":
        found = [s for s in v.source.schedules() if s["name"] == name]
        if not found:
            raise NotFound(f"no schedule named {name!r}")
        return Render("unschedule.html", {"schedule": found[0]})
    removed = bool(v.processor.unschedule(name))
    return Redirect(v.url("schedules", done="unschedule" if removed else "no_schedule"))
