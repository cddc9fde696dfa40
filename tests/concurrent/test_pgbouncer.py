"""Through a real PgBouncer in transaction pooling mode: the service, exactly-once claiming, ordering."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import DistributedProcessor
from tests.concurrent.test_concurrent_claiming import race_5_processes
from tests.procs.handlers import SVC_LEDGER_DDL
from tests.servers import PgBouncer
from tests.support import Server, WorkerProcs, dbname_of, run_cli, unfinished, wait_running, wait_until

# What a server-side prepared statement or lost session state looks like through a transaction pooler.
POOLING_ERRORS = ("prepared statement", "InvalidSqlStatementName", "DuplicatePreparedStatement")


@pytest.fixture(scope="module")
def bouncer(pg_server: Server) -> Iterator[PgBouncer]:
    with PgBouncer(pg_server.admin_dsn, pool_size=10) as b:
        yield b


@pytest.fixture
def via_bouncer(bouncer: PgBouncer, dsn: str) -> str:
    return bouncer.dsn(dbname_of(dsn))


@pytest.fixture
def workers() -> Iterator[WorkerProcs]:
    procs = WorkerProcs()
    yield procs
    procs.kill_all()


def test_the_library_works_through_pgbouncer(via_bouncer: str, db: Any) -> None:
    with DistributedProcessor(via_bouncer, pooling="transaction", pool_max=3) as p:
        ids = p.add_records([{"n": i} for i in range(1400)], ordering_key=[f"k{i % 7}" for i in range(1400)])
        p.add_records([{"d": 1}], dedupe_key="once")
        assert p.add_records([{"d": 2}], dedupe_key="once").deduplicated == [0]
        p.set_queue_limit("small", 1)
        p.add_records([{}], queue="small")
        with pytest.raises(Exception, match="full"):
            p.add_records([{}], queue="small")
        seen: list[int] = []
        for _ in range(1000):  # more rounds than needed: each claim takes the head of each of the 7 keys
            records = p.claim_records(100)
            if not records:
                break
            seen += [r.id for r in records if r.ordering_key is not None]
            kept, _ = p.heartbeat(records, registered=False)
            assert kept == {r.id for r in records}
            assert p.mark_completed(records) == len(records)
        assert sorted(seen) == sorted(ids)
        per_key: dict[str, list[int]] = {}
        for rid, key in db.execute("SELECT id, ordering_key FROM processing_queue WHERE ordering_key IS NOT NULL"
                                   " ORDER BY claimed_at, id").fetchall():
            per_key.setdefault(key, []).append(rid)
        assert all(v == sorted(v) for v in per_key.values())
        report = p.health_check()
        assert report["status"] == "healthy", report["reasons"]
        assert p.get_queue_status()["totals"]["completed"] == 1401


def test_three_workers_through_pgbouncer_drain_enqueued_records_exactly_once(
    via_bouncer: str, db: Any, workers: WorkerProcs, tmp_path: Path
) -> None:
    db.execute(SVC_LEDGER_DDL)
    env = {"DATABASE_URL": via_bouncer, "DP_POOLING": "transaction"}
    for i in range(3):
        workers.start(
            f"w{i}",
            ["-m", "core", "--log-format", "json", "run", "--handler", "tests.procs.handlers:ledger_tx",
             "--transactional", "--concurrency", "4", "--grace-seconds", "10", "--poll-interval", "0.2"],
            env={**env, "DP_INSTANCE_ID": f"bouncer-{i}"},
        )
    # half keyed (50 keys), half keyless, all through `dproc enqueue` and the pooler
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps({"n": i, **({"key": f"k{(i // 2) % 50}"} if i % 2 else {})}) + "\n"
                             for i in range(10_000)))
    result = run_cli("enqueue", str(lines), "--key-field", "key", env=env)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: unfinished(db) == 0, 180, interval=0.2, message="drained through pgbouncer")
    row = db.execute("SELECT count(*), count(DISTINCT record_id) FROM svc_ledger").fetchone()
    assert row == (10_000, 10_000), "every record completed exactly once"
    # a key's records completed one at a time in id order (the ledger row commits with the completion)
    order = db.execute("SELECT ordering_key, array_agg(record_id ORDER BY seq) FROM svc_ledger"
                       " WHERE ordering_key IS NOT NULL GROUP BY 1").fetchall()
    assert len(order) == 50 and all(ids == sorted(ids) for _, ids in order)
    by_instance = dict(db.execute("SELECT instance, count(*) FROM svc_ledger GROUP BY 1").fetchall())
    assert len(by_instance) == 3, by_instance
    started = time.monotonic()
    results = workers.terminate_all(timeout=30)
    assert time.monotonic() - started < 15
    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"{name}: {stderr[-1500:]}"
        assert not [e for e in POOLING_ERRORS if e in stdout + stderr], stderr[-1500:]
        assert json.loads(stdout.strip().splitlines()[-1])["lost_leases"] == 0
    assert not [e for e in POOLING_ERRORS if e in result.stdout + result.stderr]
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'processing'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM processor_instances WHERE status = 'stopped'").fetchone()[0] == 3


def test_no_duplicate_claiming_across_5_processes_through_pgbouncer(
    dsn: str, via_bouncer: str, db: Any, tmp_path: Path
) -> None:
    claimed = race_5_processes(dsn, db, tmp_path, claim_dsn=via_bouncer, pooling="transaction")
    assert len(claimed) == 20_000


def test_queue_control_through_pgbouncer(via_bouncer: str, db: Any, workers: WorkerProcs) -> None:
    # pause, rates and schedules keep no session state: they work behind a transaction pooler, in the claim
    # statement and the schedules' compare and swap alike
    with DistributedProcessor(via_bouncer, pooling="transaction", pool_max=3) as p:
        p.add_records([{}, {}], queue="held")
        p.pause("held", reason="through the pooler")
        assert p.claim_records(10, queues=["held"]) == []
        assert p.get_queue_status()["queues"]["held"]["paused"]["reason"] == "through the pooler"
        assert p.resume("held") and len(p.claim_records(10, queues=["held"])) == 2
        p.set_queue_rate("slow", 2, 10.0)
        p.set_key_rate("k", 1, 10.0)
        p.add_records([{} for _ in range(5)], queue="slow")
        p.add_records([{}, {}], ordering_key="k", queue="keyed")
        # the burst of 2, over as many claims as the bucket has slots (a claim charges one slot), then none
        got: list[Any] = []
        while batch := p.claim_records(10, queues=["slow"]):
            got += batch
        assert len(got) == 2 and batch.rate_wait is not None
        first = p.claim_records(10, queues=["keyed"])
        p.mark_completed(first)
        assert len(first) == 1 and p.claim_records(10, queues=["keyed"]) == []  # the key's one token spent
        p.schedule("pooled", every=1, queue="ticks")
    # two workers through the pooler fire the schedule: one record per tick
    for i in range(2):
        workers.start(f"w{i}", ["-m", "core", "--dsn", via_bouncer, "--pooling", "transaction", "run", "--handler",
                                "tests.procs.handlers:noop", "--queue", "ticks", "--poll-only", "--poll-interval",
                                "0.2"])
    wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'ticks'").fetchone()[0] >= 4,
               60, interval=0.2, message="ticks fired through the pooler")
    for name, (code, _, err) in workers.terminate_all().items():
        assert code == 0, f"{name}: {err[-2000:]}"
        assert not any(e in err for e in POOLING_ERRORS), err[-2000:]
    ticks = [r[0] for r in db.execute("SELECT run_at FROM processing_queue WHERE queue = 'ticks' ORDER BY run_at")]
    assert len(set(ticks)) == len(ticks)


def test_flows_through_pgbouncer(via_bouncer: str, db: Any, workers: WorkerProcs) -> None:
    # A run's start, its settling (a function with its own plan setting), the parents read by the claim and
    # the transactional steps keep no session state: flows work behind a transaction pooler.
    from tests.procs.flow_chaos import LEDGER_DDL, expected_parents, flow

    db.execute(LEDGER_DDL)
    with DistributedProcessor(via_bouncer, pooling="transaction", pool_max=3) as p:
        runs = {p.start_flow(flow, {"n": n}).id: n for n in range(20)}
    for i in range(2):
        workers.start(f"f{i}", ["-m", "core", "--dsn", via_bouncer, "--pooling", "transaction", "run", "--handler",
                                "tests.procs.flow_chaos:flow", "--poll-only", "--poll-interval", "0.2"])
    # Both registered (so both handle the SIGTERM below) even if one drains everything before the other is up.
    wait_running(db, 2)
    wait_until(lambda: db.execute("SELECT count(*) FROM flow_runs WHERE status = 'completed'").fetchone()[0] == 20,
               90, interval=0.2, message="20 runs completed through the pooler")
    for name, (code, _, err) in workers.terminate_all().items():
        assert code == 0, f"{name}: {err[-2000:]}"
        assert not any(e in err for e in POOLING_ERRORS), err[-2000:]
    assert db.execute("SELECT count(*) FROM flow_ledger").fetchone() == (20 * 9,)
    for run_id, step, parents in db.execute("SELECT run_id, step, parents FROM flow_ledger"):
        assert parents == expected_parents(step, runs[run_id]), (run_id, step, parents)


def test_flow_children_taken_through_pgbouncer(via_bouncer: str, dsn: str, db: Any, workers: WorkerProcs) -> None:
    """Migration 0017's taking behind a transaction pooler. The claim that completes a plain step takes the child
    it releases (``claim_flow``: the settlement, a function with a plan setting of its own, inside the claim
    statement) and returns it with its parents' results; then two worker processes drain runs of plain steps
    (their completions ride on the claims that take) through the pooler: every record completed, every execution
    saw all its parents' results, no session state lost."""
    from tests.integration.test_claim_lean import claims_of
    from tests.integration.test_flow_take import chain, done, row
    from tests.procs.flow_chaos import EXEC_DDL, expected_parents, plain_flow

    with DistributedProcessor(via_bouncer, pooling="transaction", pool_max=2, instance_id="taker") as p:
        run = p.start_flow(chain, {"n": 1})
        (one,) = p.claim_records(10, queues=[chain.name])
        got, completed = claims_of(p).claim([done(one, 1)], 10, [chain.name])
        assert completed == 1
        (two,) = got  # taken by the statement that completed its parent, through the pooler
        assert (two.id, two.step, two.parents) == (run.ids["second"], "second", {"first": 1})
        assert row(db, two.id) == ("processing", two.lease_token, "taker", 1, True)
        got, _ = claims_of(p).claim([done(two, 2)], 10, [chain.name])
        assert [(r.step, r.parents) for r in got] == [("third", {"second": 2})]
        assert p.mark_completed(got) == 1
        assert p.flow_status(run.id)["status"] == "completed"

    db.execute(EXEC_DDL)
    for i in range(2):
        # DATABASE_URL: the steps log each execution straight to the database, not through the pooler.
        workers.start(f"p{i}", ["-m", "core", "--dsn", via_bouncer, "--pooling", "transaction", "run", "--handler",
                                "tests.procs.flow_chaos:plain_flow", "--poll-only", "--poll-interval", "0.2"],
                      env={"DATABASE_URL": dsn})
    # Both registered, so both handle SIGTERM (a run registers once its signal handlers are in place): one
    # worker can drain 20 runs alone before the other has started, and a SIGTERM that reaches a process still
    # importing ends it by the signal, not by a drain.
    wait_running(db, 2)
    with DistributedProcessor(via_bouncer, pooling="transaction", pool_max=2) as p:
        runs = {p.start_flow(plain_flow, {"n": n}).id: n for n in range(20)}
    wait_until(lambda: db.execute("SELECT count(*) FROM flow_runs WHERE flow = %s AND status = 'completed'",
                                  (plain_flow.name,)).fetchone()[0] == 20,
               90, interval=0.2, message="20 runs of plain steps completed through the pooler")
    for name, (code, _, err) in workers.terminate_all().items():
        assert code == 0, f"{name}: {err[-2000:]}"
        assert not any(e in err for e in POOLING_ERRORS), err[-2000:]
    records = db.execute("SELECT count(*) FROM processing_queue WHERE flow_run_id = ANY(%s)",
                         (list(runs),)).fetchone()[0]
    assert records == 20 * 9
    assert db.execute("SELECT count(DISTINCT record_id) FROM flow_exec").fetchone() == (records,)
    wrong = [(run_id, step, parents) for run_id, step, parents in
             db.execute("SELECT run_id, step, parents FROM flow_exec")
             if parents != expected_parents(step, runs[run_id])]
    assert wrong == [], wrong[:5]


@pytest.mark.parametrize("how", ["add_records(conn=)", "dp_add_record"])
def test_the_at_commit_announcement_through_pgbouncer(pg_server: Server, dsn: str, db: Any, how: str) -> None:
    """Migration 0015's announcement through a transaction pooler with one server connection, so that every
    client transaction runs on the same server session. A record added alone in a long application transaction
    is announced at its commit and found behind a raised floor. The per-queue marker that queues the check once
    per transaction is transaction-local: had it outlived the first client's transaction on the pooled session,
    the second client's long transaction would queue no check and write no event."""
    from psycopg import connect

    from core.floors import ANNOUNCE_AFTER, Floors
    from tests.support import raise_floor

    marker = "SELECT current_setting('dp.commit_' || md5('default'), true)"

    def transaction(via: str, p: DistributedProcessor, *, long: bool) -> int:
        with connect(via) as app:
            if how == "dp_add_record":
                rid = int(app.execute("SELECT dp_add_record('{}')").fetchone()[0])
            else:
                rid = p.add_records([{}], conn=app)[0]
            assert app.execute(marker).fetchone()[0] == "y"  # the check is queued for this transaction
            deadline = time.monotonic() + (ANNOUNCE_AFTER + 0.1 if long else 0)
            while time.monotonic() < deadline:
                app.execute("SELECT 1")
            app.commit()
            assert app.execute(marker).fetchone()[0] in (None, "")  # gone with the transaction
            app.rollback()
        return rid

    def events() -> list[tuple[Any, ...]]:
        rows = db.execute("SELECT queue, at_commit FROM claim_floor_events").fetchall()
        db.execute("TRUNCATE claim_floor_events")
        return rows

    with PgBouncer(pg_server.admin_dsn, pool_size=1) as single:
        via = single.dsn(dbname_of(dsn))
        with DistributedProcessor(via, pooling="transaction", pool_max=1, instance_id="claimer") as claimer:
            claimer.floors = Floors(reset_every=3600)
            rid = transaction(via, claimer, long=True)
            # As claims running during that transaction would have left it: above the record's position. The
            # claim reads the event and lowers the floor to the record.
            raise_floor(claimer)
            assert [r.id for r in claimer.claim_records(10)] == [rid]
            assert events() == [("default", False)]
            transaction(via, claimer, long=True)  # the next client, on the same server session
            assert events() == [("default", False)]
            transaction(via, claimer, long=False)
            assert events() == []
