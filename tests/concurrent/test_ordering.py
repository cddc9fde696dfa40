"""Per-key FIFO across real worker processes, proven from a ledger written by the handlers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from core import DistributedProcessor
from core.enqueue import KEY_GAP
from tests.procs.ledger import ensure_ledger
from tests.support import WorkerProcs, unfinished, wait_until


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _start(workers: WorkerProcs, dsn: str, n: int, *extra: str, slow: dict[int, float] | None = None) -> None:
    for i in range(n):
        args = ["-m", "tests.procs.ledger_worker", dsn, f"w{i}", *extra]
        if slow and i in slow:
            args += ["--slow", str(slow[i])]
        workers.start(f"w{i}", args)


def _drain_and_stop(workers: WorkerProcs, db: Any, timeout: float) -> None:
    wait_until(lambda: unfinished(db) == 0, timeout, interval=0.1, message="queue drained")
    results = workers.terminate_all()
    for name, (code, _, err) in results.items():
        assert code == 0, f"{name} exited {code}: {err[-2000:]}"


def _ledger(db: Any, key: str | None = None) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT record_id, claimed_at, started_at, ended_at, instance, ordering_key FROM ledger"
        " WHERE %s::text IS NULL OR ordering_key = %s ORDER BY started_at, seq",
        (key, key),
    ).fetchall()


def _max_overlap(rows: list[tuple[Any, ...]]) -> int:
    events = []
    for _, _, start, end, *_ in rows:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end at the same instant as a start frees the slot first
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("limit", [1, 5])
def test_one_key_1000_records_5_instances_start_in_insertion_order(
    dsn: str, db: Any, workers: WorkerProcs, limit: int
) -> None:
    ensure_ledger(db)
    with DistributedProcessor(dsn) as p:
        if limit != 1:
            p.set_key_concurrency("acct-1", limit)
        ids = []
        for _ in range(4):
            ids += p.add_records([{"sleep": 0.002 if limit > 1 else 0} for _ in range(250)], ordering_key="acct-1")
    _start(workers, dsn, 5, "--concurrency", "5", "--poll", "0.05")
    _drain_and_stop(workers, db, timeout=120)
    rows = _ledger(db, "acct-1")
    assert len(rows) == 1000 and len({r[0] for r in rows}) == 1000  # each ran exactly once
    by_claim = [r[0] for r in sorted(rows, key=lambda r: r[1])]
    assert by_claim == ids, "claims of one key must follow insertion order"
    if limit == 1:
        # Strictly serial: each record starts only after the previous one ended.
        assert [r[0] for r in rows] == ids
        assert all(rows[i][3] <= rows[i + 1][2] for i in range(len(rows) - 1))
        assert _max_overlap(rows) == 1
    else:
        assert 1 < _max_overlap(rows) <= limit
        # handler starts follow insertion order within the in-flight window
        starts = [r[0] for r in rows]
        position = {rid: i for i, rid in enumerate(ids)}
        assert all(abs(position[rid] - i) < limit for i, rid in enumerate(starts))
    assert len({r[4] for r in rows}) > 1, "work should spread over several instances"


def test_three_keys_interleave_and_keep_order_across_3_processes(dsn: str, db: Any, workers: WorkerProcs) -> None:
    import random

    ensure_ledger(db)
    rng = random.Random(7)
    expected: dict[str, list[int]] = {}
    serial_sum = 0.0
    with DistributedProcessor(dsn) as p:
        for _i in range(50):
            for key in ("k1", "k2", "k3"):
                d = rng.uniform(0.01, 0.05)
                serial_sum += d
                expected.setdefault(key, []).extend(p.add_records([{"sleep": d}], ordering_key=key))
    started = time.monotonic()
    _start(workers, dsn, 3, "--concurrency", "4", "--poll", "0.05")
    _drain_and_stop(workers, db, timeout=120)
    elapsed_rows = _ledger(db)
    span = (max(r[3] for r in elapsed_rows) - min(r[2] for r in elapsed_rows)).total_seconds()
    for key, ids in expected.items():
        assert [r[0] for r in _ledger(db, key)] == ids
    assert _max_overlap(elapsed_rows) >= 2, "different keys must run in parallel"
    assert span < serial_sum * 0.8, f"span {span:.2f}s vs serial {serial_sum:.2f}s"
    assert time.monotonic() - started < 120


def test_fast_and_slow_workers_keep_per_key_order(dsn: str, db: Any, workers: WorkerProcs) -> None:
    ensure_ledger(db)
    expected: dict[str, list[int]] = {}
    with DistributedProcessor(dsn) as p:
        for _ in range(30):
            for key in ("a", "b", "c", "d"):
                expected.setdefault(key, []).extend(p.add_records([{}], ordering_key=key))
    _start(workers, dsn, 3, "--concurrency", "3", "--poll", "0.05", slow={0: 0.03, 1: 0.01})
    _drain_and_stop(workers, db, timeout=120)
    for key, ids in expected.items():
        rows = _ledger(db, key)
        assert [r[0] for r in rows] == ids
        assert all(rows[i][3] <= rows[i + 1][2] for i in range(len(rows) - 1))
    instances = {r[4] for r in _ledger(db)}
    assert {"w0", "w2"} <= instances, "both the slow and the fast worker took part"


def test_spread_out_keys_with_retried_failures_keep_order_across_3_processes(
    dsn: str, db: Any, workers: WorkerProcs
) -> None:
    # Each key's records KEY_GAP apart: inserted claimable, not blocked, so only the claim's own checks keep
    # them in order; 1 in 20 fails once and is retried (its key's later records are blocked again meanwhile).
    import random

    ensure_ledger(db)
    rng = random.Random(11)
    keys = [f"s{i % KEY_GAP}" for i in range(3 * KEY_GAP)]
    payloads = [{"fail_times": 1} if rng.random() < 0.05 else {} for _ in keys]
    with DistributedProcessor(dsn) as p:
        ids = p.add_records(payloads, ordering_key=keys)
    assert db.execute("SELECT count(*) FROM processing_queue WHERE key_blocked").fetchone()[0] == 0
    _start(workers, dsn, 3, "--concurrency", "4", "--poll", "0.05")
    _drain_and_stop(workers, db, timeout=120)
    expected: dict[str, list[int]] = {}
    runs: dict[int, int] = {}
    for rid, key, payload in zip(ids, keys, payloads, strict=True):
        expected.setdefault(key, []).append(rid)
        runs[rid] = 1 + payload.get("fail_times", 0)
    for key, key_ids in expected.items():
        rows = _ledger(db, key)
        executed = [r[0] for r in rows]
        assert [rid for i, rid in enumerate(executed) if i == 0 or executed[i - 1] != rid] == key_ids, key
        assert all(executed.count(rid) == runs[rid] for rid in key_ids), key
        assert all(rows[i][3] <= rows[i + 1][2] for i in range(len(rows) - 1)), key  # one at a time
    assert len({r[4] for r in _ledger(db)}) == 3
