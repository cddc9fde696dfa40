"""Suite ``flows`` (``python -m bench --only flows``): what flows cost.

* a 3-step chain over 20,000 runs (60,000 records, each step released by its parent's completion) drained by
  W=2 worker processes against a plain drain of 60,000 records, same code: target >= 0.8x;
* the plain drain against the code before flows (a worktree of ``DP_BENCH_FLOWS_BASE``, default the commit
  before them, on a database of its own that its code migrated and filled): within noise.

Alternated pairs (five: with three, the plain drain against the code before flows read 0.85 to 1.13 across
runs, where eight alternated rounds of the same two read 1.03), medians.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import psycopg

from bench.baseline import OwnDatabase, worktree
from core import Record
from core.flows import Flow
from core.flows.operations import start_request

BASE = os.environ.get("DP_BENCH_FLOWS_BASE", "acd6c17^")  # the commit before flows

chain = Flow("bench_chain", version=1)


@chain.step()
def first(record: Record) -> int:
    return 1


@chain.step(after=[first])
def second(record: Record) -> int:
    return 2


@chain.step(after=[second])
def third(record: Record) -> None:
    return None


START_MANY = """
SELECT count(*) FROM generate_series(1, %(n)s) g,
       LATERAL dp_start_flow(%(flow)s, %(version)s, %(hash)s, %(definition)s::jsonb, jsonb_build_object('n', g),
                             NULL, %(steps)s::jsonb) s
"""


def fill_runs(bench: Any, runs: int) -> None:
    """``runs`` runs of the chain, written by the server in one statement (the fill is not what is measured)."""
    import json

    req = start_request(chain, {"n": 0}, None, 5, None)
    with psycopg.connect(bench.dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE processing_queue, queue_stats, processor_instances, flow_runs, flow_edges, "
                     "flow_templates, flow_records")
        conn.execute(START_MANY, {"n": runs, "flow": req.flow, "version": req.version, "hash": req.hash,
                                  "definition": json.dumps(req.definition), "steps": json.dumps(req.steps)})
        # The flow tables too: autovacuum (off on the CI machines) would have analyzed them after such a fill;
        # left without statistics, their plans assume hundreds of edges per child.
        conn.execute("VACUUM ANALYZE processing_queue, flow_runs, flow_edges, flow_records")
    bench.settle()


def run(bench: Any) -> None:
    from bench.runner import Row

    runs = 2_000 if bench.quick else 20_000
    n = 3 * runs
    pairs = 1 if bench.quick else 5
    before = OwnDatabase(bench, worktree(BASE), "before_flows")

    def plain() -> float:
        bench.fill_pending(n)
        return float(bench.drain_procs("ours", 2, 100)["rate"])

    def plain_before() -> float:
        before.fill_pending(n)
        return before.drain(2, 100)

    def flows() -> float:
        fill_runs(bench, runs)
        out = bench.drain_procs("flow", 2, 100)
        assert out["done"] == n, out
        return float(out["rate"])

    print(f"flows: W=2 drain of a 3-step chain over {runs:,} runs vs a plain drain of {n:,} records")
    chained, free = bench._alternate(pairs, flows, plain, swap=True)
    c, f = statistics.median(chained), statistics.median(free)
    bench.add(Row("flows", f"W=2 drain, 3-step chain x {runs:,} runs", c, "rec/s", f, f"plain drain of {n:,}",
                  target=">= 0.8x", met=c / f >= 0.8, extra={"flow_runs": chained, "plain_runs": free}))
    print(f"flows: W=2 plain drain of {n:,} records, this code vs the code before flows ({BASE})")
    ours, old = bench._alternate(pairs, plain, plain_before, swap=True)
    o, b = statistics.median(ours), statistics.median(old)
    bench.add(Row("flows", "W=2 plain drain, no flow", o, "rec/s", b, f"the code before ({BASE})",
                  target="within noise (>= 0.95x)", met=o / b >= 0.95, extra={"ours_runs": ours, "before_runs": old}))
