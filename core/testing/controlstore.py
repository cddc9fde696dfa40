"""The queue control operations of the in-memory store (pause, rates, schedules): the twins of
:class:`core.control.Control` and :class:`core.schedules.Schedules` over :class:`MemoryControl`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from core.backend import NewRecords
from core.errors import QueueFull
from core.plans import Plan, later
from core.schedules import ScheduleSpec
from core.testing.records import MemoryRecords


def tick_key(name: str, tick: datetime) -> str:
    """The dedupe key of a schedule's tick (as ``dp_fire_schedule`` writes it)."""
    return f"schedule:{name}:{tick.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


class MemoryControlOps(MemoryRecords):
    """Queue control over the tables' :class:`~core.testing.control.MemoryControl`."""

    def _locked(self, fn: Any) -> Any:
        self.check_open()
        with self.tables.lock:
            return fn(self.tables.now())

    def pause(self, queue: str, until: datetime | None, reason: str | None) -> Plan[None]:
        return later(lambda: self._locked(lambda now: self.tables.control.pause(queue, until, reason, now)))

    def resume(self, queue: str) -> Plan[bool]:
        def go() -> bool:
            was = bool(self._locked(lambda now: self.tables.control.resume(queue, now)))
            self.tables.changed()  # idle runs look again at once
            return was
        return later(go)

    def paused(self) -> Plan[dict[str, dict[str, Any]]]:
        return later(lambda: self._locked(self.tables.control.paused_now))

    def set_queue_rate(self, queue: str, n: float | None, per: float | None) -> Plan[None]:
        return later(lambda: self._locked(lambda now: self.tables.control.set_queue_rate(queue, n, per, now)))

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> Plan[None]:
        return later(lambda: self._locked(lambda now: self.tables.control.set_key_rate(pattern, n, per)))

    def rates(self) -> Plan[dict[str, dict[str, dict[str, float]]]]:
        return later(lambda: self._locked(lambda now: self.tables.control.rates()))

    def declare_schedule(self, spec: ScheduleSpec) -> Plan[None]:
        return later(lambda: self._locked(lambda now: self.tables.control.declare(spec, now)))

    def remove_schedule(self, name: str) -> Plan[bool]:
        return later(lambda: self._locked(lambda now: self.tables.control.schedules.pop(name, None) is not None))

    def list_schedules(self) -> Plan[list[dict[str, Any]]]:
        return later(lambda: self._locked(lambda now: self.tables.control.schedule_rows()))

    def fire_schedules(self) -> Plan[int]:
        return later(self.fire_due)

    def fire_due(self) -> int:
        """``dp_fire_schedule`` for every due schedule: its next fire moved on (the swap), its ticks' records
        added (with their dedupe keys), unless skip_if_running finds the last one unfinished."""
        t = self.tables
        due = self._locked(t.control.due)
        added = 0
        for sched, ticks, _ in due:
            spec = sched.spec
            if not ticks:
                continue
            if spec.overlap == "skip_if_running" and sched.last_record_id is not None:
                with t.lock:
                    last = t.rows.get(sched.last_record_id)
                    if last is not None and last.status in ("pending", "processing"):
                        continue
            ids: list[int] = []
            for tick in ticks:
                batch = NewRecords([dict(spec.payload)], spec.queue, int(spec.options.get("priority", 0)), tick,
                                   int(spec.options.get("max_attempts", 5)), [spec.options.get("ordering_key")],
                                   [tick_key(spec.name, tick)], "pending")
                try:
                    ids.extend(self.insert(batch))
                except QueueFull:
                    continue
            if ids:
                with t.lock:
                    sched.last_fire, sched.last_record_id = ticks[-1], ids[-1]
                    sched.fired += len(ids)
                added += len(ids)
        return added

    def seconds_to_next_schedule(self) -> float | None:
        def look(now: datetime) -> float | None:
            times = [s.next_fire for s in self.tables.control.schedules.values()]
            return None if not times else max(0.0, (min(times) - now).total_seconds())
        result: float | None = self._locked(look)
        return result
