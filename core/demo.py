"""``dproc demo``: three worker processes (like three containers) drain sample records, with proof.

The handler writes a ledger row in the same transaction as the record's completion (``--transactional``), so
the ledger counts completed executions exactly: one row per record proves that none was processed twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import lru_cache
from typing import Any

from core.queries import Queries
from core.record import Record


def handler(record: Record, conn: Any) -> None:
    """The demo's transactional handler: simulate a little work, then write the ledger row."""
    work = float(record.payload.get("work_ms", 0)) / 1000
    if work:
        time.sleep(work)
    conn.execute(_queries().demo_record, {"id": record.id, "instance": os.environ.get("DP_INSTANCE_ID", "?")})


@lru_cache(maxsize=1)
def _queries() -> Queries:
    return Queries(os.environ.get("DP_SCHEMA", "public"))


def run_demo(dsn: str, schema: str, *, count: int, workers: int, work_ms: float) -> int:
    from tqdm import tqdm

    from core.processor import DistributedProcessor

    with DistributedProcessor(dsn, schema=schema, queue="demo") as p:
        p.migrate()
        with p.connection() as conn:
            conn.execute(p.q.demo_setup)
            conn.execute(p.q.demo_reset)
        print(f"enqueueing {count} records into queue 'demo' ...")
        p.add_records([{"n": i, "work_ms": work_ms} for i in range(count)])
        names = [f"demo-worker-{i + 1}" for i in range(workers)]
        print(f"starting {workers} worker processes (like {workers} containers): {', '.join(names)}")
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "core", "--log-level", "WARNING", "run", "--handler", "core.demo:handler",
                 "--transactional", "--queue", "demo", "--stop-when-empty", "--concurrency", "4",
                 "--poll-interval", "0.2"],
                env={**os.environ, "DATABASE_URL": dsn, "DP_SCHEMA": schema, "DP_INSTANCE_ID": name},
                stdout=subprocess.DEVNULL,
            )
            for name in names
        ]
        interactive = sys.stdout.isatty()
        bars = {n: tqdm(total=count, desc=n, position=i, unit="rec", disable=not interactive, leave=True)
                for i, n in enumerate(names)}
        last_line = 0.0
        try:
            while any(proc.poll() is None for proc in procs):
                progress = _progress(p)
                for name, bar in bars.items():
                    bar.n = progress.get(name, 0)
                    bar.refresh()
                if not interactive and time.monotonic() - last_line > 1:
                    print("  " + "  ".join(f"{n}: {progress.get(n, 0)}" for n in names), flush=True)
                    last_line = time.monotonic()
                time.sleep(0.2)
        finally:
            for bar in bars.values():
                bar.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(30)
        elapsed = time.monotonic() - started
        progress = _progress(p)
        with p.connection() as conn:
            row = conn.execute(p.q.demo_proof).fetchone()
    assert row is not None
    executions, distinct, completed, not_completed, span = (int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                                                            float(row[4] or 0))
    print()
    print(f"drained {completed} records in {elapsed:.2f}s with {workers} processes "
          f"({completed / elapsed:,.0f} records/s including start-up; {completed / max(span, 1e-9):,.0f}/s steady)")
    for name in names:
        print(f"  {name:<16} {progress.get(name, 0):>8} records")
    ok = executions == distinct == completed == count and not_completed == 0
    print(f"proof: {executions} completed executions for {distinct} distinct records; "
          f"{completed} of {count} completed, {not_completed} not completed; "
          f"{'no record was processed twice' if ok else 'MISMATCH'}")
    return 0 if ok and all(proc.returncode == 0 for proc in procs) else 1


def _progress(p: Any) -> dict[str, int]:
    with p.connection() as conn:
        return {str(k): int(v) for k, v in conn.execute(p.q.demo_progress).fetchall()}


def log_payload(record: Record) -> None:
    """A ready-made handler for trying the image: logs the record and completes it."""
    import logging

    logging.getLogger("core.demo").info("processed record", extra={"record_id": record.id, "queue": record.queue})
