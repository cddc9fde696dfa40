"""Schedules: records added on a cron or interval cadence, once per tick however many instances run.

Any running worker may fire a due tick (no leader): it reads the schedule's ``next_fire``, computes the ticks
to fire by the misfire policy (:func:`core.cron.due_ticks`) and the next fire time, and runs one statement,
``dp_fire_schedule``, which moves ``next_fire`` on only if it still holds the value read (compare and swap)
and adds the tick's records in the same transaction, each with the dedupe key ``schedule:<name>:<tick>``.
The instance whose swap loses adds nothing. Ticks are UTC instants computed in the schedule's time zone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core import checks
from core.cron import Cadence, due_ticks
from core.db import Database
from core.errors import InvalidArgument
from core.payloads import encode_payload
from core.plans import Plan, Stmt, on

MISFIRE = ("skip", "latest", "all")
OVERLAP = ("allow", "skip_if_running")
ADD_OPTIONS = ("priority", "max_attempts", "ordering_key")
DUE_BATCH = 100  # schedules fired per look


@dataclass(frozen=True)
class ScheduleSpec:
    """A checked schedule declaration (``processor.schedule(...)``)."""

    name: str
    cadence: Cadence
    queue: str
    payload: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    misfire: str = "latest"
    backfill: float | None = None
    overlap: str = "allow"
    flow: str | None = None

    @classmethod
    def check(cls, name: object, *, cron: object, every: object, payload: object, queue: str, timezone: object,
              misfire: object, backfill: object, overlap: object, flow: object, options: dict[str, Any],
              max_payload_bytes: int) -> ScheduleSpec:
        checks.text("name", name, max_length=200)
        if cron is not None:
            checks.text("cron", cron, max_length=200)
        seconds = None if every is None else checks.seconds("every", every, allow_zero=False)
        if seconds is not None and seconds < 1:
            raise InvalidArgument(f"every must be at least one second, got {seconds:g}")
        checks.text("timezone", timezone, max_length=100)
        cadence = Cadence.parse(cron, seconds, str(timezone))  # type: ignore[arg-type]
        body = {} if payload is None else payload
        if not isinstance(body, dict):
            raise InvalidArgument(f"payload must be a dict, got {type(body).__name__}")
        encode_payload(0, body, max_payload_bytes)
        checks.check_queue_name(queue)
        if misfire not in MISFIRE:
            raise InvalidArgument(f"misfire must be one of {', '.join(MISFIRE)}, got {misfire!r}")
        if overlap not in OVERLAP:
            raise InvalidArgument(f"overlap must be one of {', '.join(OVERLAP)}, got {overlap!r}")
        window = checks.seconds("backfill", backfill, allow_zero=False, allow_none=True)
        if flow is not None:
            checks.text("flow", flow, max_length=200)
        unknown = sorted(set(options) - set(ADD_OPTIONS))
        if unknown:
            raise InvalidArgument(f"add_options: unknown {unknown}; a schedule's records take "
                                  f"{', '.join(ADD_OPTIONS)}")
        if "priority" in options:
            checks.new_priority(options["priority"])
        if "max_attempts" in options:
            checks.positive_int("max_attempts", options["max_attempts"])
        if "ordering_key" in options:
            checks.text("ordering_key", options["ordering_key"], max_length=checks.MAX_KEY)
        return cls(str(name), cadence, queue, body, dict(options), str(misfire), window, str(overlap),
                   None if flow is None else str(flow))

    def definition(self) -> str:
        """What makes two declarations the same (a changed one starts from the next tick after now)."""
        return json.dumps({"cron": self.cadence.cron, "every": self.cadence.every, "tz": self.cadence.tz,
                           "queue": self.queue, "payload": self.payload, "options": self.options,
                           "misfire": self.misfire, "backfill": self.backfill, "overlap": self.overlap,
                           "flow": self.flow}, sort_keys=True)

    def row(self, now: datetime) -> dict[str, Any]:
        """The declare statement's parameters (the first tick after ``now``)."""
        return {"name": self.name, "cron": self.cadence.cron, "every": self.cadence.every,
                "timezone": self.cadence.tz, "queue": self.queue, "payload": json.dumps(self.payload),
                "options": json.dumps(self.options), "misfire": self.misfire, "backfill": self.backfill,
                "overlap": self.overlap, "flow": self.flow, "definition": self.definition(),
                "next_fire": self.cadence.next_after(now)}


LIST_COLUMNS = ("name", "cron", "every", "timezone", "queue", "payload", "options", "misfire", "backfill",
                "overlap", "flow", "next_fire", "last_fire", "last_record_id", "fired", "created_at", "updated_at")


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(LIST_COLUMNS, row, strict=True))
    if out["every"] is not None:
        out["every"] = timedelta(seconds=float(out["every"]))
    return out


def ticks_for(row: tuple[Any, ...]) -> tuple[str, datetime, list[datetime], datetime]:
    """A due schedule's (name, expected next_fire, ticks to fire, next fire) from its due_schedules row."""
    name, cron, every, tz, misfire, backfill, next_fire, now = row
    cadence = Cadence(cron, None if every is None else float(every), tz)
    ticks, upcoming = due_ticks(cadence, next_fire, now, misfire, None if backfill is None else float(backfill))
    return str(name), next_fire, ticks, upcoming


class Schedules:
    """The schedules of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q

    def declare(self, spec: ScheduleSpec, now: datetime) -> Plan[None]:
        yield from on(self.db, Stmt(self.q.declare_schedule, spec.row(now), "one"))

    def remove(self, name: str) -> Plan[bool]:
        row = yield from on(self.db, Stmt(self.q.remove_schedule, {"name": name}, "one"))
        return row is not None

    def list(self) -> Plan[list[dict[str, Any]]]:
        rows = yield from on(self.db, Stmt(self.q.list_schedules))
        return [as_dict(r) for r in rows]

    def fire_due(self) -> Plan[int]:
        """Fire every due tick (those another instance fires first are left to it); the records added."""
        added = 0
        rows = yield from on(self.db, Stmt(self.q.due_schedules, {"limit": DUE_BATCH}))
        for row in rows:
            name, expected, ticks, upcoming = ticks_for(row)
            params = {"name": name, "expected": expected, "next": upcoming, "ticks": ticks,
                      "notify": self.db.settings.notify}
            fired = yield from on(self.db, Stmt(self.q.fire_schedule, params, "one"), attempts=1)
            if fired and fired[0]:
                added += len(fired[1] or [])
        return added

    def seconds_to_next(self) -> Plan[float | None]:
        """Seconds until the next tick of any schedule (None: no schedule)."""
        row = yield from on(self.db, Stmt(self.q.next_schedule, None, "one"))
        return None if row is None or row[0] is None else max(0.0, row[0].total_seconds())
