"""The numbers and the chart as pages show them (pure logic)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from core.web import charts
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
