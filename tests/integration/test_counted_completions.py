"""Finished counts kept by the statements that finish records (migration 0019). The claim statements'
completions and the fail statement add to ``queue_stats`` themselves and flip ``finish_counted`` on the rows
they finish; a row trigger counts every other change into or out of a finished status and skips flipped rows.
These hold ``queue_stats`` to the table's own counts after every path that finishes a record or takes one back,
hold the trigger to the flip rule, and check that a drain never calls it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor, Record
from core.flows import Flow
from core.migrate import downgrade, upgrade

FINISHED = "('completed', 'failed', 'cancelled')"


def _exact(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute(f"SELECT queue, status, count(*) FROM processing_queue WHERE status IN {FINISHED}"
                        " GROUP BY queue, status").fetchall()
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
    completes inside the completing statement, counted by the trigger there, before that statement's own
    count), a final failure whose settlement cancels a descendant, and the on_failure step."""
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


def test_the_trigger_counts_every_change_a_statement_did_not_count_itself(db: psycopg.Connection[Any]) -> None:
    (rid,) = db.execute("INSERT INTO processing_queue (queue, payload) VALUES ('q', '{}') RETURNING id").fetchone()

    def set_(assignments: str) -> dict[tuple[str, str], int]:
        db.execute(f"UPDATE processing_queue SET {assignments} WHERE id = %s", (rid,))
        return _kept(db)

    assert set_("status = 'processing'") == {}
    assert set_("status = 'completed'") == {("q", "completed"): 1}
    assert set_("status = 'failed'") == {("q", "failed"): 1}  # between finished statuses: -1 and +1
    assert set_("queue = 'r'") == {("r", "failed"): 1}
    assert set_("last_error = 'x'") == {("r", "failed"): 1}  # no change of queue or status: not counted
    # a flipped row was counted by the statement that flipped it: the trigger leaves it alone
    assert set_("status = 'cancelled', finish_counted = NOT finish_counted") == {("r", "failed"): 1}
    assert set_("status = 'pending'") == {("r", "failed"): 1, ("r", "cancelled"): -1}
    # the flag's value means nothing: an unflipped change is counted whatever it holds
    assert db.execute("SELECT finish_counted FROM processing_queue WHERE id = %s", (rid,)).fetchone() == (True,)
    assert set_("status = 'cancelled'") == {("r", "failed"): 1}


def _trigger_calls(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
                       " WHERE funcname = 'dp_track_finished_row'").fetchone()
    return int(row[0]) if row else 0


def test_a_drain_never_calls_the_count_trigger(dsn: str, db: psycopg.Connection[Any]) -> None:
    """Completions by the claim statements, failures and retries count themselves; the trigger's condition keeps
    every row they update (claimed, completed, unblocked) from calling it. Checked with the server's function
    counters."""
    dbname = db.info.dbname
    db.execute(f'ALTER DATABASE "{dbname}" SET track_functions = \'all\'')
    with DistributedProcessor(dsn) as p:
        p.add_records([{"n": i} for i in range(300)])
        p.add_records([{"n": i} for i in range(60)], ordering_key=[f"k{i % 6}" for i in range(60)])
        summary = p.run(lambda record: None, stop_when_empty=True, poll_interval=0.05, handle_signals=False)
        assert summary.processed == 360
        # a final failure, an operator's retry of it, and a second failure: all counted by their statements
        p.add_records([{"n": 0}], max_attempts=1)
        (rec,) = p.claim_records(1)
        assert p.mark_failed([rec], "boom") == 1
        assert p.retry_failed(queue="default") == 1
        (rec,) = p.claim_records(1)
        assert p.mark_failed([rec], "boom") == 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        assert _trigger_calls(conn) == 0
        conn.execute("UPDATE processing_queue SET status = 'cancelled' WHERE status = 'failed'")  # a user's
        conn.execute("SELECT pg_stat_force_next_flush()")
        assert _trigger_calls(conn) == 1, "the counters see a call: the zero above is not for want of them"
    assert _agree(db, "a drain") == {("default", "completed"): 360, ("default", "cancelled"): 1}


@pytest.mark.parametrize("held_by", ["previous", "this"])
def test_migration_0019_counts_records_finished_across_it(empty_dsn: str, held_by: str) -> None:
    """Records claimed before the upgrade complete after it counted once, by the statement or by the trigger;
    the downgrade puts the statement-level trigger back and the counts go on."""
    upgrade(empty_dsn, revision="0018_payload_apart")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT dp_add_records('default', ARRAY(SELECT jsonb_build_object('n', g)"
                     " FROM generate_series(1, 6) g))")
        # as the previous version's claim writes it
        held = conn.execute("UPDATE processing_queue SET status = 'processing', attempts = 1,"
                            " lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour'"
                            " WHERE id IN (SELECT id FROM processing_queue ORDER BY id LIMIT 4)"
                            " RETURNING id, lease_token").fetchall()
        conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now() WHERE id = %s",
                     (held[0][0],))
    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert _agree(conn, "the upgrade") == {("default", "completed"): 1}
        if held_by == "previous":  # its worker, still running, completes as it did (no flip)
            for rid, token in held[1:]:
                conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now()"
                             " WHERE id = %s AND lease_token = %s AND status = 'processing'", (rid, token))
        else:  # this version's statement completes them by their tokens (recovery would, after a restart)
            conn.execute("UPDATE processing_queue SET lease_expires_at = now() - interval '1 second'"
                         " WHERE status = 'processing'")
    with DistributedProcessor(empty_dsn) as p:
        p.cleanup_orphaned_records()
        summary = p.run(lambda record: None, stop_when_empty=True, poll_interval=0.05, handle_signals=False)
        assert summary.processed == (2 if held_by == "previous" else 5)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert _agree(conn, "completions after the upgrade") == {("default", "completed"): 6}
    downgrade(empty_dsn, "0018_payload_apart")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'processing_queue'"
                            " AND column_name = 'finish_counted'").fetchone() == (0,)
        conn.execute("UPDATE processing_queue SET status = 'failed' WHERE id = (SELECT min(id) FROM processing_queue)")
        assert _agree(conn, "an update after the downgrade") == {("default", "completed"): 5, ("default", "failed"): 1}
