"""Server-rendered charts and the numbers on the pages: geometry and text only, the templates draw them (an
SVG in the page, escaped like everything else; no script, no chart library)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from core.web.source import Chart, Count

WIDTH, HEIGHT = 720, 160
LEFT, BOTTOM, TOP = 48, 22, 8


def bars(chart: Chart) -> dict[str, Any]:
    """The throughput chart: per bucket a completed bar with the failed (and cancelled) ones stacked on it;
    y from zero to a round maximum, x labelled every quarter of an hour."""
    n = len(chart.buckets)
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    peak = max((b["completed"] + b["failed"] + b["cancelled"] for b in chart.buckets), default=0)
    top = nice_ceiling(peak)
    slot = plot_w / max(n, 1)
    rects = []
    for i, b in enumerate(chart.buckets):
        x = LEFT + i * slot + 1
        base: float = HEIGHT - BOTTOM
        at = chart.start + timedelta(seconds=i * chart.bucket_seconds)
        for kind in ("completed", "failed", "cancelled"):
            value = b[kind]
            if not value:
                continue
            h = plot_h * value / top
            base -= h
            rects.append({"x": round(x, 1), "y": round(base, 1), "w": round(max(slot - 2, 1), 1),
                          "h": round(max(h, 0.5), 1), "kind": kind,
                          "title": f"{at:%H:%M} UTC: {value:,} {kind}"})
    ticks = []
    for i in range(0, n + 1, max(1, n // 4)):
        at = chart.start + timedelta(seconds=i * chart.bucket_seconds)
        ticks.append({"x": round(LEFT + i * slot, 1), "label": f"{at:%H:%M}"})
    totals = {k: sum(b[k] for b in chart.buckets) for k in ("completed", "failed", "cancelled")}
    minutes = max(1.0, (chart.start + timedelta(seconds=n * chart.bucket_seconds) - chart.since).total_seconds() / 60)
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "top_y": TOP, "base_y": HEIGHT - BOTTOM,
            "rects": rects, "ticks": ticks, "max": top, "totals": totals,
            "per_minute": totals["completed"] / minutes, "capped": chart.capped, "since": chart.since}


def nice_ceiling(value: float) -> int:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (at least 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if value <= m * step:
                return m * step
        step *= 10


# ---------------------------------------------------------------------- the numbers, as pages show them


def count(value: Count | int | None) -> str:
    """12,345; a capped count as "10,000+" or, with an estimate, "~1.2M"."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value.capped:
        return f"~{short(value.estimate)}" if value.estimate else f"{value.value:,}+"
    return f"{value.value:,}"


def short(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def age(seconds: float | None) -> str:
    """A duration in its two largest units: 45s, 3m 20s, 5h 2m, 2d 4h."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // sub_size}{sub}"
    return f"{s}s"  # pragma: no cover


def _float(value: float | int | Decimal | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def plain(value: float | int | Decimal | None) -> str:
    """A number as a form field takes it back: 5, 2.5 (a whole number without its ".0"; no separators)."""
    if value is None:
        return ""
    v = float(value)
    whole = round(v)
    return str(whole) if abs(v - whole) <= 1e-9 * max(1.0, abs(v)) else f"{v:.6g}"


def number(value: float | int | Decimal | None) -> str:
    """A rate's n: 1,200 or 2.5."""
    text = plain(value)
    return f"{int(text):,}" if text.lstrip("-").isdigit() else (text or "-")


def span(value: float | int | Decimal | timedelta | None) -> str:
    """A period as its parts: 1s, 0.5s, 90s is 1m 30s, 1h, 1d 2h (parseable again by the dashboard's forms)."""
    if value is None:
        return "-"
    seconds = _float(value)
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:.6g}s" if seconds < 60 else f"{plain(seconds)}s"
    left, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return " ".join(parts)


def ahead(value: datetime | None, now: datetime | None = None) -> str:
    """How long until: "in 3m 20s"; "due" for a time passed."""
    if value is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    left = (value - now).total_seconds()
    return f"in {age(left)}" if left >= 1 else "due"


def timestamp(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def since(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago: "3m 20s ago"."""
    if value is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    return f"{age((now - value).total_seconds())} ago"
