"""Migration 0018: a batch's payloads apart from its records (``processing_payload``), written once, so that the
claim and the completion no longer copy them into new row versions. Records added alone, flow steps and moved
records keep theirs on the row; every reader takes either. The upgrade from 0017 keeps every record (pending,
processing, finished) with its payload and history; the downgrade puts every payload back on its row; a deleted
or truncated record takes its payload row with it (a move between shards carries it:
tests/chaos/test_shards.py)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from core.errors import QueueFull
from core.migrate import current_revision, downgrade, upgrade


def _payloads(conn: Any, ids: list[int]) -> list[Any]:
    rows = dict(conn.execute("SELECT id, payload FROM record_payloads WHERE id = ANY(%s)", (ids,)).fetchall())
    return [rows.get(i) for i in ids]


def _apart(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM processing_payload").fetchone()[0])


def test_a_batch_writes_its_payloads_apart_and_one_record_keeps_its_own(processor: DistributedProcessor,
                                                                         db: Any) -> None:
    small = processor.add_records([{"i": i} for i in range(5)])  # dp_add_records
    big = processor.add_records([{"i": i, "s": "a\\b\tc\n"} for i in range(processor.copy_threshold)])  # COPY
    (alone,) = processor.add_records([{"alone": True}])  # dp_add_one: on its row
    (sql_one,) = db.execute("SELECT dp_add_record('{\"sql\": 1}')").fetchone()
    rows = dict(db.execute("SELECT id, payload IS NULL FROM processing_queue").fetchall())
    assert all(rows[i] for i in small + big) and not rows[alone] and not rows[sql_one]
    assert _apart(db) == len(small) + len(big)
    assert _payloads(db, small) == [{"i": i} for i in range(5)]
    assert _payloads(db, big[:3]) == [{"i": i, "s": "a\\b\tc\n"} for i in range(3)]
    claimed: dict[int, Any] = {}
    while recs := processor.claim_records(500):
        claimed.update((r.id, r.payload) for r in recs)
        assert processor.mark_completed(recs) == len(recs)
    assert [claimed[i] for i in small] == [{"i": i} for i in range(5)]
    assert [claimed[i] for i in big] == [{"i": i, "s": "a\\b\tc\n"} for i in range(len(big))]
    assert (claimed[alone], claimed[sql_one]) == ({"alone": True}, {"sql": 1})
    # a claim and a completion no longer write the payload: the row versions carry NULL
    assert db.execute("SELECT count(*) FROM processing_queue WHERE payload IS NULL").fetchone()[0] == len(small + big)


def test_deleted_or_truncated_records_take_their_payload_rows(processor: DistributedProcessor, db: Any) -> None:
    ids = processor.add_records([{"n": i} for i in range(10)]) + processor.add_records([{"alone": 1}])
    recs = processor.claim_records(100)
    assert processor.mark_completed(recs) == 11
    db.execute("UPDATE processing_queue SET finished_at = now() - interval '1 hour'")
    assert processor.purge(older_than=60) == 11
    assert _apart(db) == 0 and db.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == 0
    batch = processor.add_records([{"n": i} for i in range(10)])
    # a payload a user sets on the row wins, for the claim and the view alike, and its payload row still goes
    db.execute("UPDATE processing_queue SET payload = '{\"fixed\": 1}' WHERE id = %s", (batch[0],))
    assert _payloads(db, batch[:2]) == [{"fixed": 1}, {"n": 1}]
    db.execute("DELETE FROM processing_queue WHERE id IN (SELECT id FROM processing_queue ORDER BY id LIMIT 4)")
    assert _apart(db) == 6
    db.execute("TRUNCATE processing_queue RESTART IDENTITY")
    assert _apart(db) == 0
    again = processor.add_records([{"again": i} for i in range(3)])  # the same ids as before: no old payload
    assert min(again) <= max(ids)
    assert [r.payload for r in processor.claim_records(10)] == [{"again": i} for i in range(3)]


def test_a_batch_undone_over_its_queue_limit_leaves_no_payload(processor: DistributedProcessor, db: Any) -> None:
    processor.set_queue_limit("capped", 3)
    with psycopg.connect(processor.dsn) as conn:
        for n in (5, processor.copy_threshold):  # the function's undo and the COPY path's
            with pytest.raises(QueueFull):
                processor.add_records([{"n": i} for i in range(n)], queue="capped", conn=conn)
            assert conn.execute("SELECT count(*) FROM processing_payload").fetchone()[0] == 0
        conn.commit()
    assert _apart(db) == 0


def test_the_dashboard_record_shows_a_payload_kept_apart(processor: DistributedProcessor) -> None:
    (rid,) = processor.add_records([{"x": 1}, {"x": 2}])[:1]
    with psycopg.connect(processor.dsn) as conn:
        (text,) = conn.execute(processor.q.dashboard_record, {"id": rid, "payload": True}).fetchone()[20:21]
    assert json.loads(text) == {"x": 1}


def test_migration_0018_keeps_every_record_and_its_history(empty_dsn: str) -> None:
    """Records pending, processing, finished and failed before the upgrade are there after it, with their
    payloads, statuses, attempts and errors; the one processing completes by its token; the counts hold."""
    upgrade(empty_dsn, revision="0017_flow_take")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # as the previous version writes them: payloads on the rows
        (ids,) = conn.execute("SELECT ids FROM dp_add_records('default', ARRAY(SELECT jsonb_build_object('n', g)"
                              " FROM generate_series(1, 8) g))").fetchone()
        conn.execute("UPDATE processing_queue SET status = 'completed', attempts = 1, finished_at = now(),"
                     " updated_at = now() WHERE id = ANY(%s)", (ids[:3],))
        conn.execute("UPDATE processing_queue SET status = 'failed', attempts = 5, last_error = 'boom',"
                     " finished_at = now() WHERE id = %s", (ids[3],))
        token = conn.execute("UPDATE processing_queue SET status = 'processing', attempts = 1, claimed_by = 'old',"
                             " claimed_at = now(), lease_token = gen_random_uuid(),"
                             " lease_expires_at = now() + interval '1 hour' WHERE id = %s RETURNING lease_token",
                             (ids[4],)).fetchone()[0]
        history = conn.execute("SELECT id, status, attempts, last_error, claimed_by, lease_token, created_at,"
                               " finished_at FROM processing_queue ORDER BY id").fetchall()
    upgrade(empty_dsn, revision="0018_payload_apart")
    assert current_revision(empty_dsn) == "0018_payload_apart"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT id, status, attempts, last_error, claimed_by, lease_token, created_at,"
                            " finished_at FROM processing_queue ORDER BY id").fetchall() == history
        assert _payloads(conn, list(ids)) == [{"n": g} for g in range(1, 9)]
        assert _apart(conn) == 0, "the upgrade moves nothing: the rows keep their payloads"
    with DistributedProcessor(empty_dsn, instance_id="new") as p:
        status = p.get_queue_status()["totals"]
        assert (status["completed"], status["failed"], status["processing"], status["pending"]) == (3, 1, 1, 3)
        new = p.add_records([{"m": i} for i in range(4)])  # this version's batch: apart
        recs = p.claim_records(100)
        assert sorted((r.id, json.dumps(r.payload)) for r in recs) == sorted(
            [(i, json.dumps({"n": g})) for i, g in zip(ids[5:], range(6, 9), strict=True)]
            + [(i, json.dumps({"m": k})) for k, i in enumerate(new)])
        assert p.mark_completed(recs) == 7
        # the record the previous version held completes by its token
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            assert conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now()"
                                " WHERE id = %s AND lease_token = %s AND status = 'processing'",
                                (ids[4], token)).rowcount == 1
        status = p.get_queue_status()["totals"]
        assert (status["completed"], status["failed"], status["pending"]) == (11, 1, 0)


def test_migration_0018_downgrades_with_every_payload_on_its_row(empty_dsn: str) -> None:
    upgrade(empty_dsn)
    with DistributedProcessor(empty_dsn) as p:
        ids = p.add_records([{"n": i} for i in range(5)]) + p.add_records([{"alone": 1}])
        done = p.claim_records(2)
        p.mark_completed(done)
    downgrade(empty_dsn, "0017_flow_take")
    assert current_revision(empty_dsn) == "0017_flow_take"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT id, payload FROM processing_queue").fetchall())
        assert [rows[i] for i in ids] == [{"n": i} for i in range(5)] + [{"alone": 1}]
        assert conn.execute("SELECT to_regclass('processing_payload'), to_regclass('record_payloads')"
                            ).fetchone() == (None, None)
        # the previous version's batch function writes payloads on the rows again
        (more,) = conn.execute("SELECT ids FROM dp_add_records('default', ARRAY['{\"z\": 1}'::jsonb])").fetchone()
        assert conn.execute("SELECT payload FROM processing_queue WHERE id = %s", (more[0],)).fetchone()[0] == {"z": 1}
    upgrade(empty_dsn)
    with DistributedProcessor(empty_dsn) as p:
        assert sorted(r.payload["n"] for r in p.claim_records(10) if "n" in r.payload) == [2, 3, 4]
