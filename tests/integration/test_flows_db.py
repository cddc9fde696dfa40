"""Flows against a real database, where only a database can tell: retention beside unfinished runs, recovery
settling a run, a run in the caller's transaction, a run on one shard, the template stored per version."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from core import DistributedProcessor, Record
from core.errors import FlowDefinitionChanged
from core.flows import Flow


def chain(name: str) -> Flow:
    flow = Flow(name)

    @flow.step()
    def one(record: Record) -> int:
        return 1

    @flow.step(after=[one], max_attempts=1)
    def two(record: Record) -> int:
        return 2

    @flow.step(after=[two])
    def three(record: Record) -> None:
        return None

    return flow


def done(record: Record, value: Any = None) -> Record:
    return record._replace(result=json.dumps(value))


def test_retention_keeps_the_records_of_an_unfinished_run(dsn: str, db: Any) -> None:
    flow = chain("retained")
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(flow, {})
        (one,) = p.claim_records(10, queues=[flow.name])
        assert p.mark_completed([done(one, 1)]) == 1
        plain = p.add_records([{}], queue="other")
        (rec,) = p.claim_records(10, queues=["other"])
        p.mark_completed([rec])
        db.execute("UPDATE processing_queue SET finished_at = now() - interval '1 day' WHERE status = 'completed'")
        assert p.purge(3600) == 1  # the plain record only: the run's first record stays while the run runs
        assert db.execute("SELECT count(*) FROM processing_queue WHERE id = %s", (plain[0],)).fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM processing_queue WHERE id = %s", (one.id,)).fetchone() == (1,)
        # two and three finish: the run is complete, and retention may take all of it (and the run's row)
        for _ in range(2):
            (rec,) = p.claim_records(10, queues=[flow.name])
            assert rec.parents and p.mark_completed([done(rec, rec.step)]) == 1
        assert p.flow_status(run.id)["status"] == "completed"
        db.execute("UPDATE processing_queue SET finished_at = now() - interval '1 day' WHERE status = 'completed'")
        db.execute("UPDATE flow_runs SET finished_at = now() - interval '1 day'")
        assert p.purge(3600) == 3
        assert p.store.flows.purge_runs(3600, 100) == 1
        assert p.flow_status(run.id) is None
        assert db.execute("SELECT count(*) FROM flow_edges").fetchone() == (0,)


def test_a_step_recovered_out_of_attempts_fails_its_run(dsn: str, db: Any) -> None:
    flow = chain("recovered")
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(flow, {})
        (one,) = p.claim_records(10, queues=[flow.name])
        p.mark_completed([done(one, 1)])
        (two,) = p.claim_records(10, queues=[flow.name])
        assert two.max_attempts == 1
        db.execute("UPDATE processing_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                   (two.id,))
        assert p.cleanup_orphaned_records() == 1  # out of attempts: failed, by the recovery statement
        status = p.flow_status(run.id)
        assert status["status"] == "failed" and status["failed_step"] == "two"
        assert "lease" in status["error"]
        assert [r["status"] for r in status["steps"]["three"]] == ["cancelled"]
        assert status["steps"]["three"][0]["last_error"] == "dependency two failed"


def test_a_run_started_in_the_callers_transaction_commits_and_rolls_back_with_it(dsn: str, db: Any) -> None:
    flow = chain("in_tx")
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with DistributedProcessor(dsn) as p:
            with engine.connect() as conn, conn.begin() as tx:
                p.start_flow(flow, {"n": 1}, conn=conn)
                tx.rollback()
            assert db.execute("SELECT count(*) FROM flow_runs").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)
            with psycopg.connect(dsn) as conn:
                run = p.start_flow(flow, {"n": 2}, conn=conn)
                assert p.claim_records(10, queues=[flow.name]) == []  # not committed yet
                conn.commit()
            (first,) = p.claim_records(10, queues=[flow.name])
            assert (first.flow_run, first.step, first.payload) == (run.id, "one", {"n": 2})
    finally:
        engine.dispose()


def test_the_template_is_stored_per_version_and_a_changed_one_writes_nothing(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        p.start_flow(chain("versioned"), {})
        changed = Flow("versioned")

        @changed.step()
        def one(record: Record) -> None:
            return None

        before = db.execute("SELECT (SELECT count(*) FROM processing_queue), (SELECT count(*) FROM flow_runs)"
                            ).fetchone()
        with pytest.raises(FlowDefinitionChanged):
            p.start_flow(changed, {})
        assert db.execute("SELECT (SELECT count(*) FROM processing_queue), (SELECT count(*) FROM flow_runs)"
                          ).fetchone() == before
        v2 = Flow("versioned", version=2)
        v2.step()(one)
        run = p.start_flow(v2, {})
        assert p.flow_status(run.id)["version"] == 2
        rows = db.execute("SELECT version, definition->'steps'->0->>'name' FROM flow_templates ORDER BY version"
                          ).fetchall()
        assert rows == [(1, "one"), (2, "one")]


@pytest.mark.parametrize("dp_shards", [3], indirect=True)
def test_a_run_lives_on_one_shard(dp_shards: DistributedProcessor) -> None:
    p = dp_shards
    flow = chain("sharded")
    runs = [p.start_flow(flow, {"n": i}) for i in range(6)]
    for _ in range(3):
        claimed = p.claim_records(100, queues=[flow.name])
        assert p.mark_completed([done(r, r.step) for r in claimed]) == len(claimed)
    for run in runs:
        status = p.flow_status(run.id)
        assert status["status"] == "completed"
    # every record of a run on the shard its run is on, and the runs spread over the shards (in turn)
    placed = set()
    for i in range(3):
        with p.connection(shard=i) as conn:
            rows = conn.execute("SELECT flow_run_id, count(*) FROM processing_queue GROUP BY 1").fetchall()
            runs_here = conn.execute("SELECT id FROM flow_runs").fetchall()
        assert {r[0] for r in rows} == {r[0] for r in runs_here}
        assert all(n == 3 for _, n in rows)
        placed |= {i for _ in rows}
    assert len(placed) >= 2
    # a run with a dedupe key lives on the shard its key routes to, and is found there again
    first = p.start_flow(flow, {}, dedupe_key="order-7")
    again = p.start_flow(flow, {}, dedupe_key="order-7")
    assert again.deduplicated and again.id == first.id
