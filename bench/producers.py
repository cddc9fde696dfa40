"""Suite ``producers`` (``python -m bench --only producers``): enqueueing where the application writes.

* ``add_records(conn=...)``, one record per application transaction, against a plain INSERT of the same row
  in the same transaction shape (BEGIN, the insert, COMMIT on one psycopg connection);
* ``dp_add_record(...)`` in a loop (one statement, one transaction each) against the same plain INSERT;
* the asyncio processor's 10,000-record batches against the blocking processor's.

Each case alternates its two sides (which goes first alternating too) and compares medians.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import psycopg

from core import AsyncDistributedProcessor, DistributedProcessor

PAYLOAD = {"order": 123456, "customer": "c-98765", "kind": "invoice", "amount": "19.99"}  # ~80 bytes of JSON
INSERT = "INSERT INTO processing_queue (queue, payload) VALUES ('default', %s::jsonb)"


def run(bench: Any) -> None:
    from bench.runner import Row

    quick = bench.quick
    n_tx = 500 if quick else 3_000
    pairs = 1 if quick else 5
    text = json.dumps(PAYLOAD)

    def truncate() -> None:
        with bench.db() as conn:
            conn.execute("TRUNCATE processing_queue; TRUNCATE claim_floor_events")
        bench.settle()

    def conn_add() -> float:
        truncate()
        with DistributedProcessor(bench.dsn) as p, psycopg.connect(bench.dsn, autocommit=True) as conn:
            t0 = time.perf_counter()
            for _ in range(n_tx):
                with conn.transaction():
                    p.add_records([PAYLOAD], conn=conn)
            return n_tx / (time.perf_counter() - t0)

    def plain_tx() -> float:
        truncate()
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            t0 = time.perf_counter()
            for _ in range(n_tx):
                with conn.transaction():
                    conn.execute(INSERT, (text,))
            return n_tx / (time.perf_counter() - t0)

    print(f"producers: add_records(conn=...) one record per transaction, {n_tx:,} transactions")
    ours, plain = bench._alternate(pairs, conn_add, plain_tx, swap=True)
    o, b = statistics.median(ours), statistics.median(plain)
    bench.add(Row("producers", "add_records(conn=), 1 per transaction", o, "tx/s", b, "plain INSERT, same shape",
                  target=">= 0.8x", met=o / b >= 0.8, extra={"ours_runs": ours, "plain_runs": plain}))

    def sql_add() -> float:
        truncate()
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            t0 = time.perf_counter()
            for _ in range(n_tx):
                conn.execute("SELECT dp_add_record(%s::jsonb)", (text,))
            return n_tx / (time.perf_counter() - t0)

    def plain_statement() -> float:
        truncate()
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            t0 = time.perf_counter()
            for _ in range(n_tx):
                conn.execute(INSERT, (text,))
            return n_tx / (time.perf_counter() - t0)

    print(f"producers: dp_add_record in a loop, {n_tx:,} statements (one transaction each)")
    ours, plain = bench._alternate(pairs, sql_add, plain_statement, swap=True)
    o, b = statistics.median(ours), statistics.median(plain)
    bench.add(Row("producers", "dp_add_record in a loop", o, "rec/s", b, "plain INSERT, autocommit",
                  target=">= 0.8x", met=o / b >= 0.8, extra={"ours_runs": ours, "plain_runs": plain}))

    n, batch = (20_000 if quick else 100_000), 10_000
    payloads = [{**PAYLOAD, "n": i} for i in range(batch)]

    def blocking_batches() -> float:
        truncate()
        with DistributedProcessor(bench.dsn) as p:
            p.get_queue_status()  # the pool open, as the asyncio side's below
            t0 = time.perf_counter()
            for _ in range(n // batch):
                p.add_records(payloads)
            return n / (time.perf_counter() - t0)

    def async_batches() -> float:
        truncate()

        async def main() -> float:
            async with AsyncDistributedProcessor(bench.dsn) as p:
                await p.get_queue_status()
                t0 = time.perf_counter()
                for _ in range(n // batch):
                    await p.add_records(payloads)
                return n / (time.perf_counter() - t0)

        return asyncio.run(main())

    print(f"producers: {n:,} records in batches of {batch:,}, asyncio vs blocking processor")
    ours, plain = bench._alternate(pairs, async_batches, blocking_batches, swap=True)
    o, b = statistics.median(ours), statistics.median(plain)
    bench.add(Row("producers", "AsyncDistributedProcessor, 10,000 per batch", o, "rec/s", b,
                  "DistributedProcessor, same batches", target=">= 0.9x", met=o / b >= 0.9,
                  extra={"ours_runs": ours, "blocking_runs": plain}))

