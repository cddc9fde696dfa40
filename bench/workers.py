"""Benchmark worker processes.

    python -m bench.workers raw|bare|ours|flow|latency DSN BATCH

``raw``: the two-statement loop over ``processing_queue`` (the ceiling for the same rows, in the pending
index's order); ``bare``: the same
loop over a three-column table; ``ours``: ``DistributedProcessor.run`` with a no-op handler; ``latency``: run()
printing ``start <id> <unix time>`` as each handler starts. Each prints ``ready`` once connected, waits for a
line on stdin (the start gun; ``latency`` instead runs until it reads ``stop``), then prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import psycopg

CLAIM = {
    "raw": "UPDATE processing_queue SET status = 'processing' WHERE id IN ("
           " SELECT id FROM processing_queue WHERE queue = 'default' AND status = 'pending' AND NOT key_blocked"
           " ORDER BY - priority::bigint, run_at, id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id,"
           # a batch's payload is apart (migration 0018): returned as run()'s claim returns it, the same work
           " coalesce(payload, (SELECT a.payload FROM processing_payload a WHERE a.id = processing_queue.id))",
    "bare": "UPDATE bench_raw SET status = 'processing' WHERE id IN ("
            " SELECT id FROM bench_raw WHERE status = 'pending' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, payload",
}
COMPLETE = {
    "raw": "UPDATE processing_queue SET status = 'completed' WHERE id = ANY(%s)",
    "bare": "UPDATE bench_raw SET status = 'completed' WHERE id = ANY(%s)",
}


def raw_loop(mode: str, dsn: str, batch: int) -> int:
    done = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        print("ready", flush=True)
        sys.stdin.readline()
        while True:
            rows = conn.execute(CLAIM[mode], (batch,)).fetchall()
            if not rows:
                return done
            conn.execute(COMPLETE[mode], ([r[0] for r in rows],))
            done += len(rows)


# The process's CPU time when the start gun fired (``ours``): the JSON's ``cpu_run`` is what came after it.
CPU_AT_GO = [0.0]


def configure_tracing() -> None:
    """``DPB_OTEL_SDK=1``: an OpenTelemetry SDK tracer provider with no span processor (suite ``otel``: a span per
    record made, none exported); otherwise nothing (the API's default provider, as without an SDK)."""
    if os.environ.get("DPB_OTEL_SDK"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())


def ours(dsn: str, batch: int) -> int:
    from core import DistributedProcessor

    configure_tracing()

    cleanup = float(os.environ.get("DPB_CLEANUP", "0")) or None  # profiling: a run without the cleaner
    pooling = os.environ.get("DPB_POOLING", "session")  # "transaction" behind PgBouncer
    shards = [s for s in os.environ.get("DPB_SHARDS", "").split("\n") if s]  # several databases: shards=[...]
    where: dict[str, Any] = {"shards": shards} if shards else {"dsn": dsn}
    with DistributedProcessor(**where, batch_size=batch, cleanup_interval=cleanup, pooling=pooling) as p:
        p.get_queue_status()  # connected before the gun
        print("ready", flush=True)
        sys.stdin.readline()
        CPU_AT_GO[0] = time.process_time()
        summary = p.run(lambda record: None, stop_when_empty=True, poll_interval=0.2, handle_signals=False,
                        claimers=int(os.environ.get("DPB_CLAIMERS", "2")),
                        concurrency=int(os.environ.get("DPB_CONC", "10")))
        return summary.processed


def flow(dsn: str, batch: int) -> int:
    """``run()`` over the flows suite's 3-step chain (bench/flows.py) with no-op steps."""
    from bench.flows import chain
    from core import DistributedProcessor

    with DistributedProcessor(dsn, batch_size=batch) as p:
        p.get_queue_status()
        print("ready", flush=True)
        sys.stdin.readline()
        CPU_AT_GO[0] = time.process_time()
        summary = p.run(chain, stop_when_empty=True, poll_interval=0.2, handle_signals=False,
                        claimers=int(os.environ.get("DPB_CLAIMERS", "2")),
                        concurrency=int(os.environ.get("DPB_CONC", "10")))
        return summary.processed


def latency(dsn: str, batch: int) -> int:
    from core import DistributedProcessor

    out = sys.stdout
    lock = threading.Lock()

    def handler(record: Any) -> None:
        now = time.time()
        with lock:
            out.write(f"start {record.id} {now:.6f}\n")
            out.flush()

    with DistributedProcessor(dsn, batch_size=batch, queue="probe") as p:
        p.get_queue_status()
        stop = threading.Event()

        def stop_on_input() -> None:
            sys.stdin.readline()
            stop.set()

        threading.Thread(target=stop_on_input, daemon=True).start()
        print("ready", flush=True)
        summary = p.run(handler, stop_event=stop, poll_interval=1.0, handle_signals=False)
        return summary.processed


def main() -> int:
    mode, dsn, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode in CLAIM:
        n = raw_loop(mode, dsn, batch)
    elif mode == "ours":
        n = ours(dsn, batch)
    elif mode == "flow":
        n = flow(dsn, batch)
    else:
        n = latency(dsn, batch)
    import psutil

    print(json.dumps({"done": n, "end": time.time(), "rss": psutil.Process().memory_info().rss,
                      "cpu": time.process_time(), "cpu_run": time.process_time() - CPU_AT_GO[0]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
