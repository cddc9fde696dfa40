"""Prometheus metrics of one processor (served by the worker's ``/metrics`` endpoint).

The worker's label is ``instance_id``: Prometheus attaches ``instance`` (the scraped host:port) to every
series itself, and a label of that name would be renamed ``exported_instance``. No ``_created`` series: they
double the series count and a counter's reset is visible without them.
"""

from __future__ import annotations

import copy
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # type: ignore[no-untyped-call]

LABEL = "instance_id"
SHARD = "shard"


class Metrics:
    """Counters and histograms in a registry of their own, so several processors in one process never clash.

    A processor over shards labels its series with ``shard`` too (the shard's position in the configured
    list): :meth:`for_shard` gives each shard's worker its own children of the same families."""

    def __init__(self, instance_id: str, *, sharded: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instance_id = instance_id
        names = [LABEL, SHARD] if sharded else [LABEL]
        r = self.registry
        self._counters = {
            "claimed": Counter("dp_records_claimed", "Records claimed", names, registry=r),
            "completed": Counter("dp_records_completed", "Records completed", names, registry=r),
            "failed": Counter("dp_records_failed", "Records that ended failed", names, registry=r),
            "retried": Counter("dp_records_retried", "Failures sent back to pending for a retry", names, registry=r),
            "lost": Counter("dp_records_lost_lease", "Records whose lease was lost before the outcome was written",
                            names, registry=r),
            "flow_repairs": Counter("dp_flow_repairs", "Flow records found waiting although none of their parents"
                                    " was unfinished (a defect), repaired by maintenance", names, registry=r),
        }
        self._histograms = {
            "claim_latency": Histogram(
                "dp_claim_seconds", "Claim statement round trip", names, registry=r,
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)),
            "batch": Histogram(
                "dp_claim_batch_size", "Records per non-empty claim", names, registry=r,
                buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)),
            "handler": Histogram(
                "dp_handler_seconds", "Handler duration", names, registry=r,
                buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)),
        }
        self.queue_depth = Gauge("dp_queue_depth", "Pending records per queue", ["queue"], registry=r)
        self.queue_paused = Gauge("dp_queue_paused", "1 while a queue is paused (on every instance)", ["queue"],
                                  registry=r)
        self.horizon_age = Gauge(
            "dp_horizon_age_seconds", "Age of the oldest snapshot, transaction or slot holding back the database's"
            " MVCC horizon", registry=r)
        # Held records: one series per instance (all shards' workers together).
        self.in_flight = Gauge("dp_records_in_flight", "Records held by this instance", [LABEL], registry=r)
        self._in_flight = self.in_flight.labels(**{LABEL: instance_id})
        self._bind({LABEL: instance_id, SHARD: "all"} if sharded else {LABEL: instance_id})

    def _bind(self, labels: dict[str, str]) -> None:
        self._labels = labels
        c, h = self._counters, self._histograms
        self._claimed, self._completed = c["claimed"].labels(**labels), c["completed"].labels(**labels)
        self._failed, self._retried = c["failed"].labels(**labels), c["retried"].labels(**labels)
        self._lost = c["lost"].labels(**labels)
        self._claim_latency, self._batch = h["claim_latency"].labels(**labels), h["batch"].labels(**labels)
        self._handler = h["handler"].labels(**labels)

    def for_shard(self, index: int) -> Metrics:
        """The same registry and families, the series of shard ``index`` (a sharded processor's)."""
        child = copy.copy(self)
        child._bind({LABEL: self.instance_id, SHARD: str(index)})
        return child

    def observe_claim(self, seconds: float, n: int) -> None:
        self._claim_latency.observe(seconds)
        if n:
            self._claimed.inc(n)
            self._batch.observe(n)

    def observe_handler(self, seconds: float) -> None:
        self._handler.observe(seconds)

    def observe_handlers(self, durations: list[float]) -> None:
        """Observe a chunk of handler durations: one bucket update per bucket touched, not per record."""
        h = self._handler
        bounds = getattr(h, "_upper_bounds", None)
        buckets = getattr(h, "_buckets", None)
        total = getattr(h, "_sum", None)
        if bounds is None or buckets is None or total is None:  # another prometheus_client layout
            for d in durations:
                h.observe(d)
            return
        counts: dict[int, int] = {}
        for d in durations:
            i = bisect_left(bounds, d)
            counts[i] = counts.get(i, 0) + 1
        for i, n in counts.items():
            buckets[i].inc(n)
        total.inc(sum(durations))

    def completed(self, n: int) -> None:
        if n:
            self._completed.inc(n)

    def failed(self, n: int) -> None:
        self._failed.inc(n)

    def retried(self, n: int) -> None:
        self._retried.inc(n)

    def lost(self, n: int) -> None:
        if n:
            self._lost.inc(n)

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to the counter ``name`` (e.g. ``flow_repairs``) of this processor's (or shard's) series."""
        self._counters[name].labels(**self._labels).inc(n)

    def set_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
