"""Per-key ordering at scale: 10,000 records over 100 keys, worker concurrency 10, order kept, throughput reported."""

from __future__ import annotations

import random
import time
from typing import Any

from core import DistributedProcessor
from tests.procs.ledger import ensure_ledger
from tests.support import WorkerProcs, unfinished, wait_until


def test_10000_records_100_keys_keep_order_and_report_throughput(dsn: str, db: Any, record_property: Any) -> None:
    ensure_ledger(db)
    rng = random.Random(3)
    keys = [f"key-{rng.randrange(100)}" for _ in range(10_000)]
    with DistributedProcessor(dsn) as p:
        ids = []
        for start in range(0, 10_000, 1000):
            ids += p.add_records([{} for _ in range(1000)], ordering_key=keys[start : start + 1000])
    expected: dict[str, list[int]] = {}
    for rid, key in zip(ids, keys, strict=True):
        expected.setdefault(key, []).append(rid)
    workers = WorkerProcs()
    started = time.monotonic()
    try:
        for i in range(2):
            workers.start(f"w{i}", ["-m", "tests.procs.ledger_worker", dsn, f"w{i}", "--concurrency", "10",
                                    "--poll", "0.05"])
        wait_until(lambda: unfinished(db) == 0, 300, interval=0.1)
        elapsed = time.monotonic() - started
    finally:
        results = workers.terminate_all()
    assert all(code == 0 for code, _, _ in results.values()), results
    rows = db.execute("SELECT ordering_key, record_id FROM ledger ORDER BY started_at, seq").fetchall()
    got: dict[str, list[int]] = {}
    for key, rid in rows:
        got.setdefault(key, []).append(rid)
    assert got == expected
    throughput = 10_000 / elapsed
    record_property("records_per_second", round(throughput))
    print(f"\nper-key ordering: 10,000 records, 100 keys, 2 processes x concurrency 10: {throughput:,.0f} records/s")
    assert throughput > 100  # a floor far below the seeds' figures, catching only a collapse
