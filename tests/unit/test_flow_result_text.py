"""A flow step's result on the worker's path: the encoder's shortcut for the results steps return most writes
what the general encoder writes, a record gets its result without losing a field, and the completion's array
of results quotes every element so that PostgreSQL reads back each JSON text exactly."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any

import pytest

from core.claims import done_results
from core.payloads import encode_value
from core.record import Record, with_result

VALUES: list[Any] = [None, True, False, 0, 1, -1, 10**15 - 1, -(10**15) + 1, 10**15, -(10**15), 2**70, 1.5,
                     "", "x", 'a "quoted" \\ back\\slash', "{,}", "NULL", "é\u2028", [1, "2", None], {"k": [1, {}]}]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_encode_value_writes_what_the_json_encoder_writes(value: Any) -> None:
    assert encode_value(value) == json.dumps(value, separators=(",", ":"), allow_nan=False)


class Level(IntEnum):
    HIGH = 3


def test_int_subclasses_are_written_as_the_encoder_writes_them() -> None:
    for value in (Level.HIGH, True, False, [True, Level.HIGH]):
        assert encode_value(value) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("limit", range(1, 17))
def test_a_small_max_bytes_refuses_what_the_encoder_refuses(limit: int) -> None:
    for value in (None, True, False, 0, -7, 123456789012345, -(10**15) + 1):
        text = json.dumps(value)
        if len(text) > limit:
            with pytest.raises(ValueError, match="max_payload_bytes"):
                encode_value(value, limit)
        else:
            assert encode_value(value, limit) == text


def test_what_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode_value(float("nan"))


def _record(rid: int, flow_run: int | None) -> Record:
    now = datetime.now(timezone.utc)
    return Record(rid, "q", {"n": rid}, 0, 1, 5, uuid.uuid4(), now, now, now, now, flow_run=flow_run, step="s",
                  parents={"p": 1}, trace_context="tc")


def test_with_result_sets_only_the_result() -> None:
    rec = _record(7, 3)
    out = with_result(rec, "[1]")
    assert type(out) is Record and out.result == "[1]"
    assert out._replace(result=None) == rec


def test_done_results_is_none_without_a_flow_step_and_sorted_by_id_with_one() -> None:
    assert done_results([_record(2, None), _record(1, None)]) is None
    recs = [with_result(_record(3, 1), '"c"'), _record(1, None), with_result(_record(2, 1), 'null')]
    assert done_results(recs) == '{NULL,"null","\\"c\\""}'
