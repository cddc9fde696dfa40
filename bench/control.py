"""Suite ``control`` (``python -m bench --only control``): what queue control costs the W=2 drain.

* nothing configured (no schedule, pause or rate): this code against the code before queue control (a
  worktree of ``DP_BENCH_CONTROL_BASE``, default the commit before it, on a database of its own that its code
  migrated and filled), alternated pairs, medians;
* a queue rate far above the achieved rate (every claim reads and charges the bucket) against none.
"""

from __future__ import annotations

import os
import statistics
from functools import partial
from typing import Any

import psycopg

from bench.baseline import OwnDatabase, worktree
from core import DistributedProcessor

BASE = os.environ.get("DP_BENCH_CONTROL_BASE", "11f9d05^")  # the commit before queue control


def run(bench: Any) -> None:
    from bench.runner import Row

    n = 20_000 if bench.quick else 100_000
    pairs = 1 if bench.quick else 3
    before = OwnDatabase(bench, worktree(BASE), "before_control")

    def drain_before() -> float:
        before.fill_pending(n)
        return before.drain(2, 100)

    def drain(rate: float | None = None) -> float:
        bench.fill_pending(n)
        if rate is not None:
            with DistributedProcessor(bench.dsn) as p:
                p.set_queue_rate("default", int(rate), 1.0)
        try:
            return float(bench.drain_procs("ours", 2, 100)["rate"])
        finally:
            with psycopg.connect(bench.dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM queue_rates")

    print(f"control: W=2 drain of {n:,} records, this code vs the code before queue control ({BASE})")
    ours, old = bench._alternate(pairs, drain, drain_before, swap=True)
    o, b = statistics.median(ours), statistics.median(old)
    bench.add(Row("control", "W=2 drain, nothing configured", o, "rec/s", b, f"the code before ({BASE})",
                  target="within noise (>= 0.95x)", met=o / b >= 0.95, extra={"ours_runs": ours, "before_runs": old}))
    print("control: W=2 drain with a queue rate far above the achieved rate vs none")
    rated, free = bench._alternate(pairs, partial(drain, 10_000_000.0), drain, swap=True)
    r, f = statistics.median(rated), statistics.median(free)
    bench.add(Row("control", "W=2 drain, rate 10M/s set", r, "rec/s", f, "no rate, same code", target=">= 0.9x",
                  met=r / f >= 0.9, extra={"rated_runs": rated, "free_runs": free}))
