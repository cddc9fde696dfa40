"""Which inserts announce their records to the claimers (a floor event, core/floors.py), and migration 0012.

An announcement is for records that may become visible long after their position in claim order. The pool's
single-statement inserts commit right after the statement, so they announce nothing unless their class needs it
(a priority, a due explicit run_at); an application's transaction, a COPY batch and ``dp_add_record`` in a
transaction block (it cannot know whether its transaction goes on) announce."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from core import DistributedProcessor
from core.migrate import current_revision, downgrade, upgrade


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


def test_application_transactions_copy_batches_and_sql_calls_announce(processor: DistributedProcessor, db: Any,
                                                                      dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        processor.add_records([{"n": 1}], conn=conn)
        conn.commit()
    assert _events(db) == 1
    processor.add_records([{"n": i} for i in range(processor.settings.copy_threshold)])  # COPY, several statements
    assert _events(db) == 2
    with psycopg.connect(dsn) as conn:  # from SQL, in a transaction that may go on
        conn.execute("SELECT dp_add_record('{}')")
        conn.commit()
    assert _events(db) == 3
    # Dated at the commit (the deferred trigger), so the claimers read them.
    assert db.execute("SELECT count(*) FROM claim_floor_events WHERE at_commit").fetchone()[0] == 0


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
        assert len(p.add_records([{"n": 1}], queue="limited")) == 1
    upgrade(empty_dsn)
    assert finish_arguments() == 8
    with DistributedProcessor(empty_dsn) as p:
        p.add_records([{"n": 2}], queue="limited")
        assert len(p.claim_records(10, queues=["limited"])) == 2
