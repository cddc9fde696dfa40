"""Shards: three PostgreSQL clusters of the test's own behind one processor. Worker OS processes drain keyed
and keyless records exactly once with a fair share on each shard; a shard's server stopped mid-drain costs
only its share; partitions move to a new shard under load, the mover SIGKILLed mid-move and run again."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from core.sharding import partition_of
from core.shardmove import rebalance
from tests.procs.shard_worker import SHARD_LEDGER_DDL
from tests.servers import Cluster, free_port
from tests.support import ROOT, WorkerProcs, health_report, wait_until

SETTINGS = {"max_prepared_transactions": "20", "max_connections": "120"}


@pytest.fixture(scope="module")
def clusters() -> Iterator[list[Cluster]]:
    started: list[Cluster] = []
    try:
        for i in range(3):
            started.append(Cluster(f"shard{i}", settings=SETTINGS).start())
        yield started
    finally:
        for c in started:
            c.destroy()


@pytest.fixture
def shard_dsns(clusters: list[Cluster]) -> Iterator[list[str]]:
    name = f"dp_sh_{uuid.uuid4().hex[:8]}"
    for c in clusters:
        c.execute(f'CREATE DATABASE "{name}"')
    yield [c.dsn(name) for c in clusters]
    for c in clusters:
        if c.pid() is not None:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def _each(dsns: list[str], query: str) -> list[list[tuple[Any, ...]]]:
    out = []
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            out.append(conn.execute(query).fetchall())
    return out


def _setup(dsns: list[str]) -> None:
    with DistributedProcessor(shards=dsns) as p:
        p.migrate()
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SHARD_LEDGER_DDL)


def _unfinished(dsns: list[str]) -> int:
    return sum(r[0][0] for r in _each(dsns, "SELECT count(*) FROM processing_queue"
                                            " WHERE status IN ('pending', 'processing')"))


def _completed_per_shard(dsns: list[str]) -> list[int]:
    return [r[0][0] for r in _each(dsns, "SELECT count(*) FROM processing_queue WHERE status = 'completed'")]


def _start(workers: WorkerProcs, name: str, dsns: list[str], *extra: str) -> None:
    workers.start(name, ["-m", "tests.procs.shard_worker", name, *dsns, *extra])


def _assert_each_completed_once(dsns: list[str], ids: list[int]) -> dict[int, int]:
    """Every record on exactly one shard, completed, counted once; returns {id: shard index}."""
    where: dict[int, int] = {}
    for i, rows in enumerate(_each(dsns, "SELECT id, status FROM processing_queue")):
        for rid, status in rows:
            assert rid not in where, f"record {rid} on two shards"
            assert status == "completed", (rid, status)
            where[rid] = i
    assert sorted(where) == sorted(ids), "every record exists once"
    stats = sum(r[0][0] or 0 for r in _each(dsns, "SELECT sum(count) FROM queue_stats WHERE status = 'completed'"))
    assert stats == len(ids), "completed exactly once (the finished counts)"
    executed = set()
    for rows in _each(dsns, "SELECT DISTINCT record_id FROM shard_ledger"):
        executed |= {r[0] for r in rows}
    assert executed == set(ids), "every record executed"
    return where


def _assert_key_order(dsns: list[str]) -> None:
    """Per key, executions started in id order, all on one shard."""
    starts: dict[str, list[tuple[Any, int, int]]] = defaultdict(list)
    for i, rows in enumerate(_each(dsns, "SELECT ordering_key, started_at, record_id FROM shard_ledger"
                                         " WHERE ordering_key IS NOT NULL")):
        for key, at, rid in rows:
            starts[key].append((at, rid, i))
    for key, runs in starts.items():
        runs.sort()
        firsts: dict[int, Any] = {}
        for at, rid, _ in runs:
            firsts.setdefault(rid, at)
        order = sorted(firsts, key=lambda r: firsts[r])
        assert order == sorted(order), f"key {key} started out of id order"


def test_three_shards_five_processes_drain_exactly_once(shard_dsns: list[str], workers: WorkerProcs) -> None:
    _setup(shard_dsns)
    ids: list[int] = []
    with DistributedProcessor(shards=shard_dsns) as p:
        for _ in range(15):
            ids += p.add_records([{"n": i} for i in range(1000)])
        keys = [f"acct-{i}" for i in range(300)]
        for start in range(0, 15_000, 1000):  # one key per record: each call spans the shards
            ids += p.add_records([{"n": i} for i in range(start, start + 1000)],
                                 ordering_key=[keys[i % 300] for i in range(start, start + 1000)])
        assert len(set(ids)) == 30_000
        status = p.get_queue_status()
        assert status["totals"]["pending"] == 30_000
        assert sum(s["totals"]["pending"] for s in status["shards"].values()) == 30_000
    for n in range(5):
        _start(workers, f"w{n}", shard_dsns)
    wait_until(lambda: _unfinished(shard_dsns) == 0, 180, interval=0.3, message="30,000 drained over 3 shards")
    results = workers.terminate_all()
    assert all(code == 0 for code, _, _ in results.values()), {n: r[2][-800:] for n, r in results.items()}
    where = _assert_each_completed_once(shard_dsns, ids)
    shares = [list(where.values()).count(i) for i in range(3)]
    assert all(0.2 * 30_000 < s < 0.47 * 30_000 for s in shares), shares
    key_shards: dict[str, set[int]] = defaultdict(set)
    for i, rows in enumerate(_each(shard_dsns, "SELECT DISTINCT ordering_key FROM processing_queue"
                                               " WHERE ordering_key IS NOT NULL")):
        for (key,) in rows:
            key_shards[key].add(i)
    assert len(key_shards) == 300 and all(len(s) == 1 for s in key_shards.values())
    _assert_key_order(shard_dsns)




def test_a_shard_down_degrades_only_its_share(clusters: list[Cluster], shard_dsns: list[str],
                                              workers: WorkerProcs) -> None:
    _setup(shard_dsns)
    ids: list[int] = []
    with DistributedProcessor(shards=shard_dsns) as p:
        for start in range(0, 9000, 500):
            ids += p.add_records([{"sleep": 0.004} for _ in range(500)],
                                 ordering_key=[f"k{(start + i) % 90}" for i in range(500)])
    port = free_port()
    _start(workers, "a", shard_dsns, "--health-port", str(port))
    _start(workers, "b", shard_dsns)
    wait_until(lambda: sum(_completed_per_shard(shard_dsns)) > 600, 60)
    down = clusters[2]
    down.stop()
    try:
        up = shard_dsns[:2]
        at_stop = sum(_completed_per_shard(up))
        outage_started = time.monotonic()
        wait_until(lambda: sum(_completed_per_shard(up)) > at_stop + 500, 10,
                   message="the other shards' completions go on during the outage")
        report = wait_until(lambda: (r := health_report(port)).get("status") == "degraded" and r, 10,
                            message="health degraded naming the shard")
        assert any(f":{down.port}/" in reason for reason in report["reasons"]), report["reasons"]
        assert [s["status"] for s in report["shards"]] == ["healthy", "healthy", "unhealthy"], report["shards"]
        time.sleep(max(0.0, 10 - (time.monotonic() - outage_started)))  # the outage lasts 10 s
        assert all(proc.poll() is None for proc in workers.procs.values()), "no worker died"
    finally:
        down.start()
    wait_until(lambda: _unfinished(shard_dsns) == 0, 120, interval=0.3, message="drained after the shard returned")
    wait_until(lambda: health_report(port).get("status") == "healthy", 30, message="healthy again")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    for i in range(3):  # each shard's worker counts in series of its own
        assert f'dp_records_completed_total{{instance_id="a",shard="{i}"}}' in metrics, metrics[:2000]
    results = workers.terminate_all()
    assert all(code == 0 for code, _, _ in results.values()), {n: r[2][-800:] for n, r in results.items()}
    _assert_each_completed_once(shard_dsns, ids)
    _assert_key_order(shard_dsns)


def _mover(dsns: list[str]) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "core", "--log-level", "WARNING"]
    for dsn in dsns:
        argv += ["--shard", dsn]
    return subprocess.Popen([*argv, "shards", "add"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_partitions_move_to_a_new_shard_under_load_and_a_killed_mover(
    shard_dsns: list[str], workers: WorkerProcs
) -> None:
    two, three = shard_dsns[:2], shard_dsns
    _setup(two)  # the map over two shards
    _setup(three)  # the third set up: it owns no partition yet
    with DistributedProcessor(shards=three) as p:
        owners = p.store.topology.shard_map(refresh=True).owner
        assert set(owners) == {0, 1}
        ids: list[int] = []
        for start in range(0, 6000, 500):
            ids += p.add_records([{"sleep": 0.002} for _ in range(500)],
                                 ordering_key=[f"key-{(start + i) % 200}" for i in range(500)])
        ids += p.add_records([{"sleep": 0.002} for _ in range(1000)])
        for n in range(2):
            _start(workers, f"w{n}", three)
        wait_until(lambda: sum(_completed_per_shard(three)) > 300, 60)
        more: list[int] = []
        errors: list[BaseException] = []

        def produce() -> None:  # producers keep adding while partitions move: they wait, then route anew
            try:
                for b in range(10):
                    more.extend(p.add_records([{"b": b} for _ in range(50)],
                                              ordering_key=[f"key-{i % 200}" for i in range(50)]))
            except BaseException as exc:
                errors.append(exc)

        producer = threading.Thread(target=produce)
        producer.start()
        first = _mover(three)
        time.sleep(random.uniform(0.2, 1.5))  # the fault: a SIGKILL at a random point of the move
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _mover(three)
        _, err = second.communicate(timeout=180)
        assert second.returncode == 0, err[-2000:]
        producer.join(60)
        assert not errors, errors
        ids += more
        wait_until(lambda: _unfinished(three) == 0, 180, interval=0.3, message="drained after the move")
        shard_map = p.store.topology.shard_map(refresh=True)
    assert not any(shard_map.moving)
    assert sorted(shard_map.partitions_of(0) + shard_map.partitions_of(1) + shard_map.partitions_of(2)) == list(
        range(64))
    assert all(len(shard_map.partitions_of(s)) in (21, 22) for s in (0, 1, 2)), shard_map.owner
    results = workers.terminate_all()
    assert all(code == 0 for code, _, _ in results.values()), {n: r[2][-800:] for n, r in results.items()}
    where = _assert_each_completed_once(three, ids)
    numbers = [r[0][0] for r in _each(three, "SELECT shard_no FROM shard_identity")]
    for i, rows in enumerate(_each(three, "SELECT ordering_key FROM processing_queue WHERE ordering_key IS NOT NULL")):
        for (key,) in rows:
            assert shard_map.owner[partition_of(key)] == numbers[i], f"{key} not on the shard the map names"
    assert any(v == 2 for v in where.values()), "records moved onto the new shard"
    assert _each(three, "SELECT count(*) FROM pg_prepared_xacts") == [[(0,)]] * 3, "no transaction left in doubt"
    _assert_key_order(three)


def test_a_retired_shard_hands_over_every_record_and_takes_no_new_ones(shard_dsns: list[str],
                                                                       workers: WorkerProcs) -> None:
    _setup(shard_dsns)
    with DistributedProcessor(shards=shard_dsns) as p:
        ids: list[int] = []
        for start in range(0, 3000, 500):
            ids += p.add_records([{} for _ in range(500)], ordering_key=[f"r-{(start + i) % 60}" for i in range(500)])
        for _ in range(3):
            ids += p.add_records([{} for _ in range(100)])  # keyless: one call each shard
        before = [r[0][0] for r in _each(shard_dsns, "SELECT count(*) FROM processing_queue")]
        assert before[2] > 0
        argv = [sys.executable, "-m", "core", "--log-level", "WARNING"]
        for dsn in shard_dsns:
            argv += ["--shard", dsn]
        done = subprocess.run([*argv, "shards", "retire", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert _each(shard_dsns[2:], "SELECT count(*) FROM processing_queue")[0] == [(0,)], "nothing left on it"
        shard_map = p.store.topology.shard_map(refresh=True)
        assert shard_map.partitions_of(2) == [] and not any(shard_map.moving)
        later = p.add_records([{} for _ in range(10)])  # keyless, in turn: never to the retired shard
        later += p.add_records([{} for _ in range(10)])
        later += p.add_records([{} for _ in range(10)])
        assert _each(shard_dsns[2:], "SELECT count(*) FROM processing_queue")[0] == [(0,)]
    ids += later
    status = json.loads(subprocess.run([*argv, "shards", "status", "--json"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=60, check=True).stdout)
    assert [s["partitions"] for s in status["shards"]] == [32, 32, 0] and status["moving"] == []
    _start(workers, "w", shard_dsns)
    wait_until(lambda: _unfinished(shard_dsns) == 0, 60, interval=0.3, message="drained after the retirement")
    assert all(code == 0 for code, _, _ in workers.terminate_all().values())
    _assert_each_completed_once(shard_dsns, ids)


def test_moved_records_carry_their_payloads_and_leave_none_behind(shard_dsns: list[str]) -> None:
    """A batch's payloads are apart from its records (migration 0018): a move puts each on its moved row, and the
    source's payload rows go with its records."""
    _setup(shard_dsns)
    with DistributedProcessor(shards=shard_dsns) as p:
        p.add_records([{"k": i} for i in range(300)], ordering_key=[f"m-{i % 30}" for i in range(300)])
        for _ in range(3):
            p.add_records([{"free": i} for i in range(100)])  # keyless: one call each shard
        before: dict[int, Any] = {}
        for rows in _each(shard_dsns, "SELECT id, payload FROM record_payloads"):
            before.update(rows)
        assert len(before) == 600 and None not in before.values()
        assert _each(shard_dsns[2:], "SELECT count(*) FROM processing_payload")[0][0][0] > 0
        result = rebalance(p.store.topology, retire=2)
        assert result["moved_records"] > 0
        assert _each(shard_dsns[2:], "SELECT count(*) FROM processing_queue")[0] == [(0,)]
        assert _each(shard_dsns[2:], "SELECT count(*) FROM processing_payload")[0] == [(0,)], "none left behind"
        claimed: dict[int, Any] = {}
        while recs := p.claim_records(100):
            claimed.update((r.id, r.payload) for r in recs)
            p.mark_completed(recs)
    assert claimed == before


def test_a_transactional_handler_writes_to_its_records_own_shard(shard_dsns: list[str]) -> None:
    _setup(shard_dsns)
    for dsn in shard_dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE effects (record_id bigint PRIMARY KEY, shard int NOT NULL)")
    with DistributedProcessor(shards=shard_dsns) as p:
        ids = p.add_records([{} for _ in range(300)], ordering_key=[f"t-{i % 30}" for i in range(300)])
        ids += p.add_records([{} for _ in range(30)])

        def handler(record: Any, conn: Any) -> None:  # its effect commits with its completion, on its shard
            conn.execute("INSERT INTO effects (record_id, shard) VALUES (%s, %s)", (record.id, record.shard))

        summary = p.run(handler, transactional=True, concurrency=2, stop_when_empty=True, handle_signals=False,
                        poll_interval=0.1)
        numbers = [r[0][0] for r in _each(shard_dsns, "SELECT shard_no FROM shard_identity")]
    assert summary.processed == len(ids)
    seen: set[int] = set()
    for i, (effects, records) in enumerate(zip(_each(shard_dsns, "SELECT record_id, shard FROM effects"),
                                               _each(shard_dsns, "SELECT id FROM processing_queue"), strict=True)):
        assert {rid for rid, _ in effects} == {rid for (rid,) in records}, "each effect beside its record"
        assert all(shard == numbers[i] for _, shard in effects)
        seen |= {rid for rid, _ in effects}
    assert seen == set(ids)
