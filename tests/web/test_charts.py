"""The numbers and the chart as pages show them, and the durations forms take (pure logic)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from core.web import charts
from core.web.filters import BadRequest, count, duration
from core.web.source import Chart, Count


def test_counts_ages_and_times_read_as_an_operator_expects() -> None:
    assert [charts.count(c) for c in (Count(12_345), Count(10_000, True), Count(10_000, True, 1_234_567),
                                      7, None)] == ["12,345", "10,000+", "~1.2M", "7", "-"]
    assert (Count(5) + Count(10_000, True, 20_000)) == Count(10_005, True, 20_005)
    assert [charts.short(n) for n in (999, 12_400, 3_200_000_000)] == ["999", "12.4k", "3.2B"]
    assert [charts.age(s) for s in (None, 5, 200, 3 * 3600 + 120, 2 * 86400 + 4 * 3600)] == [
        "-", "5s", "3m 20s", "3h 2m", "2d 4h"]
    moment = datetime(2026, 12, 6, 4, 5, 6, tzinfo=timezone.utc)
    assert charts.timestamp(moment) == "2026-12-06 04:05:06 UTC" and charts.timestamp(None) == "-"
    assert charts.since(moment, moment + timedelta(seconds=90)) == "1m 30s ago" and charts.since(None) == "-"
    assert [charts.nice_ceiling(v) for v in (0, 1, 3, 20, 21, 4_999)] == [1, 1, 5, 20, 50, 5_000]


def test_the_chart_stacks_failures_on_completions_and_scales_to_a_round_top() -> None:
    start = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)
    buckets = [{"completed": 0, "failed": 0, "cancelled": 0} for _ in range(30)]
    buckets[10] = {"completed": 30, "failed": 7, "cancelled": 1}
    drawn = charts.bars(Chart(start, 120.0, buckets, start, capped=False))
    assert drawn["max"] == 50 and drawn["totals"] == {"completed": 30, "failed": 7, "cancelled": 1}
    kinds = [r["kind"] for r in drawn["rects"]]
    assert kinds == ["completed", "failed", "cancelled"]
    completed, failed, _ = drawn["rects"]
    assert failed["y"] + failed["h"] == completed["y"]  # stacked on top
    assert completed["title"] == "03:20 UTC: 30 completed"
    assert [t["label"] for t in drawn["ticks"]] == ["03:00", "03:14", "03:28", "03:42", "03:56"]


@pytest.mark.parametrize(("seconds", "shown"), [
    (1, "1s"), (0.5, "0.5s"), (59.9, "59.9s"), (60, "1m"), (90, "1m 30s"), (3600, "1h"), (5400, "1h 30m"),
    (93600, "1d 2h"), (61.5, "61.5s"), (timedelta(minutes=2), "2m"),
])
def test_a_period_is_shown_as_the_forms_take_it_back(seconds: Any, shown: str) -> None:
    assert charts.span(seconds) == shown
    assert duration({"per": shown}, "per") == pytest.approx(
        seconds.total_seconds() if isinstance(seconds, timedelta) else seconds)


@pytest.mark.parametrize("raw", ["soon", "-5", "1 fortnight", "5x", "1.2.3", "h", "1" * 41, "1e3"])
def test_a_bad_duration_is_a_bad_request(raw: str) -> None:
    with pytest.raises(BadRequest, match="must be a duration"):
        duration({"until": raw}, "until")


def test_rate_numbers_and_times_ahead() -> None:
    assert (charts.plain(6.0), charts.plain(2.5), charts.plain(None), charts.plain(10 / 3 * 3)) == (
        "6", "2.5", "", "10")
    assert (charts.number(1200.0), charts.number(2.5), charts.number(None)) == ("1,200", "2.5", "-")
    assert count({"n": "1,000"}, "n") == 1000 and duration({"until": ""}, "until") is None
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert charts.ahead(now + timedelta(seconds=200), now) == "in 3m 20s"
    assert charts.ahead(now - timedelta(seconds=5), now) == "due" and charts.ahead(None) == "-"
