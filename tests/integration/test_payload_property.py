"""Property: every batch of JSON-like payloads is either stored and read back equal, or rejected with
InvalidPayload naming an index, with nothing of it written (both insert paths: one statement, and COPY)."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import DistributedProcessor, InvalidPayload

# Every character there is, surrogates and NUL included: the ones JSONB refuses must be caught before it.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True) | ANY_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
                      max_leaves=12)
PAYLOADS = st.lists(st.dictionaries(ANY_TEXT, VALUES, max_size=5), min_size=1, max_size=6)


def _normal(value: Any) -> Any:
    """JSONB keeps numbers as exact decimals of their JSON text: 1e16 reads back as 10000000000000000."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return {k: _normal(v) for k, v in value.items()}


def _expected_invalid(payload: dict[str, Any]) -> bool:
    def bad(v: Any) -> bool:
        if isinstance(v, float):
            return math.isnan(v) or math.isinf(v)
        if isinstance(v, str):
            return "\x00" in v or any(0xD800 <= ord(c) <= 0xDFFF for c in v)
        if isinstance(v, list):
            return any(bad(x) for x in v)
        if isinstance(v, dict):
            return any(bad(k) or bad(x) for k, x in v.items())
        return False

    return bad(payload)


@pytest.mark.parametrize("copy_threshold", [1000, 2], ids=["insert", "copy"])
def test_payloads_are_stored_exactly_or_rejected_whole(dsn: str, db: Any, copy_threshold: int) -> None:
    with DistributedProcessor(dsn, copy_threshold=copy_threshold, max_payload_bytes=4096) as p:

        @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(PAYLOADS)
        def check(batch: list[dict[str, Any]]) -> None:
            before = db.execute("SELECT count(*) FROM processing_queue").fetchone()[0]
            try:
                ids = p.add_records(batch)
            except InvalidPayload as exc:
                assert 0 <= exc.index < len(batch)
                assert _expected_invalid(batch[exc.index]) or len(json.dumps(batch[exc.index])) > 4096, exc
                assert db.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == before
                return
            assert not any(_expected_invalid(b) for b in batch)
            rows = dict(db.execute("SELECT id, payload::text FROM record_payloads WHERE id = ANY(%s)",
                                   (list(ids),)).fetchall())
            stored = [json.loads(rows[i]) for i in ids]
            assert [_normal(s) for s in stored] == [_normal(b) for b in batch]

        check()


@pytest.mark.parametrize(("payload", "reason"), [
    ({"a": "\ud800"}, "lone surrogate"),
    ({"a": {"b": "x\udfff"}}, "lone surrogate"),
    ({"k\x00": 1}, "NUL"),
    ({"x": "a" * 2000}, "more than max_payload_bytes"),
])
def test_bad_payloads_name_index_and_reason_and_write_nothing(
    processor: DistributedProcessor, db: Any, payload: dict[str, Any], reason: str
) -> None:
    small = DistributedProcessor(processor.dsn, max_payload_bytes=1024)
    try:
        with pytest.raises(InvalidPayload, match=reason) as info:
            small.add_records([{"fine": 1}, payload])
        assert info.value.index == 1
    finally:
        small.close()
    assert db.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)


def test_a_payload_nested_100000_levels_deep_is_invalid(processor: DistributedProcessor, db: Any) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InvalidPayload, match="nested too deeply") as info:
        processor.add_records([deep])
    assert info.value.index == 0
    assert db.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)


def test_a_backslash_followed_by_u0000_is_data_not_a_nul(processor: DistributedProcessor) -> None:
    (rid,) = processor.add_records([{"path": "C:\\u0000\\dir"}])
    (rec,) = processor.claim_records(1)
    assert rec.id == rid and rec.payload == {"path": "C:\\u0000\\dir"}
