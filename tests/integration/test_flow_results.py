"""The completion's array of flow step results (an array literal built by the worker, core/claims.py) is read
back by PostgreSQL as exactly the JSON each step returned, whatever its text holds (quotes, backslashes,
braces, commas, the word NULL, escapes), through the completing claim and through ``mark_completed``."""

from __future__ import annotations

from typing import Any

import pytest

from core import DistributedProcessor, Record
from core.flows import Flow
from core.payloads import encode_value
from core.record import with_result
from tests.integration.test_claim_lean import claims_of

AWKWARD: list[Any] = ['a "quoted" \\ back\\slash', "{,}", "NULL", "", None, "é\u2028\\u0041", [1, "}", None],
                      {"k": "\\\"", "n": -3}, 10**20, 2.5, True]

single = Flow("result_text")


@single.step()
def only(record: Record) -> None:
    return None


@pytest.mark.parametrize("via", ["claim", "mark_completed"])
def test_every_result_is_stored_as_returned(dsn: str, db: Any, via: str) -> None:
    with DistributedProcessor(dsn) as p:
        runs = [p.start_flow(single, {"i": i}) for i in range(len(AWKWARD))]
        recs = sorted(p.claim_records(len(AWKWARD), queues=[single.name]), key=lambda r: r.id)
        by_id = {run.ids["only"]: value for run, value in zip(runs, AWKWARD, strict=True)}
        # newest first: the statement pairs each result with its id whatever order the caller gives
        done = [with_result(r, encode_value(by_id[r.id])) for r in reversed(recs)]
        if via == "claim":
            _, completed = claims_of(p).claim(done, 10, [single.name])
        else:
            completed = p.mark_completed(done)
        assert completed == len(AWKWARD)
        stored = dict(db.execute("SELECT id, result FROM processing_queue WHERE id = ANY(%s)",
                                 (list(by_id),)).fetchall())
        assert stored == by_id
        # a step's null is JSON's null on the row, not a missing result
        assert db.execute("SELECT count(*) FROM processing_queue WHERE id = ANY(%s) AND result IS NULL",
                          (list(by_id),)).fetchone()[0] == 0
        assert {p.flow_status(run.id)["status"] for run in runs} == {"completed"}
