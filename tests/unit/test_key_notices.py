"""core.claims.KeyNotices: a keyed completion's wake-up per queue at most once per window, the rest held back
and sent once the window has passed (pure logic, on a clock the test sets; steps are binary fractions, so the
window's edge is exact)."""

from __future__ import annotations

from core.claims import KEY_NOTIFY_SECONDS, KeyNotices


def notices(window: float = 1.0) -> tuple[KeyNotices, list[float]]:
    now = [100.0]
    return KeyNotices(window, clock=lambda: now[0]), now


def test_the_first_keyed_completion_of_a_queue_notifies_at_once() -> None:
    n, _ = notices()
    assert n.take(["q", "q"]) == ["q"]
    assert n.owed() == []


def test_a_second_within_the_window_is_held_back_then_sent_by_the_next_after_it() -> None:
    n, now = notices()
    assert n.take(["q"]) == ["q"]
    now[0] += 0.5
    assert n.take(["q"]) == []
    assert n.owed() == [], "its window has not passed"
    now[0] += 0.5
    assert n.take(["q"]) == ["q"], "the next keyed completion after the window carries it"
    assert n.owed() == [], "sent: nothing left held back"


def test_a_held_back_notice_is_sent_alone_once_its_window_has_passed() -> None:
    n, now = notices()
    n.take(["q"])
    now[0] += 0.125
    assert n.take(["q"]) == []
    now[0] += 0.75
    assert n.owed() == []
    now[0] += 0.125
    assert n.owed() == ["q"], "exactly one window after the last one sent"
    assert n.owed() == [], "taken once"
    # and sending it starts a new window
    assert n.take(["q"]) == []
    assert n.owed() == []


def test_queues_have_windows_of_their_own_and_a_statement_carries_the_others_held_back() -> None:
    n, now = notices()
    assert n.take(["a"]) == ["a"]
    assert n.take(["b"]) == ["b"], "another queue's window is its own"
    now[0] += 0.25
    assert n.take(["a"]) == [] and n.take(["b"]) == []
    now[0] += 1
    assert n.take(["a"]) == ["a", "b"], "b held back goes with a's completion after its window"
    assert n.owed() == []


def test_a_statement_whose_commit_is_the_callers_carries_nothing_for_others() -> None:
    n, now = notices()
    n.take(["a"])
    n.take(["b"])
    n.take(["b"])  # b held back
    now[0] += 2
    assert n.take(["a"], carry=False) == ["a"]
    assert n.owed() == ["b"], "still held back: a rollback of that statement would have lost it"


def test_without_carry_a_queue_held_back_for_another_completion_stays_held_back() -> None:
    n, now = notices()
    n.take(["a"])
    n.take(["a"])  # a held back for a completion that committed
    now[0] += 2
    assert n.take(["a"], carry=False) == ["a"], "this completion wakes a too"
    now[0] += 1
    assert n.owed() == ["a"], "and the earlier one's stays held back (this one may roll back): sent a window later"


def test_a_wake_up_that_found_no_connection_is_tried_again_a_window_later() -> None:
    n, now = notices()
    n.take(["q"])
    n.take(["q"])
    now[0] += 1
    taken = n.owed()
    assert taken == ["q"]
    n.defer(taken)
    assert n.owed() == [], "not at every turn of the completer's loop"
    now[0] += 1
    assert n.owed() == ["q"]


def test_no_keyed_completion_sends_nothing_and_keeps_what_is_held_back() -> None:
    n, now = notices()
    n.take(["q"])
    n.take(["q"])
    now[0] += 2
    assert n.take([]) == []
    assert n.owed() == ["q"]


def test_a_failed_statement_gives_back_what_it_took_due_at_once() -> None:
    n, _ = notices()
    taken = n.take(["q"])
    n.restore(taken)
    assert n.owed() == ["q"], "due at once, although within the window of the failed send"


def test_the_stop_sends_everything_held_back() -> None:
    n, _ = notices()
    n.take(["q"])
    n.take(["q"])
    assert n.owed() == []
    assert n.owed(force=True) == ["q"]
    assert n.owed(force=True) == []


def test_no_window_sends_every_one() -> None:
    """The library's own completions (no completer to send a held-back one later)."""
    n, _ = notices(0.0)
    assert n.take(["q"]) == ["q"]
    assert n.take(["q"]) == ["q"]
    assert n.owed() == []


def test_the_default_window_bounds_the_delay_of_an_idle_worker() -> None:
    assert 0 < KEY_NOTIFY_SECONDS <= 0.1
    assert KeyNotices().window == KEY_NOTIFY_SECONDS
