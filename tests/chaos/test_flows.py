"""Flows under random SIGKILLs: 2,000 runs of a diamond and a for_each of 5 (9 records each), worked by 4 `dproc
run` processes of which some are killed mid-drain and restarted; every step transactional, writing a ledger
row with its completion. Then the same flow with plain steps, whose completions ride on the workers' claims
and so take the children they release (migration 0017)."""

from __future__ import annotations

import random
import signal
import time
from typing import Any

from core import DistributedProcessor
from tests.chaos.conftest import RECOVERY_BOUND, Fleet
from tests.procs.flow_chaos import EXEC_DDL, LEDGER_DDL, expected_parents, flow, plain_flow
from tests.support import wait_until

RUNS = 2000
RECORDS_PER_RUN = 9
HANDLER = "tests.procs.flow_chaos:flow"


def unfinished_runs(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM flow_runs WHERE status = 'running'").fetchone()[0])


def held_by(db: Any, instance: str) -> int:
    return int(db.execute("SELECT count(*) FROM processing_queue WHERE status = 'processing' AND claimed_by = %s",
                          (instance,)).fetchone()[0])


def drain_with_kills(db: Any, fleet: Fleet, handler: str, *, seed: int, cadence: float,
                     max_kills: int) -> tuple[set[str], int]:
    """Until every run finished (or 240 s), every ``cadence`` seconds SIGKILL a worker holding records (at most
    ``max_kills``) and start another under a new identity. Returns the killed and how many records they held
    when killed (their leases, until recovery takes them back)."""
    rng = random.Random(seed)
    killed: set[str] = set()
    held_when_killed = 0
    deadline = time.monotonic() + 240
    while unfinished_runs(db) > 0 and time.monotonic() < deadline:
        time.sleep(cadence)  # the fault cadence, not a synchronisation
        victims = [n for n in fleet.alive() if held_by(db, n)]
        if not victims or len(killed) >= max_kills:
            continue
        victim = rng.choice(victims)
        fleet.procs[victim].send_signal(signal.SIGKILL)
        fleet.procs[victim].wait(10)
        held_when_killed += held_by(db, victim)
        killed.add(victim)
        fleet.spawn(handler=handler)  # restarted under a new identity
    return killed, held_when_killed


def test_flows_survive_sigkills_every_record_completed_once_parents_complete(dsn: str, db: Any,
                                                                            fleet: Fleet) -> None:
    db.execute(LEDGER_DDL)
    with DistributedProcessor(dsn) as p:
        runs = {p.start_flow(flow, {"n": n}).id: n for n in range(RUNS)}
    for _ in range(4):
        fleet.spawn(handler=HANDLER)
    killed, _ = drain_with_kills(db, fleet, HANDLER, seed=24, cadence=1.5, max_kills=5)
    wait_until(lambda: unfinished_runs(db) == 0, RECOVERY_BOUND + 120, interval=0.5,
               message="every run finished after the kills")
    results = fleet.terminate_all()
    assert len(killed) >= 3, "the test must really kill workers mid-drain"
    for name, (code, _, err) in results.items():
        if name not in killed:
            assert code == 0, f"{name}: {err[-1500:]}"
    # Every run terminal and completed; every record completed, exactly once (the ledger's primary key).
    assert db.execute("SELECT status, count(*) FROM flow_runs GROUP BY 1").fetchall() == [("completed", RUNS)]
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [
        ("completed", RUNS * RECORDS_PER_RUN)]
    assert db.execute("SELECT count(*) FROM flow_ledger").fetchone() == (RUNS * RECORDS_PER_RUN,)
    assert db.execute("SELECT count(*) FROM flow_ledger l JOIN processing_queue r ON r.id = l.record_id "
                      "WHERE r.status = 'completed'").fetchone() == (RUNS * RECORDS_PER_RUN,)
    # Every step saw every parent's result when it started: none started early.
    wrong = []
    for run_id, step, parents, payload in db.execute("SELECT run_id, step, parents, payload FROM flow_ledger"):
        n = runs[run_id]
        if parents != expected_parents(step, n):
            wrong.append((run_id, step, parents))
        if step == "part" and payload not in [n * 10 + i for i in range(5)]:
            wrong.append((run_id, step, payload))
    assert wrong == [], wrong[:5]
    per_run = db.execute("SELECT run_id, step, count(*) FROM flow_ledger GROUP BY 1, 2").fetchall()
    assert {(step, c) for _, step, c in per_run} == {("start", 1), ("left", 1), ("right", 1), ("part", 5),
                                                       ("join", 1)}
    # No waiting record whose parents all finished (none waiting at all, and health says so).
    with DistributedProcessor(dsn) as p:
        assert p.health_check()["flows"]["defects"] == 0
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'waiting'").fetchone() == (0,)


def test_plain_steps_taken_by_the_claims_that_release_them_survive_sigkills(dsn: str, db: Any,
                                                                           fleet: Fleet) -> None:
    """The taking path under kills (plain steps: a worker completes them with its next claim, the statement that
    takes the children they release; tests/integration/test_flow_take.py shows that it takes): every record
    completed once, every execution saw all its parents' results, the repeats bounded by what the killed
    workers held."""
    runs_n = 1000
    db.execute(EXEC_DDL)
    with DistributedProcessor(dsn) as p:
        runs = {p.start_flow(plain_flow, {"n": n}).id: n for n in range(runs_n)}
    handler = "tests.procs.flow_chaos:plain_flow"
    for _ in range(4):
        fleet.spawn(handler=handler)
    killed, held_when_killed = drain_with_kills(db, fleet, handler, seed=17, cadence=1.0, max_kills=4)
    wait_until(lambda: unfinished_runs(db) == 0, RECOVERY_BOUND + 120, interval=0.5,
               message="every run finished after the kills")
    results = fleet.terminate_all()
    assert len(killed) >= 2, "the test must really kill workers mid-drain"
    for name, (code, _, err) in results.items():
        if name not in killed:
            assert code == 0, f"{name}: {err[-1500:]}"
    total = runs_n * RECORDS_PER_RUN
    assert db.execute("SELECT status, count(*) FROM flow_runs GROUP BY 1").fetchall() == [("completed", runs_n)]
    assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [
        ("completed", total)]
    executed = db.execute("SELECT count(DISTINCT record_id), count(*) FROM flow_exec").fetchone()
    assert executed[0] == total  # every record's step ran
    assert executed[1] - total <= held_when_killed, (executed, held_when_killed)  # again only after a kill
    wrong = [(run_id, step, parents) for run_id, step, parents in
             db.execute("SELECT run_id, step, parents FROM flow_exec")
             if parents != expected_parents(step, runs[run_id])]
    assert wrong == [], wrong[:5]  # no step started before all its parents completed
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'waiting'").fetchone() == (0,)
