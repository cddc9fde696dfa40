"""The finished counts in ``queue_stats`` (kept by the statement-level triggers on processing_queue) held to the
table's own counts after every path that finishes a record or takes one back: the claim statements'
completions, failures, an operator's cancel and retry, release, recovery, users' own UPDATEs and DELETEs, a
drain, a purge, flows (a fan-out of none completed inside the completing statement, a cascade), and a bulk
change written once per queue and status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from core import DistributedProcessor, Record
from core.constants import FINAL_STATUSES
from core.flows import Flow


def _exact(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT queue, status, count(*) FROM processing_queue WHERE status = ANY(%s)"
                        " GROUP BY queue, status", (list(FINAL_STATUSES),)).fetchall()
    return {(q, s): int(n) for q, s, n in rows}


def _kept(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT queue, status, sum(count) FROM queue_stats GROUP BY queue, status"
                        " HAVING sum(count) <> 0").fetchall()
    return {(q, s): int(n) for q, s, n in rows}


def _agree(conn: psycopg.Connection[Any], step: str) -> dict[tuple[str, str], int]:
    exact = _exact(conn)
    assert _kept(conn) == exact, f"queue_stats drifted after: {step}"
    return exact


def test_every_path_that_finishes_a_record_counts_it_once(
        processor: DistributedProcessor, db: psycopg.Connection[Any]) -> None:
    processor.add_records([{"n": i} for i in range(40)], queue="a", max_attempts=2)
    processor.add_records([{"n": i} for i in range(40)], queue="b", max_attempts=1)
    queues = ["a", "b"]

    batch = processor.claim_records(20, queues=queues)
    claimed, completed = processor.complete_and_claim(batch[:10], 20, queues=queues)
    assert completed == 10
    counts = _agree(db, "the claim statement's completion")
    assert sum(counts.values()) == 10

    assert processor.mark_completed(batch[10:15]) == 5
    _agree(db, "a plain completion")

    # a processing record flagged by an operator's cancel ends cancelled when its handler completes it
    assert processor.cancel([batch[15].id]) == {batch[15].id: "processing"}
    assert processor.mark_completed([batch[15]]) == 1
    assert _agree(db, "a flagged record completed").get((batch[15].queue, "cancelled")) == 1

    # failures: retried ones go back to pending (not counted), final ones end failed
    assert processor.mark_failed(batch[16:20], "boom", retry=True) == 4
    assert processor.mark_failed(claimed[:5], "boom", retry=False) == 5
    counts = _agree(db, "failures, retried and final")
    assert sum(n for (_, s), n in counts.items() if s == "failed") >= 5

    # an operator's cancel of pending records, a retry of failed ones, a release, a purge
    pending = [r[0] for r in db.execute("SELECT id FROM processing_queue WHERE status = 'pending'"
                                        " ORDER BY id LIMIT 3").fetchall()]
    assert set(processor.cancel(pending).values()) == {"cancelled"}
    _agree(db, "an operator's cancel")
    assert processor.retry_failed(queue="a") >= 1
    _agree(db, "retry_failed")
    assert processor.release_records(claimed[5:8]) == 3
    _agree(db, "a release")

    # recovery: an expired lease at its last attempt ends failed, the others go back to pending
    db.execute("UPDATE processing_queue SET lease_expires_at = now() - interval '1 hour'"
               " WHERE status = 'processing'")
    assert processor.cleanup_orphaned_records() > 0
    _agree(db, "recovery of expired leases")

    # a user's own SQL: finished, moved between queues, back to pending, deleted
    db.execute("UPDATE processing_queue SET status = 'completed', finished_at = now()"
               " WHERE id IN (SELECT id FROM processing_queue WHERE status = 'pending' ORDER BY id LIMIT 4)")
    _agree(db, "a user's UPDATE to completed")
    db.execute("UPDATE processing_queue SET queue = 'c' WHERE id IN"
               " (SELECT id FROM processing_queue WHERE status = 'completed' ORDER BY id LIMIT 2)")
    _agree(db, "a user's UPDATE of a finished record's queue")
    db.execute("UPDATE processing_queue SET status = 'pending', finished_at = NULL WHERE id IN"
               " (SELECT id FROM processing_queue WHERE status = 'completed' ORDER BY id LIMIT 2)")
    _agree(db, "a user's UPDATE back to pending")
    db.execute("DELETE FROM processing_queue WHERE id IN"
               " (SELECT id FROM processing_queue WHERE status = 'failed' ORDER BY id LIMIT 1)")
    _agree(db, "a user's DELETE")

    # the rest drained by run(), then purged
    processor.run(lambda record: None, stop_when_empty=True, poll_interval=0.05, handle_signals=False,
                  queues=[*queues, "c"])
    counts = _agree(db, "a drain by run()")
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status IN ('pending', 'processing')"
                      ).fetchone() == (0,)
    total = sum(counts.values())
    assert processor.purge(dt.timedelta(0)) == total
    assert _agree(db, "a purge") == {}


def test_flows_count_each_step_once(processor: DistributedProcessor, db: psycopg.Connection[Any]) -> None:
    """Steps completed by the claims that take their children, a for_each (also of no element: its placeholder
    completes inside the completing statement), a final failure whose settlement cancels a descendant, and the
    on_failure step."""
    flow = Flow("counts", version=1)

    @flow.step()
    def split(record: Record) -> list[int]:
        # none: the fan-out's placeholder completes in the settlement of split's own completing statement
        return [] if record.payload["n"] >= 4 else [1, 2, 3]

    @flow.step(for_each="split")
    def each(record: Record) -> Any:
        return record.payload

    @flow.step(after=[each], max_attempts=1)
    def merge(record: Record) -> None:
        if record.parents["each"] != ([] if record.payload["n"] >= 4 else [1, 2, 3]) or record.payload["n"] % 2:
            raise ValueError("odd")

    @flow.step(after=[merge])
    def ship(record: Record) -> None:
        return None

    @flow.on_failure
    def undo(record: Record) -> None:
        return None

    runs = [processor.start_flow(flow, {"n": n}) for n in range(6)]
    processor.run(flow, stop_when_empty=True, poll_interval=0.05, handle_signals=False)
    assert sorted(processor.flow_status(r.id)["status"] for r in runs) == ["completed"] * 3 + ["failed"] * 3
    counts = _agree(db, "flows")
    assert counts[("counts", "cancelled")] == 3  # each failed run's ship
    assert counts[("counts", "failed")] == 3


def _writes(conn: psycopg.Connection[Any]) -> int:
    """Rows this backend has inserted into or updated in queue_stats and not yet reported (so far this
    transaction included): read before and after a statement, the difference is that statement's."""
    row = conn.execute("SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables"
                       " WHERE relname = 'queue_stats'").fetchone()
    return int(row[0]) if row else 0


def test_a_bulk_change_is_counted_by_one_upsert_per_queue_and_status(db: psycopg.Connection[Any]) -> None:
    """20,000 records finished by one UPDATE of a user's are one write per (queue, status), not one per row."""
    db.execute("INSERT INTO processing_queue (queue, payload) SELECT 'q' || (g % 2), '{}'"
               " FROM generate_series(1, 20000) g")
    with db.transaction():
        before = _writes(db)
        db.execute("UPDATE processing_queue SET status = CASE WHEN id % 4 = 0 THEN 'failed' ELSE 'completed' END")
        assert _writes(db) - before == 3, "one row per queue and status, written once"
    assert _agree(db, "a bulk UPDATE") == {("q0", "completed"): 5000, ("q0", "failed"): 5000,
                                          ("q1", "completed"): 10000}
    with db.transaction():
        before = _writes(db)
        db.execute("UPDATE processing_queue SET status = 'cancelled' WHERE status = 'completed'")
        assert _writes(db) - before == 4  # two queues' completed down, their cancelled up
    _agree(db, "a bulk UPDATE between finished statuses")


