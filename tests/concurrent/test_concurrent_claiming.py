"""No-duplicate claiming: real OS processes and threads racing for one table."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from core import DistributedProcessor
from tests.support import ROOT


def _final_counts(db: Any) -> dict[str, int]:
    return dict(db.execute("SELECT status, count(*) FROM processing_queue GROUP BY status").fetchall())


def test_no_duplicate_record_claiming_across_5_processes(dsn: str, db: Any, tmp_path: Path) -> None:
    race_5_processes(dsn, db, tmp_path)


def race_5_processes(dsn: str, db: Any, tmp_path: Path, *, claim_dsn: str | None = None,
                     pooling: str = "session") -> Counter[int]:
    """5 claim_worker processes (batch sizes 1..500) race for 20,000 records; returns how often each id was
    claimed, after asserting each exactly once. ``claim_dsn``: where the workers connect (a pooler)."""
    total = 20_000
    with DistributedProcessor(dsn) as producer:
        ids = []
        for _ in range(4):
            ids += producer.add_records([{"n": i} for i in range(total // 4)])
    batch_sizes = [1, 10, 50, 200, 500]
    procs = []
    for i, batch in enumerate(batch_sizes):
        ledger = tmp_path / f"ledger-{i}.txt"
        procs.append(
            (
                ledger,
                subprocess.Popen(
                    [sys.executable, "-m", "tests.procs.claim_worker", claim_dsn or dsn, str(batch), str(ledger),
                     f"proc-{i}", pooling],
                    cwd=ROOT, stderr=subprocess.PIPE, text=True,
                ),
            )
        )
    claimed: Counter[int] = Counter()
    per_process = {}
    for ledger, proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        got = [int(x) for x in ledger.read_text().split()]
        per_process[ledger.name] = len(got)
        claimed.update(got)
    duplicates = [rid for rid, n in claimed.items() if n > 1]
    assert duplicates == []
    assert set(claimed) == set(ids)
    assert _final_counts(db) == {"completed": total}
    completed_by = dict(db.execute("SELECT claimed_by, count(*) FROM processing_queue GROUP BY 1").fetchall())
    assert sum(completed_by.values()) == total
    # the race was real: at least three processes got work
    assert sum(1 for n in per_process.values() if n > 0) >= 3, per_process
    return claimed


def test_no_duplicate_claiming_across_8_threads_sharing_one_processor(dsn: str, db: Any) -> None:
    total = 5_000
    claimed: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []
    with DistributedProcessor(dsn, pool_max=8) as p:
        p.add_records([{"n": i} for i in range(total)])
        start = threading.Barrier(8)

        def worker(batch: int) -> None:
            try:
                start.wait()
                while True:
                    records = p.claim_records(batch)
                    if not records:
                        if p.get_queue_status()["totals"]["pending"] == 0:
                            return
                        continue
                    with lock:
                        claimed.update(r.id for r in records)
                    assert p.mark_completed(records) == len(records)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(b,)) for b in (1, 5, 10, 25, 50, 100, 250, 500)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
    assert errors == []
    assert [rid for rid, n in claimed.items() if n > 1] == []
    assert len(claimed) == total
    assert _final_counts(db) == {"completed": total}
