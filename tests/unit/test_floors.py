"""The rules that move claim floors (core/floors.py): pure logic."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from core.floors import START, Floors, must_announce, position
from core.queries import Queries
from core.record import Record

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def rec(rid: int, *, queue: str = "q", priority: int = 0, run_at: datetime = T0, claimed_at: datetime | None = None,
        key: str | None = None) -> Record:
    claimed = claimed_at or T0 + timedelta(seconds=10)
    return Record(rid, queue, {}, priority, 1, 5, uuid.uuid4(), claimed, claimed, run_at, run_at, key)


def claimed(f: Floors, queues: list[str], records: list[Record], seen: dict[str, Record] | None = None) -> None:
    """One claim of ``records``: it peeked and saw ``seen`` (default: the first claimed record) first."""
    ticket = f.ticket(queues)
    ticket.peek = True
    ticket.seen = {q: position(r) for q, r in (seen or {}).items()} or {
        q: min(position(r) for r in records if r.queue == q) for q in queues if any(r.queue == q for r in records)}
    f.advance(ticket, records)


def test_a_claim_moves_the_floor_up_to_the_first_pending_record_it_saw() -> None:
    f = Floors()
    assert f.ticket(["q", "r"]).floors == [START, START]
    claimed(f, ["q", "r"], [rec(7), rec(5), rec(9, queue="r")])
    assert f.floor("q") == position(rec(5)) and f.floor("r") == position(rec(9, queue="r"))
    # a record another claim held locked (SKIP LOCKED hid it), seen first: the floor stops there
    claimed(f, ["q"], [rec(20)], seen={"q": rec(11)})
    assert f.floor("q") == position(rec(11))


def test_a_claim_that_did_not_peek_leaves_the_floor() -> None:
    f = Floors()
    claimed(f, ["q"], [rec(5)])
    ticket = f.ticket(["q"])  # no seen: the claim did not look
    f.advance(ticket, [rec(50)])
    assert f.floor("q") == position(rec(5))


def test_claims_peek_every_few_and_after_a_reset() -> None:
    f = Floors()
    assert f.ticket(["q"]).peek  # at the start: move the floor at once
    claimed(f, ["q"], [rec(5)])
    peeks = [f.ticket(["q"]).peek for _ in range(8)]
    assert peeks.count(True) == 2


def test_the_floor_never_passes_positions_younger_than_the_lag() -> None:
    f = Floors(lag=0.5)
    claimed_at = T0 + timedelta(seconds=1)
    claimed(f, ["q"], [rec(5, run_at=T0 + timedelta(seconds=0.8), claimed_at=claimed_at)])
    # a producer whose transaction began 0.5 s before the claim may still commit records of that run_at
    assert f.floor("q") == (0, claimed_at - timedelta(seconds=0.5), 0)


def test_a_lowering_during_a_claim_is_not_undone_by_its_advance() -> None:
    f = Floors()
    claimed(f, ["q"], [rec(100)])
    ticket = f.ticket(["q"])
    ticket.seen = {"q": position(rec(200))}
    f.lower([("q", position(rec(40)))])  # another statement of the family made record 40 claimable
    f.advance(ticket, [rec(200)])
    assert f.floor("q") == position(rec(40))
    claimed(f, ["q"], [rec(300)])  # the next claim (which saw 40) may move it up again
    assert f.floor("q") == position(rec(300))


def test_lowering_to_completed_keyed_records_only() -> None:
    f = Floors()
    claimed(f, ["q"], [rec(100)])
    f.lower_records([rec(50), rec(60, key="k")])
    assert f.floor("q") == position(rec(60, key="k"))


def test_higher_priority_comes_first_in_claim_order() -> None:
    assert position(rec(9, priority=5)) < position(rec(1, priority=0)) < position(rec(1, priority=-3))
    assert position(rec(1, priority=-(2**31))) > START  # the lowest priority does not overflow


def test_floors_reset_to_the_start_on_schedule() -> None:
    f = Floors(reset_every=0.0)
    claimed(f, ["q"], [rec(100)])
    assert f.ticket(["q"]).floors == [START]
    assert f.resets >= 1


def test_events_are_read_from_before_the_latest_finished_claim() -> None:
    f = Floors()
    assert f.ticket(["q"]).since == START[1]  # nothing known yet: every retained event
    claimed(f, ["q"], [rec(1)])
    since = f.ticket(["q"]).since
    assert since < T0 + timedelta(seconds=10) - timedelta(seconds=1.9)  # settle margin below the claim's clock


@pytest.mark.parametrize(("priority", "run_at", "elapsed", "expected"), [
    (0, None, 0.01, False),  # the usual insert: claims reach it after what they claimed
    (3, None, 0.0, True),  # a priority: it may sort before records already claimed
    (-3, None, 0.0, True),
    (0, datetime.now(timezone.utc) - timedelta(hours=1), 0.0, True),  # an earlier run_at
    (0, datetime.now(timezone.utc) + timedelta(hours=1), 0.0, False),  # due later: after the floors
    (0, None, 0.3, True),  # a long transaction: claims may have passed its start
])
def test_what_an_insert_announces(priority: int, run_at: datetime | None, elapsed: float, expected: bool) -> None:
    assert must_announce(priority, run_at, elapsed) is expected


def test_hot_statements_are_never_parsed_again_on_the_client() -> None:
    # psycopg parses a %(name)s query once and caches it only up to 4096 characters; above, every execution
    # pays its parse again (about 55 us for the claim). The claim is longer and runs with $n placeholders
    # through a RawCursor, which psycopg does not parse at all.
    q = Queries("public")
    text, names = q.raw("claim")
    assert "%(" not in text and "$1" in text and len(names) == len(set(names)) >= 15
    for name in ("fail", "release", "heartbeat", "add_records", "recover_orphans"):
        assert len(getattr(q, name)) <= 4096, name
