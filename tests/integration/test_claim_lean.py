"""The two claim statements: the lean one (no queue control, no flow settlement) while nothing is set, the full
one as soon as the lean one's gate, read in the statement itself, finds a pause or a rate on the claimed queues."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor, Record
from core.claims import Claims
from core.flows import Flow
from core.instance import ProcessFacts
from core.migrate import downgrade, upgrade
from core.runstore import PostgresRun


def claims_of(p: DistributedProcessor) -> Claims:
    return p.store.claims  # type: ignore[attr-defined, no-any-return]


def test_a_pause_set_by_another_instance_shuts_the_lean_statement_at_once(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn, instance_id="a") as p, DistributedProcessor(dsn, instance_id="b") as other:
        p.add_records([{"n": i} for i in range(4)], queue="qa")
        p.add_records([{"n": i} for i in range(4)], queue="qb")
        assert len(p.claim_records(1, queues=["qa", "qb"])) == 1
        assert claims_of(p).lean, "nothing set: the lean statement claimed and its gate was open"
        other.pause("qa")
        # p still holds the hint "lean": the lean statement's gate sees the pause, claims nothing, and the full
        # statement claims in the same call, from the queue that is not paused only.
        got = p.claim_records(10, queues=["qa", "qb"])
        assert [r.queue for r in got] == ["qb"] * 4, got
        assert not claims_of(p).lean
        assert p.claim_records(10, queues=["qa", "qb"]) == []
        other.resume("qa")
        # the full statement claims and says the gate is open again: the next claim is the lean one
        assert len(p.claim_records(1, queues=["qa"])) == 1
        assert claims_of(p).lean
        left = db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'qa' AND status = 'pending'")
        assert left.fetchone() == (2,)


def test_a_queue_rate_or_a_key_rate_shuts_the_lean_statement(dsn: str) -> None:
    with DistributedProcessor(dsn) as p:
        p.add_records([{"n": i} for i in range(10)], queue="rated")
        p.set_queue_rate("rated", 3, 3600)
        taken = 0
        for _ in range(6):
            claims_of(p).lean = True  # as a claimer that has not looked since the rate was set
            taken += len(p.claim_records(10, queues=["rated"]))
            assert not claims_of(p).lean
        assert taken == 3, "the bucket's 3 tokens (striped over its slots), charged by the full statement"
        p.set_queue_rate("rated", None, None)
        p.add_records([{"n": i} for i in range(3)], queue="keyed", ordering_key="k")
        p.set_key_rate("k", 1, 3600)
        claims_of(p).lean = True
        (first,) = p.claim_records(10, queues=["keyed"])
        assert not claims_of(p).lean
        assert p.mark_completed([first]) == 1
        claims_of(p).lean = True
        # the key's order allows its next record; its rate (one token an hour, spent) does not
        assert p.claim_records(10, queues=["keyed"]) == []
        assert not claims_of(p).lean


def test_a_flow_step_claimed_by_the_lean_statement_gets_its_parents_results(dsn: str) -> None:
    flow = Flow("lean_parents")

    @flow.step()
    def split(record: Record) -> list[int]:
        return [1, 2]

    @flow.step(for_each=split)
    def part(record: Record) -> int:
        return int(record.payload) * 10

    @flow.step(after=[split, part])
    def merge(record: Record) -> None:
        return None

    with DistributedProcessor(dsn) as p:
        run = p.start_flow(flow, {})
        for expect in (["split"], ["part", "part"], ["merge"]):
            claims_of(p).lean = True  # no completion in the call: the lean statement claims
            got = p.claim_records(10, queues=[flow.name])
            assert claims_of(p).lean
            assert sorted(r.step or "" for r in got) == expect
            results = {r.id: (r.payload * 10 if r.step == "part" else [1, 2]) for r in got}
            if expect == ["merge"]:
                assert got[0].parents == {"split": [1, 2], "part": [10, 20]}
            elif expect == ["part", "part"]:
                assert all(r.parents == {"split": [1, 2]} for r in got)
            else:
                assert got[0].parents == {}
            # flow records among the completed: the full statement, which settles the run
            assert p.mark_completed([r._replace(result=json.dumps(results[r.id])) for r in got]) == len(got)
        assert p.flow_status(run.id)["status"] == "completed"


def _counts(db: Any) -> tuple[int, int, int]:
    row = db.execute("SELECT paused, queue_rate_rows, key_rates FROM queue_controls").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def test_queue_controls_counts_the_pauses_and_rates_set(processor: DistributedProcessor, db: Any) -> None:
    assert _counts(db) == (0, 0, 0)
    processor.pause("a")
    processor.pause("a", reason="again")  # still one pause
    processor.pause("b")
    assert _counts(db)[0] == 2
    assert processor.resume("a")
    assert not processor.resume("a")
    assert _counts(db)[0] == 1
    processor.set_queue_rate("a", 100, 1)
    processor.set_queue_rate("a", 2, 1)  # fewer slots: the rest deleted
    slots = int(db.execute("SELECT count(*) FROM queue_rates").fetchone()[0])
    assert slots >= 1 and _counts(db)[1] == slots
    processor.set_key_rate("k*", 1, 1)
    processor.set_key_rate("k*", 2, 1)
    processor.set_key_rate("x", 2, 1)
    assert _counts(db)[2] == 2
    processor.set_key_rate("x", None, None)
    processor.set_queue_rate("a", None, None)
    assert _counts(db) == (1, 0, 1)
    db.execute("TRUNCATE queue_state, key_rates")
    assert _counts(db) == (0, 0, 0)


def test_counts_of_overlapping_transactions_add_up(dsn: str, db: Any) -> None:
    # Both started from the same count: the second waits for the first's lock on the row, then adds to the
    # count the first committed (n = n + d), never writes its own stale sum over it.
    with psycopg.connect(dsn) as one, psycopg.connect(dsn) as two:
        one.execute("INSERT INTO queue_state (queue, paused_at) VALUES ('p1', now())")
        two.execute("SELECT 1")  # two's transaction (and snapshot) starts before one commits
        worker = threading.Thread(target=lambda: two.execute(
            "INSERT INTO key_rates (pattern, like_pattern, is_exact, n, per) VALUES ('k', 'k', true, 1, 1)"))
        worker.start()
        deadline = time.monotonic() + 10
        while not db.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
            assert time.monotonic() < deadline, "the second writer never waited for the count's row"
            time.sleep(0.01)
        one.commit()
        worker.join(10)
        assert not worker.is_alive()
        two.commit()
    assert _counts(db) == (1, 0, 1)


def test_an_expired_pause_is_ended_by_maintenance_and_claims_go_lean_again(processor: DistributedProcessor,
                                                                        db: Any, dsn: str) -> None:
    processor.add_records([{"n": 1}, {"n": 2}], queue="q")
    processor.pause("q", until=datetime.now(timezone.utc) + timedelta(hours=1))
    assert processor.claim_records(10, queues=["q"]) == [] and not claims_of(processor).lean
    db.execute("UPDATE queue_state SET resume_at = now() - interval '1 second'")
    # over by its until: claimable at once (the full statement reads resume_at), still counted
    assert len(processor.claim_records(1, queues=["q"])) == 1 and not claims_of(processor).lean
    run = PostgresRun(processor.settings, ProcessFacts(), dsn, claimers=1, handler_slots=0)
    try:
        ended = [step() for step in run.maintenance() if getattr(step, "__name__", "") == "end_expired_pauses"]
    finally:
        run.close()
    assert ended == [1] and _counts(db) == (0, 0, 0)
    assert len(processor.claim_records(1, queues=["q"])) == 1 and claims_of(processor).lean


def test_migration_0014_counts_what_is_set_and_downgrades(empty_dsn: str) -> None:
    upgrade(empty_dsn, revision="0013_add_record_inline")
    with DistributedProcessor(empty_dsn) as p:  # controls set under the previous version
        p.pause("a")
        p.set_key_rate("k", 1, 1)
    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as db:
        assert _counts(db) == (1, 0, 1)
    downgrade(empty_dsn, "0013_add_record_inline")
    with psycopg.connect(empty_dsn, autocommit=True) as db:
        assert db.execute("SELECT to_regclass('queue_controls')").fetchone() == (None,)
        db.execute("DELETE FROM key_rates")  # no trigger left behind to fail
    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as db:
        assert _counts(db) == (1, 0, 0)


@pytest.mark.parametrize("statement", ["lean", "full"])
def test_an_on_failure_step_gets_every_finished_step_through_either_statement(dsn: str, statement: str) -> None:
    """Both statements read a step's parents alike and hand an on_failure step to dp_flow_parents (every step of
    its run): a first step gets {}, the on_failure step what finished."""
    flow = Flow(f"lean_refund_{statement}")

    @flow.step()
    def a(record: Record) -> str:
        return "A"

    @flow.step(after=[a], max_attempts=1)
    def b(record: Record) -> None:
        return None

    @flow.on_failure
    def refund(record: Record) -> None:
        return None

    with DistributedProcessor(dsn) as p:
        p.start_flow(flow, {"order": 1})
        claims_of(p).lean = statement == "lean"
        (first,) = p.claim_records(10, queues=[flow.name])
        assert (first.step, first.parents) == ("a", {})
        assert p.mark_completed([first._replace(result=json.dumps("A"))]) == 1
        (second,) = p.claim_records(10, queues=[flow.name])
        assert p.mark_failed([second], RuntimeError("no"), retry=False) == 1
        claims_of(p).lean = statement == "lean"  # no completion in the call: this says which statement claims
        (got,) = p.claim_records(10, queues=[flow.name])
        assert (got.step, got.parents) == ("refund", {"a": "A"})
