"""Keyed completions wake the idle workers of their queue by NOTIFY: a run's at most once per window per queue,
one held back sent once the window has passed, alone or with the next keyed completion; the library's own
completions every time (core.claims). The completer thread's sends: tests/unit/test_completer_flows.py."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from core import DistributedProcessor
from core.claims import KEY_NOTIFY_SECONDS, Claims, KeyNotices
from core.queries import channel_for

CHANNEL = channel_for("public", "kq")


def claims_of(p: DistributedProcessor) -> Claims:
    return p.store.claims  # type: ignore[attr-defined, no-any-return]


def heard(listener: psycopg.Connection[Any], db: Any) -> list[str]:
    """What the listener has been sent so far: a sentinel notification is sent after it, and notifications
    arrive in commit order, so everything before the sentinel is what was sent (no wait for an absence)."""
    db.execute("SELECT pg_notify(%s, 'sentinel')", (CHANNEL,))
    got: list[str] = []
    for n in listener.notifies(timeout=10.0):
        if n.payload == "sentinel":
            return got
        got.append(n.payload)
    raise AssertionError(f"the sentinel never came (heard {got})")


def test_keyed_completions_within_the_window_notify_once_then_the_held_back_one(dsn: str, db: Any) -> None:
    now = [0.0]
    with psycopg.connect(dsn, autocommit=True) as listener, DistributedProcessor(dsn) as p:
        claims_of(p).notices = KeyNotices(10.0, clock=lambda: now[0])  # a run's window, on a clock set here
        p.add_records([{"n": i} for i in range(4)], queue="kq", ordering_key=[f"k{i}" for i in range(4)])
        listener.execute(f'LISTEN "{CHANNEL}"')  # after the insert: its own notification is not heard
        got = p.claim_records(4, queues=["kq"])
        assert len(got) == 4
        assert p.mark_completed(got[:1]) == 1
        assert heard(listener, db) == ["kq"], "the first keyed completion wakes the queue's workers"
        assert p.mark_completed(got[1:2]) == 1
        assert heard(listener, db) == [], "a second within the window is held back"
        claims_of(p).notify_owed()
        assert heard(listener, db) == [], "its window has not passed"
        now[0] += 10.0
        claims_of(p).notify_owed()
        assert heard(listener, db) == ["kq"], "sent alone once the window has passed"
        assert p.mark_completed(got[2:3]) == 1
        assert heard(listener, db) == [], "a new window started with it"
        now[0] += 10.0
        assert p.mark_completed(got[3:]) == 1
        assert heard(listener, db) == ["kq"], "the next keyed completion after the window carries it"
        claims_of(p).notify_owed(force=True)
        assert heard(listener, db) == [], "nothing left held back"


def test_the_librarys_own_keyed_completions_notify_every_time(dsn: str, db: Any) -> None:
    """No completer sends a held-back wake-up for mark_completed: each of its keyed completions sends one."""
    with psycopg.connect(dsn, autocommit=True) as listener, DistributedProcessor(dsn) as p:
        p.add_records([{"n": i} for i in range(3)], queue="kq", ordering_key=["a", "b", "c"])
        listener.execute(f'LISTEN "{CHANNEL}"')
        got = p.claim_records(3, queues=["kq"])
        for r in got:
            assert p.mark_completed([r]) == 1
        assert heard(listener, db) == ["kq"] * 3


def test_a_run_holds_back_within_its_window_and_sends_the_rest_by_its_stop(dsn: str, db: Any) -> None:
    """A run's keyed completions, one statement each (batch 1): at most one wake-up per window, plus what its
    stop sends, never one per completion."""
    n = 100
    with psycopg.connect(dsn, autocommit=True) as listener, DistributedProcessor(dsn, batch_size=1) as p:
        p.add_records([{"n": i} for i in range(n)], queue="kq", ordering_key=[f"k{i}" for i in range(n)])
        listener.execute(f'LISTEN "{CHANNEL}"')
        started = time.monotonic()
        summary = p.run(lambda record: None, queues=["kq"], stop_when_empty=True, poll_interval=0.2,
                        handle_signals=False, claimers=1, concurrency=1)
        elapsed = time.monotonic() - started
        assert summary.processed == n
        # (a run also ends its own service wait by a notification with no queue named: not a keyed one)
        sent = [q for q in heard(listener, db) if q]
    assert set(sent) == {"kq"}
    assert 1 <= len(sent) <= elapsed / KEY_NOTIFY_SECONDS + 2, (len(sent), elapsed)
    assert len(sent) < n, "not one per completion statement"


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
