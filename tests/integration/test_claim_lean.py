"""The two claim statements: the lean one (no queue control, no flow settlement) while nothing is set, the full
one as soon as the lean one's gate, read in the statement itself, finds a pause or a rate on the claimed queues."""

from __future__ import annotations

import json
from typing import Any

from core import DistributedProcessor, Record
from core.claims import Claims
from core.flows import Flow


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
