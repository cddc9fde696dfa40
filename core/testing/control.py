"""Queue control in memory (:class:`MemoryControl`, part of :class:`core.testing.tables.MemoryTables`): paused
queues, token buckets of rate-limited queues and keys, schedules. The twins of migration 0009's tables and of
what the claim statement and ``dp_fire_schedule`` do with them; time is the tables' clock, so a fake clock's
``advance()`` refills buckets, ends pauses and makes ticks due."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.cron import Cadence, due_ticks
from core.schedules import ScheduleSpec


@dataclass
class Bucket:
    """A token bucket: at most ``n`` starts per ``per`` seconds, bursts up to ``n``."""

    n: float
    per: float
    tokens: float
    updated: datetime

    def available(self, now: datetime) -> float:
        return min(self.n, self.tokens + max(0.0, (now - self.updated).total_seconds()) * self.n / self.per)

    def take(self, now: datetime, k: float) -> None:
        self.tokens, self.updated = self.available(now) - k, now

    def wait(self, now: datetime) -> float | None:
        """Seconds until the next whole token (None: one is there)."""
        have = self.available(now)
        return None if have >= 1 else (1 - have) * self.per / self.n


@dataclass(frozen=True)
class KeyRate:
    pattern: str
    exact: bool
    regex: re.Pattern[str]
    n: int
    per: float


@dataclass
class MemorySchedule:
    spec: ScheduleSpec
    next_fire: datetime
    created_at: datetime
    updated_at: datetime
    last_fire: datetime | None = None
    last_record_id: int | None = None
    fired: int = 0


@dataclass
class MemoryControl:
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue_rates: dict[str, Bucket] = field(default_factory=dict)
    key_rates: dict[str, KeyRate] = field(default_factory=dict)
    key_buckets: dict[str, Bucket] = field(default_factory=dict)
    schedules: dict[str, MemorySchedule] = field(default_factory=dict)

    # ------------------------------------------------------------------ pause

    def is_paused(self, queue: str, now: datetime) -> bool:
        state = self.paused.get(queue)
        return state is not None and (state["until"] is None or state["until"] > now)

    def pause(self, queue: str, until: datetime | None, reason: str | None, now: datetime) -> None:
        since = self.paused[queue]["since"] if self.is_paused(queue, now) else now
        self.paused[queue] = {"since": since, "until": until, "reason": reason}

    def resume(self, queue: str, now: datetime) -> bool:
        was = self.is_paused(queue, now)
        self.paused.pop(queue, None)
        return was

    def paused_now(self, now: datetime) -> dict[str, dict[str, Any]]:
        return {q: dict(s) for q, s in sorted(self.paused.items()) if self.is_paused(q, now)}

    # ------------------------------------------------------------------ rates

    def set_queue_rate(self, queue: str, n: float | None, per: float | None, now: datetime) -> None:
        if n is None or per is None:
            self.queue_rates.pop(queue, None)
            return
        old = self.queue_rates.get(queue)
        tokens = n if old is None else min(old.tokens, n)
        self.queue_rates[queue] = Bucket(n, per, tokens, now if old is None else old.updated)

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> None:
        if n is None or per is None:
            rule = self.key_rates.pop(pattern, None)
            if rule is not None:
                for key in [k for k in self.key_buckets if rule.regex.fullmatch(k)]:
                    del self.key_buckets[key]
            return
        glob = any(c in pattern for c in "*?")
        parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
        self.key_rates[pattern] = KeyRate(pattern, not glob, re.compile("".join(parts), re.DOTALL), n, per)

    def queue_cap(self, queue: str, now: datetime) -> int | None:
        """How many records the queue's bucket lets a claim take (None: no rate)."""
        bucket = self.queue_rates.get(queue)
        return None if bucket is None else int(bucket.available(now))

    def key_rule(self, key: str) -> KeyRate | None:
        exact = self.key_rates.get(key)
        if exact is not None and exact.exact:
            return exact
        best = [r for r in self.key_rates.values() if not r.exact and r.regex.fullmatch(key)]
        return min(best, key=lambda r: (-len(r.pattern), r.pattern)) if best else None

    def key_token(self, key: str, now: datetime, waits: list[float]) -> bool:
        """``dp_key_token``: a start of ``key`` charged to its bucket, if it has a rate (a wait noted if not)."""
        rule = self.key_rule(key)
        if rule is None:
            return True
        bucket = self.key_buckets.setdefault(key, Bucket(rule.n, rule.per, rule.n, now))
        bucket.n, bucket.per = rule.n, rule.per
        wait = bucket.wait(now)
        if wait is not None:
            waits.append(wait)
            return False
        bucket.take(now, 1)
        return True

    def charge(self, queues: list[str], taken: dict[str, int], now: datetime, waits: list[float]) -> None:
        """The claim's queue tokens spent, and the waits of its queues' buckets left without a whole token."""
        for queue in queues:
            bucket = self.queue_rates.get(queue)
            if bucket is not None:
                bucket.take(now, taken.get(queue, 0))
                wait = bucket.wait(now)
                if wait is not None:
                    waits.append(wait)

    def rates(self) -> dict[str, dict[str, dict[str, float]]]:
        return {"queues": {q: {"n": float(b.n), "per": b.per} for q, b in sorted(self.queue_rates.items())},
                "keys": {p: {"n": float(r.n), "per": r.per} for p, r in sorted(self.key_rates.items())}}

    def next_change(self, now: datetime, queues: set[str]) -> datetime | None:
        """When a pause of these queues ends or a bucket of theirs has a token again (None: nothing waits)."""
        times = [s["until"] for q, s in self.paused.items() if q in queues and s["until"] is not None
                 and s["until"] > now]
        times += [now + timedelta(seconds=w) for q, b in self.queue_rates.items() if q in queues
                  and (w := b.wait(now)) is not None]
        times += [now + timedelta(seconds=w) for b in self.key_buckets.values() if (w := b.wait(now)) is not None]
        return min(times, default=None)

    # ------------------------------------------------------------------ schedules

    def declare(self, spec: ScheduleSpec, now: datetime) -> None:
        old = self.schedules.get(spec.name)
        if old is not None and old.spec.definition() == spec.definition():
            old.spec = spec
            return
        first = spec.cadence.next_after(now)
        if old is None:
            self.schedules[spec.name] = MemorySchedule(spec, first, now, now)
        else:
            old.spec, old.next_fire, old.updated_at = spec, first, now

    def due(self, now: datetime) -> list[tuple[MemorySchedule, list[datetime], datetime]]:
        """Each due schedule with its ticks to fire and its next fire time (moved on here: the swap)."""
        out = []
        for sched in sorted(self.schedules.values(), key=lambda s: s.next_fire):
            if sched.next_fire > now:
                continue
            spec = sched.spec
            cadence = Cadence(spec.cadence.cron, spec.cadence.every, spec.cadence.tz)
            ticks, upcoming = due_ticks(cadence, sched.next_fire, now, spec.misfire, spec.backfill)
            sched.next_fire = upcoming
            out.append((sched, ticks, upcoming))
        return out

    def schedule_rows(self) -> list[dict[str, Any]]:
        out = []
        for name, s in sorted(self.schedules.items()):
            c = s.spec.cadence
            out.append({"name": name, "cron": c.cron, "every": None if c.every is None else timedelta(seconds=c.every),
                        "timezone": c.tz, "queue": s.spec.queue, "payload": dict(s.spec.payload),
                        "options": dict(s.spec.options), "misfire": s.spec.misfire, "backfill": s.spec.backfill,
                        "overlap": s.spec.overlap, "flow": s.spec.flow, "next_fire": s.next_fire,
                        "last_fire": s.last_fire, "last_record_id": s.last_record_id, "fired": s.fired,
                        "created_at": s.created_at, "updated_at": s.updated_at})
        return out
