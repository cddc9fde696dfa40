"""When a schedule's ticks fall: a cron expression in a time zone, or a fixed interval. The one module that
knows the cron library (cronsim: Debian cron's rules, daylight saving time included: a daily 02:30 fires once
on the day the clocks skip it, at 03:00, and once on the day they repeat it), so it can be replaced here alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from core.errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument(f"timezone: unknown time zone {name!r} ({exc})") from None


@dataclass(frozen=True)
class Cadence:
    """A schedule's ticks: ``cron`` (five fields, or six with seconds first) in ``tz``, or one every ``every``
    seconds (aligned to the epoch: every 60 s falls on the minute)."""

    cron: str | None
    every: float | None
    tz: str = "UTC"

    @classmethod
    def parse(cls, cron: str | None, every: float | None, tz: str) -> Cadence:
        """A checked cadence (``InvalidArgument`` naming what is wrong)."""
        if (cron is None) == (every is None):
            raise InvalidArgument("give cron or every, one of them")
        zone(tz)
        if cron is not None:
            fields = cron.split()
            if len(fields) not in (5, 6):
                raise InvalidArgument(f"cron: {cron!r} has {len(fields)} fields; give five, or six with seconds first")
            try:
                CronSim(cron, datetime(2026, 1, 1, tzinfo=timezone.utc))
            except (CronSimError, ValueError) as exc:
                raise InvalidArgument(f"cron: {cron!r} is not valid ({exc})") from None
        return cls(" ".join(cron.split()) if cron is not None else None, every, tz)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t`` (UTC)."""
        if self.every is not None:
            k = math.floor((t - EPOCH).total_seconds() / self.every + 1e-9) + 1
            return EPOCH + timedelta(seconds=k * self.every)
        assert self.cron is not None
        return next(CronSim(self.cron, t.astimezone(zone(self.tz)))).astimezone(timezone.utc)

    def last_at_or_before(self, t: datetime) -> datetime:
        """The last tick at or before ``t`` (UTC)."""
        if self.every is not None:
            k = math.floor((t - EPOCH).total_seconds() / self.every + 1e-9)
            return EPOCH + timedelta(seconds=k * self.every)
        assert self.cron is not None
        later = t + timedelta(microseconds=1)
        return next(CronSim(self.cron, later.astimezone(zone(self.tz)), reverse=True)).astimezone(timezone.utc)

    def describe(self) -> str:
        return f"cron {self.cron!r} ({self.tz})" if self.cron is not None else f"every {self.every:g}s"


def due_ticks(cadence: Cadence, next_fire: datetime, now: datetime, misfire: str, backfill: float | None,
              *, limit: int = 1000) -> tuple[list[datetime], datetime]:
    """The ticks to fire when ``next_fire`` is due at ``now``, by the misfire policy, and the next fire time.

    * ``latest``: one record for the missed ticks (the latest of them);
    * ``skip``: only a tick not missed (the one due, if no later one is due too and it is no later than its grace:
      a period, within 1 to 60 s), so after an outage only the ticks still to come fire;
    * ``all``: every missed tick, or those within ``backfill`` seconds (at most ``limit``, the latest ones).
    """
    upcoming = cadence.next_after(now)
    if next_fire > now:
        return [], next_fire
    latest = max(cadence.last_at_or_before(now), next_fire)
    if misfire == "latest":
        return [latest], upcoming
    if misfire == "skip":  # a tick is missed when a later one is due too, or when it is late past its grace
        grace = max(1.0, min(60.0, (upcoming - latest).total_seconds()))
        on_time = latest == next_fire and (now - latest).total_seconds() <= grace
        return ([latest] if on_time else []), upcoming
    start = next_fire if backfill is None else max(next_fire, now - timedelta(seconds=backfill))
    ticks: list[datetime] = []
    t = latest
    while t >= start and len(ticks) < limit:  # backwards from the latest: the most recent ones if capped
        ticks.append(t)
        t = cadence.last_at_or_before(t - timedelta(microseconds=1))
    return sorted(ticks), upcoming
