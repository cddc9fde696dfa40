"""Migration 0017: the claim statement that completes a flow step takes the children it releases (made
processing with its token in the update that counts them, returned with the records it claims), when they are
due, in one of its queues, without an ordering key, within its room, and while no pause or rate is set. The
public calls that complete without claiming (``mark_completed``) and the statements that end records without
claiming (fail, recovery, cancel) release children as before."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from core import DistributedProcessor, Record
from core.flows import Flow
from core.migrate import current_revision, downgrade, upgrade
from tests.integration.test_claim_lean import claims_of

chain = Flow("take_chain")


@chain.step()
def first(record: Record) -> int:
    return 1


@chain.step(after=[first])
def second(record: Record) -> int:
    return 2


@chain.step(after=[second])
def third(record: Record) -> None:
    return None


def done(record: Record, result: Any) -> Record:
    return record._replace(result=json.dumps(result))


def row(db: Any, rid: int) -> tuple[Any, ...]:
    return tuple(db.execute("SELECT status, lease_token, claimed_by, attempts, lease_expires_at IS NOT NULL"
                            " FROM processing_queue WHERE id = %s", (rid,)).fetchone())


def test_the_completing_claim_takes_the_released_child_and_its_results(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn, instance_id="taker") as p:
        run = p.start_flow(chain, {"n": 1})
        (one,) = p.claim_records(10, queues=[chain.name])
        events_before = db.execute("SELECT count(*) FROM claim_floor_events").fetchone()[0]
        got, completed = claims_of(p).claim([done(one, 1)], 10, [chain.name])
        assert completed == 1
        (two,) = got  # the child, taken in the statement that completed its parent
        assert (two.id, two.step, two.parents, two.attempts) == (run.ids["second"], "second", {"first": 1}, 1)
        assert row(db, two.id) == ("processing", two.lease_token, "taker", 1, True)
        # taken, not released: no announcement to the other claimers
        assert db.execute("SELECT count(*) FROM claim_floor_events").fetchone()[0] == events_before
        got, _ = claims_of(p).claim([done(two, 2)], 10, [chain.name])  # fenced by the token it came with
        assert [(r.step, r.parents) for r in got] == [("third", {"second": 2})]
        assert p.mark_completed(got) == 1
        assert p.flow_status(run.id)["status"] == "completed"


def test_no_more_than_the_room_asked_for_the_rest_released(dsn: str, db: Any) -> None:
    fan = Flow("take_fan")

    @fan.step()
    def split(record: Record) -> list[int]:
        return [1, 2, 3, 4, 5]

    @fan.step(for_each=split)
    def part(record: Record) -> int:
        return int(record.payload)

    with DistributedProcessor(dsn, instance_id="a") as p, DistributedProcessor(dsn, instance_id="b") as other:
        run = p.start_flow(fan, {})
        (head,) = p.claim_records(10, queues=[fan.name])
        got, _ = claims_of(p).claim([done(head, [1, 2, 3, 4, 5])], 2, [fan.name])
        assert sorted(r.payload for r in got) == [1, 2]  # the two smallest ids: elements 0 and 1
        rest = other.claim_records(10, queues=[fan.name])  # released: pending for any instance
        assert sorted(r.payload for r in rest) == [3, 4, 5]
        assert p.mark_completed(got) == 2 and other.mark_completed(rest) == 3
        assert p.flow_status(run.id)["status"] == "completed"


def test_children_it_cannot_take_are_released_as_before(dsn: str, db: Any) -> None:
    mixed = Flow("take_mixed")

    @mixed.step()
    def root(record: Record) -> int:
        return 0

    @mixed.step(after=[root], queue="elsewhere")
    def other_queue(record: Record) -> None:
        return None

    @mixed.step(after=[root], ordering_key="k")
    def keyed(record: Record) -> None:
        return None

    @mixed.step(after=[root])
    def plain(record: Record) -> None:
        return None

    with DistributedProcessor(dsn) as p:
        run = p.start_flow(mixed, {})
        (head,) = p.claim_records(10, queues=[mixed.name])
        got, _ = claims_of(p).claim([done(head, 0)], 10, [mixed.name])
        assert [r.step for r in got] == ["plain"]  # in the caller's queue and keyless: taken
        assert row(db, run.ids["other_queue"])[0] == "pending"  # not a queue this claim works
        assert row(db, run.ids["keyed"])[0] == "pending"  # its key's order is the claim's to keep
        rest = p.claim_records(10, queues=[mixed.name])
        assert [r.step for r in rest] == ["keyed"] and p.mark_completed([*got, *rest]) == 2
        # A pause anywhere (or a rate): nothing taken, the children released for the full claim to apply it.
        run2 = p.start_flow(mixed, {})
        (head2,) = p.claim_records(10, queues=[mixed.name])
        p.pause("unrelated")
        got, _ = claims_of(p).claim([done(head2, 0)], 10, [mixed.name])
        assert got == [] and row(db, run2.ids["plain"])[0] == "pending"
        p.resume("unrelated")


def test_a_stale_completion_takes_nothing(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn, instance_id="slow") as slow, DistributedProcessor(dsn, instance_id="new") as new:
        run = slow.start_flow(chain, {"n": 2})
        (one,) = slow.claim_records(10, queues=[chain.name])
        db.execute("UPDATE processing_queue SET status = 'pending', lease_token = NULL WHERE id = %s", (one.id,))
        (again,) = new.claim_records(10, queues=[chain.name])  # re-claimed: a new token
        got, completed = claims_of(slow).claim([done(one, 1)], 10, [chain.name])
        assert (got, completed) == ([], 0)  # fenced out: nothing completed, settled or taken
        assert row(db, run.ids["second"])[0] == "waiting"
        got, completed = claims_of(new).claim([done(again, 1)], 10, [chain.name])
        assert completed == 1 and [r.id for r in got] == [run.ids["second"]]


def test_mark_completed_takes_nothing(processor: DistributedProcessor, db: Any) -> None:
    run = processor.start_flow(chain, {"n": 3})
    (one,) = processor.claim_records(10, queues=[chain.name])
    assert processor.mark_completed([done(one, 1)]) == 1
    assert row(db, run.ids["second"])[0] == "pending"


def test_migration_0017_downgrades_and_upgrades_again(empty_dsn: str) -> None:
    upgrade(empty_dsn)

    def has_take() -> bool:
        with psycopg.connect(empty_dsn) as conn:
            return bool(conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'dp_flow_settle_take'"
                                     ).fetchone()[0])

    with DistributedProcessor(empty_dsn) as p:
        run = p.start_flow(chain, {"n": 4})
        assert has_take()
        # claimed before the downgrade: this version's claim reads processing_payload, which 0018 adds
        (one,) = p.claim_records(10, queues=[chain.name])
        downgrade(empty_dsn, "0016_flow_trace")
        assert current_revision(empty_dsn) == "0016_flow_trace" and not has_take()
        # dp_flow_settle as 0016 left it, called as the previous version's statements call it: the child released
        with psycopg.connect(empty_dsn) as conn:
            conn.execute("UPDATE processing_queue SET status = 'completed', result = '1', finished_at = now()"
                         " WHERE id = %s", (one.id,))
            conn.execute("SELECT dp_flow_settle(ARRAY[%s]::bigint[], NULL)", (one.id,))
            conn.commit()
            assert conn.execute("SELECT status FROM processing_queue WHERE id = %s",
                                (run.ids["second"],)).fetchone()[0] == "pending"
        upgrade(empty_dsn)
        assert has_take()
        (two,) = p.claim_records(10, queues=[chain.name])
        got, _ = claims_of(p).claim([done(two, 2)], 10, [chain.name])
        assert [(r.step, r.parents) for r in got] == [("third", {"second": 2})]
        assert p.mark_completed(got) == 1
        assert p.flow_status(run.id)["status"] == "completed"
