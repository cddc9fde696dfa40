"""Keyed completions wake the idle workers of their queue by NOTIFY at most once per window from one instance;
one held back is sent once the window has passed, alone or with the next keyed completion (core.claims). The
completer thread sends those due alone (tests/unit/test_completer_flows.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from core import DistributedProcessor
from core.claims import Claims, KeyNotices
from core.queries import channel_for


def claims_of(p: DistributedProcessor) -> Claims:
    return p.store.claims  # type: ignore[attr-defined, no-any-return]


def heard(listener: psycopg.Connection[Any], timeout: float) -> list[str]:
    # Delivered at the sender's commit, which has returned: a short wait is for the socket only.
    return [n.payload for n in listener.notifies(timeout=timeout, stop_after=1)]


def test_keyed_completions_within_the_window_notify_once_then_the_held_back_one(dsn: str) -> None:
    now = [0.0]
    with psycopg.connect(dsn, autocommit=True) as listener, DistributedProcessor(dsn) as p:
        listener.execute(f'LISTEN "{channel_for("public", "kq")}"')
        claims_of(p).notices = KeyNotices(10.0, clock=lambda: now[0])
        p.add_records([{"n": i} for i in range(4)], queue="kq", ordering_key=[f"k{i}" for i in range(4)])
        list(listener.notifies(timeout=0.5, stop_after=1))  # the insert's own notification
        got = p.claim_records(4, queues=["kq"])
        assert len(got) == 4
        assert p.mark_completed(got[:1]) == 1
        assert heard(listener, 2.0) == ["kq"], "the first keyed completion wakes the queue's workers"
        assert p.mark_completed(got[1:2]) == 1
        assert heard(listener, 0.3) == [], "a second within the window is held back"
        claims_of(p).notify_owed()
        assert heard(listener, 0.3) == [], "its window has not passed"
        now[0] += 10.0
        claims_of(p).notify_owed()
        assert heard(listener, 2.0) == ["kq"], "sent alone once the window has passed"
        assert p.mark_completed(got[2:3]) == 1
        assert heard(listener, 0.3) == [], "a new window started with it"
        now[0] += 10.0
        assert p.mark_completed(got[3:]) == 1
        assert heard(listener, 2.0) == ["kq"], "the next keyed completion after the window carries it"
        claims_of(p).notify_owed()
        assert heard(listener, 0.3) == [], "nothing left held back"



def test_keys_of_any_text_are_unblocked(dsn: str, db: Any) -> None:
    """The keys to unblock travel as one array literal (not dumped element by element): quotes, backslashes,
    commas, braces, spaces and a NULL-like word: each key reaches its own records."""
    keys = ['a"b', "c\\d", "e,f", "{g}", " h ", "NULL", "ключ", "'q'", '\\"']
    with DistributedProcessor(dsn) as p:
        p.add_records([{"n": i} for i in range(2 * len(keys))], ordering_key=keys + keys)
        blocked = db.execute("SELECT ordering_key FROM processing_queue WHERE key_blocked ORDER BY id").fetchall()
        assert [k for (k,) in blocked] == keys, "each key's second record is inserted blocked (close behind)"
        heads = p.claim_records(100)
        assert sorted(r.ordering_key or "" for r in heads) == sorted(keys)
        assert db.execute("SELECT count(*) FROM processing_queue WHERE key_blocked").fetchone() == (0,)
        assert p.mark_completed(heads) == len(keys)
        assert sorted(r.ordering_key or "" for r in p.claim_records(100)) == sorted(keys)
