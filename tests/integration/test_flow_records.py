"""Migration 0019: a run's records are listed in flow_records, one pair per record written where the record is
added (the start, a for_each's expansion, the on_failure step), instead of found through an index on the run
that took an entry for every version of a flow record. The list always equals the run's records; the
migration fills it for runs started before it (records waiting, pending, processing and finished) and goes back
to the index."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from core import DistributedProcessor, Record
from core.flows import Flow
from core.migrate import current_revision, downgrade, upgrade

fan = Flow("listed")


@fan.step()
def split(record: Record) -> list[int]:
    return [1, 2, 3]


@fan.step(for_each="split", max_attempts=1)
def part(record: Record) -> int:
    return 2


@fan.step(after=[part])
def merge(record: Record) -> None:
    return None


@fan.on_failure
def undo(record: Record) -> None:
    return None


def done(record: Record, value: Any) -> Record:
    return record._replace(result=json.dumps(value))


def listed(conn: Any, run: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT record_id FROM flow_records WHERE flow_run_id = %s ORDER BY 1",
                                       (run,)).fetchall()]


def records(conn: Any, run: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM processing_queue WHERE flow_run_id = %s ORDER BY 1",
                                       (run,)).fetchall()]


def has_index(conn: Any) -> bool:
    return conn.execute("SELECT to_regclass('ix_processing_queue_flow') IS NOT NULL").fetchone()[0]


def test_every_record_of_a_run_is_listed_once_where_it_is_added(dsn: str, db: Any) -> None:
    assert not has_index(db)
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(fan, {"n": 1})
        assert listed(db, run.id) == records(db, run.id) == sorted(run.ids.values())
        (one,) = p.claim_records(10, queues=[fan.name])
        assert p.mark_completed([done(one, [1, 2, 3])]) == 1  # the placeholder fans out into three
        assert len(records(db, run.id)) == 5 and listed(db, run.id) == records(db, run.id)
        # retention keeps a finished record while a record of its run is unfinished, and the run with its list
        db.execute("UPDATE processing_queue SET finished_at = now() - interval '1 day' WHERE id = %s", (one.id,))
        assert p.purge(3600) == 0
        parts = p.claim_records(10, queues=[fan.name])
        assert sorted(r.step or "" for r in parts) == ["part"] * 3
        assert p.mark_failed(parts[:1], "boom", retry=False) == 1  # fails the run: its on_failure step is added
        status = p.flow_status(run.id)
        assert status is not None and status["status"] == "failed"
        assert len(records(db, run.id)) == 6 and listed(db, run.id) == records(db, run.id)
        assert sorted(status["steps"]) == ["merge", "part", "split", "undo"]
        # a failed run whose records are not all finished stays, with its list
        db.execute("UPDATE flow_runs SET finished_at = now() - interval '1 day'")
        assert p.store.flows.purge_runs(3600, 100) == 0 and listed(db, run.id) == records(db, run.id)
        # the run's page and its records, read through the list
        assert p.mark_completed([done(r, 2) for r in parts[1:]]) == 2
        (handler,) = p.claim_records(10, queues=[fan.name])
        assert handler.step == "undo" and set(handler.parents or {}) == {"split", "part"}
        assert p.mark_completed([done(handler, None)]) == 1
        # retention takes the run with its list
        db.execute("UPDATE processing_queue SET finished_at = now() - interval '1 day'")
        db.execute("UPDATE flow_runs SET finished_at = now() - interval '1 day'")
        assert p.purge(3600) == 6
        assert p.store.flows.purge_runs(3600, 100) == 1
        assert listed(db, run.id) == []


def test_cancel_flow_reaches_every_listed_record(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(fan, {"n": 2})
        (one,) = p.claim_records(10, queues=[fan.name])
        p.mark_completed([done(one, [1, 2])])
        assert p.cancel_flow(run.id) == "cancelled"
        states = dict(db.execute("SELECT id, status FROM processing_queue WHERE flow_run_id = %s",
                                 (run.id,)).fetchall())
        assert sorted(states.values()) == ["cancelled", "cancelled", "cancelled", "completed"]


def test_migration_0019_lists_the_runs_before_it_and_goes_back_to_the_index(empty_dsn: str) -> None:
    upgrade(empty_dsn, revision="0018_payload_apart")
    with DistributedProcessor(empty_dsn) as p:
        runs = [p.start_flow(fan, {"n": i}) for i in range(3)]
        first = p.claim_records(10, queues=[fan.name])
        assert len(first) == 3
        # one run fanned out (its parts pending, merge waiting), two still processing their first step
        assert p.mark_completed([done(first[0], [7, 8])]) == 1
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert has_index(conn)
        before = {run.id: records(conn, run.id) for run in runs}
    upgrade(empty_dsn, revision="0019_flow_records")
    assert current_revision(empty_dsn) == "0019_flow_records"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert not has_index(conn)
        assert {run.id: listed(conn, run.id) for run in runs} == before
    with DistributedProcessor(empty_dsn) as p:
        # a record claimed before the upgrade completes by its token; its run goes on: the for_each of none
        # releases merge
        assert p.mark_completed([done(first[1], [])]) == 1
        status = p.flow_status(runs[1].id)
        assert status is not None and status["steps"]["split"][0]["status"] == "completed"
        assert [r["status"] for r in status["steps"]["merge"]] == ["pending"]
        # a run started now is listed
        run = p.start_flow(fan, {"n": 9})
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            assert listed(conn, run.id) == records(conn, run.id)
    downgrade(empty_dsn, "0018_payload_apart")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert has_index(conn)
        assert conn.execute("SELECT to_regclass('flow_records')").fetchone()[0] is None
        # the functions as 0018 left them: a run starts and its first step settles without the list
        (st, rid, ids, _) = conn.execute(
            "SELECT * FROM dp_start_flow('raw', 1, 'h', '{}'::jsonb, '{}'::jsonb, NULL,"
            " %s::jsonb)", (json.dumps([{"name": "a", "queue": "raw", "priority": 0, "max_attempts": 5, "after": []},
                                        {"name": "b", "queue": "raw", "priority": 0, "max_attempts": 5,
                                         "after": ["a"]}]),)).fetchone()
        assert st == "ok"
        conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now() WHERE id = %s",
                     (ids["a"],))
        conn.execute("SELECT dp_flow_settle(ARRAY[%s]::bigint[], NULL)", (ids["a"],))
        assert conn.execute("SELECT status FROM processing_queue WHERE id = %s", (ids["b"],)).fetchone()[0] == "pending"
        # the sink completes its run (the settlement's check of a run's records, by the index again)
        conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now() WHERE id = %s",
                     (ids["b"],))
        conn.execute("SELECT dp_flow_settle(ARRAY[%s]::bigint[], NULL)", (ids["b"],))
        assert conn.execute("SELECT status FROM flow_runs WHERE id = %s", (rid,)).fetchone()[0] == "completed"
    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert listed(conn, rid) == records(conn, rid) == sorted([ids["a"], ids["b"]])
        assert all(listed(conn, r.id) == records(conn, r.id) for r in [*runs, run])
