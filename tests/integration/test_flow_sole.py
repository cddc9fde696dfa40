"""Migration 0020: a child whose one parent is not a for_each (``flow_edges.sole``) is taken with the
``{step: result}`` its parent's completion sent, without its edges and its parent being read again; every other
child's parents are read. A run's completion looks at its sinks only (``flow_records.sink``; NULL on pairs written
before, which are all looked at). Either way a taken child's ``record.parents`` is what the read gives
(``dp_flow_parents``), whatever the results; edges written before the migration are not sole; 0017's signature of
the settlement (a previous version's claim statement) still takes children, reading their parents."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor, Record
from core.flows import Flow
from core.migrate import current_revision, downgrade, upgrade
from tests.integration.test_claim_lean import claims_of

shape = Flow("sole_shape")


@shape.step()
def a(record: Record) -> Any:
    return None


@shape.step(after=[a])
def b(record: Record) -> Any:  # one parent: sole
    return None


@shape.step(after=[a, b])
def c(record: Record) -> Any:  # two parents
    return None


@shape.step(for_each=a)
def d(record: Record) -> Any:  # a for_each: its edge from a is not sole
    return None


@shape.step(after=[d])
def e(record: Record) -> Any:  # one parent, a for_each step: sole, but its parents are elements (read)
    return None


@shape.step(after=[b], on_dependency_failure="run")
def f(record: Record) -> Any:  # one parent, runs without it: sole
    return None


def done(record: Record, result: Any) -> Record:
    return record._replace(result=json.dumps(result))


def edges(conn: Any, run: int) -> dict[tuple[str, str], bool]:
    rows = conn.execute(
        "SELECT p.step, ch.step, e.sole FROM flow_edges e JOIN processing_queue p ON p.id = e.parent_id"
        " JOIN processing_queue ch ON ch.id = e.child_id WHERE e.run_id = %s", (run,)).fetchall()
    return {(p, ch): sole for p, ch, sole in rows}


def read_parents(conn: Any, record: Record) -> Any:
    return conn.execute("SELECT dp_flow_parents(%s, %s)", (record.id, record.flow_run)).fetchone()[0]


def sinks(conn: Any, run: int) -> dict[str, list[Any]]:
    rows = conn.execute("SELECT r.step, f.sink FROM flow_records f JOIN processing_queue r ON r.id = f.record_id"
                        " WHERE f.flow_run_id = %s ORDER BY r.id", (run,)).fetchall()
    out: dict[str, list[Any]] = {}
    for step, sink in rows:
        out.setdefault(step, []).append(sink)
    return out


def finish(p: DistributedProcessor, conn: Any, run: int) -> None:
    """Claim and complete the run's records until it ends (a's result a list, for d to fan out over); ended, it
    has no record left unfinished (it did not complete before its last one)."""
    for _ in range(20):
        status = p.flow_status(run)
        assert status is not None
        if status["status"] != "running":
            assert conn.execute("SELECT count(*) FROM processing_queue WHERE flow_run_id = %s"
                                " AND status IN ('waiting', 'pending', 'processing')", (run,)).fetchone()[0] == 0
            return
        got = [r for r in p.claim_records(10, queues=[shape.name]) if r.flow_run == run]
        p.mark_completed([done(r, [1, 2] if r.step == "a" else None) for r in got])
    raise AssertionError(f"run {run} did not end")


def test_an_edge_is_sole_when_its_child_has_that_one_parent_and_it_is_no_for_each(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(shape, {})
    assert edges(db, run.id) == {("a", "b"): True, ("a", "c"): False, ("b", "c"): False, ("a", "d"): False,
                                 ("d", "e"): True, ("b", "f"): True}


def test_a_runs_sinks_are_marked_and_it_completes_with_its_last_one_not_before(dsn: str, db: Any) -> None:
    tail = Flow("sole_tail")

    @tail.step()
    def root(record: Record) -> Any:
        return [1, 2, 3]

    @tail.step(for_each=root)
    def each(record: Record) -> Any:  # no step follows it: its elements are sinks
        return None

    with DistributedProcessor(dsn, instance_id="t") as p:
        run = p.start_flow(shape, {})
        assert sinks(db, run.id) == {"a": [False], "b": [False], "c": [True], "d": [False], "e": [True],
                                     "f": [True]}
        finish(p, db, run.id)
        assert p.flow_status(run.id)["status"] == "completed"
        assert sinks(db, run.id)["d"] == [False, False]  # d's elements: e follows them
        other = p.start_flow(tail, {})
        (head,) = p.claim_records(10, queues=[tail.name])
        got, _ = claims_of(p).claim([done(head, [1, 2, 3])], 10, [tail.name])
        assert sinks(db, other.id) == {"root": [False], "each": [True, True, True]}
        for i, r in enumerate(sorted(got, key=lambda r: r.id)):
            assert p.flow_status(other.id)["status"] == "running"  # an element left: not complete yet
            # completed by the claim statement, which sends the sink's run
            assert claims_of(p).claim([done(r, i)], 10, [tail.name]) == ([], 1)
        assert p.flow_status(other.id)["status"] == "completed"


@pytest.mark.parametrize("value", [None, 0, "it's \"quoted\" — ünï", {"nested": [1, {"x": None}]}, [3, 2, 1],
                                   "x" * 5000])
def test_a_taken_child_gets_the_parents_the_read_gives(dsn: str, db: Any, value: Any) -> None:
    with DistributedProcessor(dsn, instance_id="t") as p:
        run = p.start_flow(shape, {"v": 1})
        (head,) = p.claim_records(10, queues=[shape.name])
        # a's result is a list (d fans out over it): the value inside it, so every shape of result is passed on
        got, _ = claims_of(p).claim([done(head, [value, value])], 10, [shape.name])
        by_step: dict[str, list[Record]] = {}
        for r in got:
            by_step.setdefault(r.step or "", []).append(r)
        # b (sole: sent) and d's two elements (read) are taken; c waits for b
        assert sorted(by_step) == ["b", "d"] and len(by_step["d"]) == 2
        assert by_step["b"][0].parents == {"a": [value, value]} == read_parents(db, by_step["b"][0])
        assert all(r.parents == read_parents(db, r) for r in by_step["d"])
        got, _ = claims_of(p).claim([done(by_step["b"][0], value), *(done(r, value) for r in by_step["d"])], 10,
                                    [shape.name])
        taken = {r.step: r for r in got}
        assert sorted(taken) == ["c", "e", "f"]
        assert taken["f"].parents == {"b": value} == read_parents(db, taken["f"])  # sole: sent
        assert taken["c"].parents == {"a": [value, value], "b": value} == read_parents(db, taken["c"])
        assert taken["e"].parents == {"d": [value, value]} == read_parents(db, taken["e"])  # elements: read
        assert p.mark_completed([done(r, None) for r in got]) == 3
        assert p.flow_status(run.id)["status"] == "completed"


def test_each_sole_child_gets_its_own_parents_result_from_one_batch(dsn: str, db: Any) -> None:
    pair = Flow("sole_pair")

    @pair.step()
    def one(record: Record) -> Any:
        return None

    @pair.step(after=[one])
    def two(record: Record) -> Any:
        return None

    with DistributedProcessor(dsn, instance_id="t") as p:
        runs = [p.start_flow(pair, {"n": i}) for i in range(5)]
        heads = p.claim_records(10, queues=[pair.name])
        assert len(heads) == 5
        got, completed = claims_of(p).claim([done(h, {"run": h.flow_run, "n": i}) for i, h in enumerate(heads)], 10,
                                            [pair.name])
        assert completed == 5
        sent = {h.flow_run: {"run": h.flow_run, "n": i} for i, h in enumerate(heads)}
        assert sorted(r.flow_run for r in got) == sorted(r.id for r in runs)
        assert all(r.parents == {"one": sent[r.flow_run]} == read_parents(db, r) for r in got)


def test_with_less_room_than_children_those_that_can_be_taken_are(dsn: str, db: Any) -> None:
    split = Flow("sole_room")

    @split.step()
    def top(record: Record) -> Any:
        return None

    @split.step(after=[top], queue="sole_room_elsewhere")  # the smaller id, in a queue the caller does not work
    def away(record: Record) -> Any:
        return None

    @split.step(after=[top])
    def here(record: Record) -> Any:
        return None

    with DistributedProcessor(dsn, instance_id="t") as p:
        run = p.start_flow(split, {})
        assert run.ids["away"] < run.ids["here"]
        (head,) = p.claim_records(10, queues=[split.name])
        got, _ = claims_of(p).claim([done(head, 1)], 1, [split.name])
        assert [(r.step, r.parents) for r in got] == [("here", {"top": 1})]
        assert db.execute("SELECT status FROM processing_queue WHERE id = %s", (run.ids["away"],)).fetchone()[0] \
            == "pending"


def test_a_sole_child_of_a_cancelled_parent_that_runs_without_it_gets_no_parents(dsn: str, db: Any) -> None:
    short = Flow("sole_run")

    @short.step()
    def first(record: Record) -> Any:
        return None

    @short.step(after=[first], on_dependency_failure="run")
    def second(record: Record) -> Any:
        return None

    with DistributedProcessor(dsn, instance_id="t") as p:
        run = p.start_flow(short, {})
        (one,) = p.claim_records(10, queues=[short.name])
        db.execute("UPDATE processing_queue SET cancel_requested = true WHERE id = %s", (one.id,))
        got, _ = claims_of(p).claim([done(one, 5)], 10, [short.name])  # the flag wins: cancelled, not completed
        assert [(r.step, r.parents) for r in got] == [("second", {})]
        assert p.flow_status(run.id)["status"] == "failed"


def test_the_settlement_gives_a_sole_child_what_was_sent_and_reads_the_others(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(shape, {})
    db.execute("UPDATE processing_queue SET status = 'completed', finished_at = now(), result = '[7]'"
               " WHERE id = %s", (run.ids["a"],))
    # what the claim statement sends for its completed record (here unlike the row, to tell them apart)
    rows = db.execute(
        "SELECT step, parents FROM dp_flow_settle_take(ARRAY[%s]::bigint[], NULL, ARRAY[%s], 10, gen_random_uuid(),"
        " 'new', 30, ARRAY[%s]::bigint[], ARRAY['{\"a\": \"sent\"}'::jsonb])",
        (run.ids["a"], shape.name, run.id)).fetchall()
    assert sorted(rows) == [("b", {"a": "sent"}), ("d", {"a": [7]})]


def test_0017s_signature_takes_children_reading_their_parents(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(shape, {})
    db.execute("UPDATE processing_queue SET status = 'completed', finished_at = now(), result = '[7]'"
               " WHERE id = %s", (run.ids["a"],))
    rows = db.execute(
        "SELECT step, parents FROM dp_flow_settle_take(ARRAY[%s]::bigint[], NULL, ARRAY[%s], 10, gen_random_uuid(),"
        " 'old', 30)", (run.ids["a"], shape.name)).fetchall()
    assert sorted(rows) == [("b", {"a": [7]}), ("d", {"a": [7]})]


def test_an_id_sent_twice_counts_once(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        run = p.start_flow(shape, {})
    db.execute("UPDATE processing_queue SET status = 'completed', finished_at = now(), result = '[7]'"
               " WHERE id = %s", (run.ids["a"],))
    db.execute("SELECT count(*) FROM dp_flow_settle_take(ARRAY[%s, %s]::bigint[], NULL, ARRAY[%s], 0, NULL, NULL,"
               " NULL)", (run.ids["a"], run.ids["a"], shape.name))
    # c waits for a and b: a counted once leaves it waiting on b
    assert db.execute("SELECT status, waiting_on FROM processing_queue WHERE id = %s",
                      (run.ids["c"],)).fetchone() == ("waiting", 1)


def test_migration_0020_leaves_earlier_edges_read_and_goes_back(empty_dsn: str) -> None:
    upgrade(empty_dsn, revision="0019_flow_records")
    with DistributedProcessor(empty_dsn, instance_id="t") as p:
        before = p.start_flow(shape, {})
        (head,) = p.claim_records(10, queues=[shape.name])
    upgrade(empty_dsn)
    assert current_revision(empty_dsn) == "0020_settle_reads"
    with psycopg.connect(empty_dsn, autocommit=True) as conn, DistributedProcessor(empty_dsn, instance_id="t") as p:
        assert not any(edges(conn, before.id).values())  # written before: not sole, every child read
        got, _ = claims_of(p).claim([done(head, ["x"])], 10, [shape.name])  # claimed before, completes by its token
        assert {r.step: r.parents for r in got} == {"b": {"a": ["x"]}, "d": {"a": ["x"]}}
        after = p.start_flow(shape, {})
        assert edges(conn, after.id)[("a", "b")] is True
        # the pairs written before are not known to be sinks or not: every one is looked at, and the run ends
        # with its last record
        assert {v for vs in sinks(conn, before.id).values() for v in vs} == {None}
        assert p.mark_completed([done(r, None) for r in got]) == 2
        finish(p, conn, before.id)
        assert p.flow_status(before.id)["status"] == "completed"
    downgrade(empty_dsn, "0019_flow_records")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE (table_name, column_name)"
                            " IN (('flow_edges', 'sole'), ('flow_records', 'sink'))").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'dp_flow_settle_take'").fetchone()[0] == 1
        # 0019's settlement (the code of that version calls it so) takes the children of a run started on 0020
        conn.execute("UPDATE processing_queue SET status = 'completed', finished_at = now(), result = '[1]'"
                     " WHERE id = %s", (after.ids["a"],))
        rows = conn.execute(
            "SELECT step, parents FROM dp_flow_settle_take(ARRAY[%s]::bigint[], NULL, ARRAY[%s], 10,"
            " gen_random_uuid(), 'old', 30)", (after.ids["a"], shape.name)).fetchall()
        assert sorted(rows) == [("b", {"a": [1]}), ("d", {"a": [1]})]
    upgrade(empty_dsn)
    assert current_revision(empty_dsn) == "0020_settle_reads"
