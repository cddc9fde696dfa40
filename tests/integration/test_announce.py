"""Which inserts announce their records to the claimers (a floor event, core/floors.py), and migration 0012.

An announcement is for records that may become visible long after their position in claim order. The pool's
single-statement inserts commit right after the statement, so they announce nothing unless their class needs it
(a priority, a due explicit run_at); a COPY batch and a batch in an application's transaction announce; a record
added alone in an application's transaction (``add_records(conn=)``, ``dp_add_record``) is announced at the
commit when the transaction turned out long (migration 0015)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from core.floors import ANNOUNCE_AFTER, Floors
from core.migrate import current_revision, downgrade, upgrade
from tests.support import raise_floor


def _events(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM claim_floor_events").fetchone()[0])


def test_the_pools_single_statement_inserts_announce_nothing(processor: DistributedProcessor, db: Any) -> None:
    for _ in range(3):
        processor.add_records([{"n": 1}])
    processor.add_records([{"n": 2}, {"n": 3}], ordering_key=["k", "k"])
    processor.set_queue_limit("limited", 100)  # through dp_enqueue_finish
    processor.add_records([{"n": 4}], queue="limited")
    processor.add_records([{"n": 5}], run_at=datetime.now(timezone.utc) + timedelta(hours=1))
    assert _events(db) == 0  # before migration 0012: one event per call
    processor.add_records([{"n": 6}], priority=5)  # another class of the claim order: announced
    assert _events(db) == 1
    # All of them are claimable as before (the hour-later one is not due).
    assert len(processor.claim_records(20, queues=["default", "limited"])) == 6


def _long(conn: psycopg.Connection[Any]) -> None:
    """Make the open transaction on ``conn`` one that commits later than ANNOUNCE_AFTER after its start."""
    time.sleep(ANNOUNCE_AFTER + 0.1)


def test_application_transactions_announce_at_the_commit_only_when_long(processor: DistributedProcessor,
                                                                       db: Any, dsn: str) -> None:
    """Migration 0015: a record added alone (add_records(conn=) of one record, dp_add_record) in an
    application's transaction is announced by a deferred trigger at the commit, only when the transaction
    lasted longer than ANNOUNCE_AFTER; a batch on the connection and a COPY batch announce as before."""
    with psycopg.connect(dsn) as conn:
        processor.add_records([{"n": 1}], conn=conn)
        conn.execute("SELECT dp_add_record('{}')")
        conn.commit()  # short: nothing to announce (no floor passes a position younger than FLOOR_LAG)
    assert _events(db) == 0
    with psycopg.connect(dsn) as conn:
        processor.add_records([{"n": 2}], conn=conn)
        processor.add_records([{"n": 3}], conn=conn)  # the same queue again: no second check queued
        conn.execute("SELECT dp_add_record('{}')")
        processor.add_records([{"n": 4}], conn=conn, queue="other")  # another queue: its own check
        _long(conn)
        before_commit = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        conn.commit()
    events = db.execute("SELECT queue, np, at_commit, created_at >= %s FROM claim_floor_events ORDER BY queue",
                        (before_commit,)).fetchall()
    assert events == [("default", 0, False, True), ("other", 0, False, True)]  # dated at the commit
    db.execute("TRUNCATE claim_floor_events")
    with psycopg.connect(dsn) as conn, conn.transaction():  # a check queued in a savepoint rolled back goes
        conn.execute("SAVEPOINT s")
        processor.add_records([{"n": 5}], conn=conn)
        conn.execute("ROLLBACK TO SAVEPOINT s")
        processor.add_records([{"n": 6}], conn=conn)  # queues the check again
        _long(conn)
    assert _events(db) == 1
    db.execute("TRUNCATE claim_floor_events")
    with psycopg.connect(dsn) as conn:  # a batch on the connection announces at once, as before
        processor.add_records([{"n": 7}, {"n": 8}], conn=conn)
        conn.commit()
    assert _events(db) == 1
    processor.add_records([{"n": i} for i in range(processor.settings.copy_threshold)])  # COPY, several statements
    assert _events(db) == 2
    assert db.execute("SELECT count(*) FROM claim_floor_events WHERE at_commit").fetchone()[0] == 0


def test_the_stated_limit_set_constraints_all_immediate(processor: DistributedProcessor, db: Any,
                                                       dsn: str) -> None:
    """The README's limit: with SET CONSTRAINTS ALL IMMEDIATE the at-commit check runs at the end of the
    insert, when the transaction is still short, so a transaction that then goes on long writes no event (its
    record waits for the floors' periodic scan from the start)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        processor.add_records([{"n": 1}], conn=conn)
        _long(conn)
        conn.commit()
    assert _events(db) == 0


@pytest.mark.parametrize("how", ["add_records(conn=)", "dp_add_record"])
def test_a_long_application_transaction_is_found_behind_a_floor(make_processor: Any, dsn: str, how: str) -> None:
    """What the deferred announcement is for: a claimer whose floor passed the record's position while its
    transaction was open finds it at the commit, without waiting for its floor's reset."""
    claimer = make_processor(instance_id="claimer")
    claimer.floors = Floors(reset_every=3600)
    with psycopg.connect(dsn) as conn:
        if how == "dp_add_record":
            rid = conn.execute("SELECT dp_add_record('{}')").fetchone()[0]
        else:
            rid = claimer.add_records([{}], conn=conn)[0]
        _long(conn)
        raise_floor(claimer)  # as claims running meanwhile would have it: above the record's position
        assert claimer.claim_records(10) == []  # not committed yet
        conn.commit()
    assert [r.id for r in claimer.claim_records(10)] == [rid]


def test_short_application_transactions_need_no_announcement(make_processor: Any, dsn: str) -> None:
    """A claimer that never resets its floor, claiming while producers commit short transactions of one
    record each, finds every record: its floor stays FLOOR_LAG behind its clock."""
    claimer = make_processor(instance_id="claimer")
    claimer.floors = Floors(reset_every=3600)
    added: list[int] = []
    claimed: list[int] = []
    with psycopg.connect(dsn) as conn:
        for i in range(40):
            with conn.transaction():
                added += claimer.add_records([{"n": i}], conn=conn)
            claimed += [r.id for r in claimer.claim_records(10)]
    assert _events_dsn(dsn) == 0
    claimed += [r.id for r in claimer.claim_records(100)]
    assert sorted(claimed) == sorted(added)


def _events_dsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return _events(conn)


def test_migration_0015_downgrades_and_upgrades_again(empty_dsn: str) -> None:
    upgrade(empty_dsn)

    def functions() -> set[str]:
        with psycopg.connect(empty_dsn) as conn:
            return {r[0] for r in conn.execute("SELECT proname FROM pg_proc WHERE proname LIKE 'dp\\_%'")}

    assert {"dp_add_one", "dp_announce_at_commit"} <= functions()
    downgrade(empty_dsn, "0014_control_counts")
    assert not {"dp_add_one", "dp_announce_at_commit"} & functions()
    with psycopg.connect(empty_dsn) as conn:  # dp_add_record as 0013 left it: it announces at once
        conn.execute("SELECT dp_add_record('{}')")
        conn.commit()
        assert _events(conn) == 1
    upgrade(empty_dsn)
    with DistributedProcessor(empty_dsn) as p, psycopg.connect(empty_dsn) as conn:
        p.add_records([{"n": 1}], conn=conn)
        conn.commit()
        assert _events(conn) == 1 and len(p.claim_records(10)) == 2


def test_migration_0012_downgrades_and_upgrades_again(empty_dsn: str) -> None:
    upgrade(empty_dsn)

    def finish_arguments() -> int:
        with psycopg.connect(empty_dsn) as conn:
            return int(conn.execute("SELECT pronargs FROM pg_proc WHERE proname = 'dp_enqueue_finish'").fetchone()[0])

    assert finish_arguments() == 8
    downgrade(empty_dsn, "0011_trace_context")
    assert current_revision(empty_dsn) == "0011_trace_context"
    assert finish_arguments() == 7
    with DistributedProcessor(empty_dsn) as p:  # the functions as 0011 left them still add records
        p.set_queue_limit("limited", 10)
        # (a batch: a single record takes dp_add_one, which migration 0015 adds)
        assert len(p.add_records([{"n": 1}, {"n": 2}], queue="limited")) == 2
    upgrade(empty_dsn)
    assert finish_arguments() == 8
    with DistributedProcessor(empty_dsn) as p:
        p.add_records([{"n": 3}], queue="limited")
        assert len(p.claim_records(10, queues=["limited"])) == 3
