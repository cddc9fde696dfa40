"""Queue control on every backend: pause and resume, rate limits, schedules (their misfire and overlap
policies, idempotent declaration); daylight saving time on the fake clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from core.api import ProcessorAPI
from core.testing import FakeClock, InMemoryProcessor
from tests.conformance.conftest import Clock, ids


def test_a_paused_queue_gives_nothing_and_the_others_go_on(processor: ProcessorAPI) -> None:
    a = processor.add_records([{}, {}], queue="a")
    b = processor.add_records([{}], queue="b")
    processor.pause("a", reason="partner down")
    more = processor.add_records([{}], queue="a")  # records keep being added to a paused queue
    assert ids(processor.claim_records(10, queues=["a", "b"])) == b
    assert processor.claim_records(10, queues=["a"]) == []
    assert processor.resume("a") is True and processor.resume("a") is False
    assert ids(processor.claim_records(10, queues=["a"])) == [*a, *more]


def test_a_pause_until_ends_by_itself(processor: ProcessorAPI, clock: Clock) -> None:
    (rid,) = processor.add_records([{}])
    processor.pause("default", until=timedelta(seconds=1))
    assert processor.claim_records() == []
    assert ids(clock.until(lambda: processor.claim_records(), after=1.0)) == [rid]
    assert processor.paused_queues() == {}


def test_status_and_health_list_a_pause_as_a_state(processor: ProcessorAPI, clock: Clock) -> None:
    processor.add_records([{}], queue="mail")
    processor.pause("mail", reason="SMTP relay down")
    processor.pause("empty")  # a paused queue with no record is listed too
    status = processor.get_queue_status()
    assert status["queues"]["mail"]["paused"]["reason"] == "SMTP relay down"
    assert status["queues"]["empty"]["paused"]["until"] is None and status["queues"]["empty"]["pending"] == 0
    assert set(status["paused"]) == {"mail", "empty"}
    report = processor.health_check()
    assert report["status"] == "healthy" and set(report["paused"]) == {"mail", "empty"}
    since = processor.paused_queues()["mail"]["since"]
    clock.advance(0.05)
    processor.pause("mail", reason="still down")  # paused since the first pause
    assert processor.paused_queues()["mail"] == {"since": since, "until": None, "reason": "still down"}


def _claim_until_empty(processor: ProcessorAPI, queue: str) -> tuple[list[Any], Any]:
    taken: list[Any] = []
    while batch := processor.claim_records(10, queues=[queue]):
        taken += batch
    return taken, batch


def test_a_queue_rate_admits_n_per_period_in_bursts(processor: ProcessorAPI, clock: Clock, backend: str) -> None:
    processor.set_queue_rate("api", 3, 1.0)
    processor.add_records([{} for _ in range(10)], queue="api")
    # a burst of n (a claim may take part of it: a bucket is striped over slots); over shards each shard's
    # bucket has n / shards, and one call's keyless records are on one shard
    first, empty = _claim_until_empty(processor, "api")
    burst = 3 if backend != "shards" else 1
    assert len(first) == burst
    assert empty == [] and empty.rate_wait is not None and 0 < empty.rate_wait <= 1.0
    later = clock.until(lambda: processor.claim_records(10, queues=["api"]), after=1.0)
    assert 1 <= len(later) <= burst
    assert processor.rates()["queues"] == {"api": {"n": 3.0, "per": 1.0}}
    processor.set_queue_rate("api", None)
    assert len(processor.claim_records(10, queues=["api"])) == 10 - burst - len(later)


def test_a_key_rate_holds_back_only_its_key(processor: ProcessorAPI) -> None:
    processor.set_key_rate("partner-*", 1, 60.0)
    slow = processor.add_records([{}, {}, {}], ordering_key="partner-a")
    free = processor.add_records([{} for _ in range(4)], ordering_key=[f"k{i}" for i in range(4)])
    taken = []
    for _ in range(3):
        batch = processor.claim_records(10)
        taken += ids(batch)
        processor.mark_completed(batch)
    assert sorted(taken) == sorted([slow[0], *free])  # the limited key started once; the others all
    assert processor.rates()["keys"] == {"partner-*": {"n": 1.0, "per": 60.0}}
    processor.set_key_rate("partner-*", None)
    assert ids(processor.claim_records(10)) == [slow[1]]


def _fire(processor: ProcessorAPI) -> int:
    return processor.fire_due_schedules()


def _runs(processor: ProcessorAPI, queue: str) -> list[Any]:
    out = []
    while batch := processor.claim_records(100, queues=[queue]):
        out += batch
        processor.mark_completed(batch)
    return sorted(out, key=lambda r: r.run_at)


def test_each_tick_fires_once(processor: ProcessorAPI, clock: Clock) -> None:
    sched = processor.schedule("tick", every=1, payload={"job": "sweep"}, queue="ticks")
    assert sched["name"] == "tick" and sched["every"] == timedelta(seconds=1) and sched["fired"] == 0
    clock.until(lambda: clock.now() >= sched["next_fire"], after=1.0)
    assert _fire(processor) == 1 and _fire(processor) == 0  # the second look finds the tick fired
    (run,) = _runs(processor, "ticks")
    assert run.payload == {"job": "sweep"} and run.run_at == sched["next_fire"]
    assert run.dedupe_key == f"schedule:tick:{sched['next_fire'].strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
    after = processor.list_schedules()[0]
    assert after["fired"] == 1 and after["last_fire"] == sched["next_fire"] and after["next_fire"] > clock.now()
    assert processor.unschedule("tick") is True and processor.list_schedules() == []
    assert processor.unschedule("tick") is False


def _first_local_hour_after(after: datetime, hour: int, tz: ZoneInfo) -> datetime:
    """The first instant after `after` at which the wall clock of `tz` reads hour:00."""
    at = after.astimezone(tz).replace(hour=hour, minute=0, second=0, microsecond=0)
    if at <= after:
        at += timedelta(days=1)  # a wall-clock day (zoneinfo recomputes the offset): 23 or 25 h across DST
    return at.astimezone(timezone.utc)


def test_declaring_again_keeps_the_next_fire_and_a_change_moves_it(processor: ProcessorAPI, clock: Clock) -> None:
    # Expected fires are computed from the time of the test: which of 03:00 and 04:00 Berlin comes first
    # depends on the hour it runs (between them, 04:00 today precedes 03:00 tomorrow).
    berlin = ZoneInfo("Europe/Berlin")
    before = clock.now()
    first = processor.schedule("nightly", cron="0 3 * * *", timezone="Europe/Berlin", payload={"n": 1})
    assert first["next_fire"] in {_first_local_hour_after(t, 3, berlin) for t in (before, clock.now())}
    clock.advance(0.05)
    again = processor.schedule("nightly", cron="0 3 * * *", timezone="Europe/Berlin", payload={"n": 1})
    assert again["next_fire"] == first["next_fire"] and len(processor.list_schedules()) == 1
    before = clock.now()
    changed = processor.schedule("nightly", cron="0 4 * * *", timezone="Europe/Berlin", payload={"n": 1})
    assert changed["next_fire"] in {_first_local_hour_after(t, 4, berlin) for t in (before, clock.now())}
    assert len(processor.list_schedules()) == 1


@pytest.mark.parametrize("misfire", ["latest", "all", "skip"])
def test_missed_ticks_follow_the_misfire_policy(processor: ProcessorAPI, clock: Clock, misfire: str) -> None:
    sched = processor.schedule("m", every=1, queue="m", misfire=misfire)
    clock.advance(3.6)  # nobody fires meanwhile: three or four ticks are missed
    before = clock.now()
    _fire(processor)
    after = clock.now()
    runs = [r.run_at for r in _runs(processor, "m")]
    # the ticks due at the fire's own instant, which lies between the two readings (on the real clock a tick
    # may fall between them: then either is right)
    candidates = [[sched["next_fire"] + timedelta(seconds=i) for i in range(10)
                   if sched["next_fire"] + timedelta(seconds=i) <= now] for now in (before, after)]
    next_fire = processor.list_schedules()[0]["next_fire"]
    (missed,) = [m for m in candidates if next_fire == m[-1] + timedelta(seconds=1)][:1]
    assert len(missed) >= 3
    if misfire == "latest":
        assert runs == [missed[-1]]  # one record for the missed ones
    elif misfire == "all":
        assert runs == missed  # every one
    else:
        assert runs == []  # none on time


def test_all_within_the_backfill_only(processor: ProcessorAPI, clock: Clock) -> None:
    processor.schedule("b", every=1, queue="b", misfire="all", backfill=2)
    clock.advance(4.5)
    before = clock.now()
    _fire(processor)
    after = clock.now()  # on the real clock a tick may fall between the two: the fire's own instant is in here
    runs = [r.run_at for r in _runs(processor, "b")]
    assert runs and all(before - timedelta(seconds=2) <= t <= after for t in runs) and len(runs) == 2


def test_skip_if_running_adds_nothing_while_the_last_one_is_unfinished(processor: ProcessorAPI,
                                                                        clock: Clock) -> None:
    processor.schedule("o", every=1, queue="o", overlap="skip_if_running")
    clock.advance(1.1)
    assert _fire(processor) == 1
    (held,) = processor.claim_records(10, queues=["o"])  # processing
    clock.advance(1.0)
    assert _fire(processor) == 0  # its previous run still processing: skipped
    processor.mark_completed([held])
    clock.advance(1.0)
    assert _fire(processor) == 1


# ---------------------------------------------------------------------------------------------- the fake clock

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(("start", "day"), [
    (datetime(2026, 3, 27, 12, tzinfo=timezone.utc), datetime(2026, 3, 29).date()),  # clocks skip 02:00-03:00
    (datetime(2026, 10, 23, 12, tzinfo=timezone.utc), datetime(2026, 10, 25).date()),  # clocks repeat 02:00-03:00
])
def test_a_daily_0230_in_berlin_fires_once_on_the_days_the_clocks_change(start: datetime, day: Any) -> None:
    clock = FakeClock(start)
    p = InMemoryProcessor(clock=clock)
    p.schedule("daily", cron="30 2 * * *", timezone="Europe/Berlin", queue="d")
    fires: list[datetime] = []
    for _ in range(4 * 24 * 4):  # four days in quarter hours, firing as a worker would
        clock.advance(900)
        p.fire_due_schedules()
        fires += [r.run_at for r in p.claim_records(10, queues=["d"])]
    local = [f.astimezone(BERLIN) for f in fires]
    per_day: dict[Any, int] = {}
    for t in local:
        per_day[t.date()] = per_day.get(t.date(), 0) + 1
    assert set(per_day.values()) == {1} and day in per_day  # once a day, the day of the change included
    (on_the_day,) = [t for t in local if t.date() == day]
    assert (on_the_day.hour, on_the_day.minute) in ((2, 30), (3, 0))  # 03:00 when 02:30 does not exist


def test_a_rate_refills_with_the_fake_clock() -> None:
    clock = FakeClock()
    p = InMemoryProcessor(clock=clock)
    p.set_queue_rate("default", 2, 1.0)
    p.add_records([{} for _ in range(6)])
    got = [len(p.claim_records(10)) for _ in range(2)]
    clock.advance(0.5)
    got.append(len(p.claim_records(10)))
    clock.advance(0.5)
    got.append(len(p.claim_records(10)))
    assert got == [2, 0, 1, 1]
