"""Claim floors: where each queue's claim scan starts, so that claims stay fast under a pinned MVCC horizon.

While a snapshot older than the work stays open (a pg_dump, a report, an idle-in-transaction session), the
dead index entries of every record claimed since cannot be removed, and a scan of the pending index from its
start steps over all of them. A claim instead starts at a *floor*: a position in claim order
(``-priority, run_at, id``) below which none of its claimable records is known to wait; the index seeks
straight there (a row comparison on one-direction columns, migration 0005).

One :class:`Floors` serves a family of claimers (the claimers of one ``run()``, or one processor's
``claim_records`` calls). What moves a floor:

* up, after a claim, to the first pending record the claim saw from its floor on, read without a lock (not
  its first claimed record: SKIP LOCKED hides a record another claim holds, and that claim may reject it
  because its key is busy; a floor moved past it would hide it from every claimer), but never within
  ``FLOOR_LAG`` of the claim's clock: a producer's records carry its transaction's start as run_at and
  become visible at its commit, so a floor may only pass positions older than any short transaction;
* down, by the claimers themselves, to records their own statements made claimable: the next record of a key
  they completed or unblocked comes after that record in claim order;
* down, by floor events (``claim_floor_events``) that other statements announce when they put a claimable
  record below other instances' floors: inserts with a priority other than 0, an explicit earlier run_at,
  or a transaction longer than ``ANNOUNCE_AFTER``; recovered, released and operator-retried records; heads
  unblocked by an operator's cancel or limit change, or by the maintenance sweep; keyed records that end
  failed or cancelled. Each claim reads its queues' events of the last seconds;
* to the start, every ``FLOOR_RESET_SECONDS``, which bounds how long anything else can wait below a floor
  (a record another claimer had locked when its statement failed, an event lost to a commit slower than
  ``EVENT_SETTLE``, a key's next record placed before its predecessor in claim order).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from core.record import Record

# A position in claim order: (-priority, run_at, id), smaller first.
Position = tuple[int, datetime, int]

START: Position = (-(2**31) - 1, datetime(1, 1, 1, tzinfo=timezone.utc), 0)  # below every record
FLOOR_LAG = 0.5  # seconds: a floor never passes positions younger than this (producer transactions)
ANNOUNCE_AFTER = 0.25  # seconds: a producer transaction longer than this announces its first record
EVENT_SETTLE = 2.0  # seconds: events are read again this long (an event written just before a slow commit)
FLOOR_RESET_SECONDS = 5.0  # every claimer family scans from the start this often
PEEK_EVERY = 4  # a claim looks where the floor may move (and moves it) this often, and after every reset


def position(record: Record) -> Position:
    return (-record.priority, record.run_at, record.id)


def must_announce(priority: int, run_at: datetime | None, elapsed: float) -> bool:
    """Whether an insert must announce its first record to the claimers (see the module docstring)."""
    if priority != 0 or elapsed > ANNOUNCE_AFTER:
        return True
    return run_at is not None and run_at - datetime.now(timezone.utc) < timedelta(seconds=2)


@dataclass
class Ticket:
    """The floors one claim statement starts from, and what the family knew when it started."""

    queues: list[str]
    floors: list[Position]
    since: datetime
    versions: list[int]
    started: float  # monotonic
    peek: bool = True  # the claim looks for the first pending record (the floor moves only when it did)
    # Per queue, the first pending record the claim saw from its floor on (with no lock: one another claim
    # holds and may reject is seen too); the floor moves there.
    seen: dict[str, Position] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        return {
            "floor_np": [f[0] for f in self.floors],
            "floor_at": [f[1] for f in self.floors],
            "floor_id": [f[2] for f in self.floors],
            "since": self.since,
            "peek": self.peek,
        }


def start_params(queues: Sequence[str]) -> dict[str, Any]:
    """Parameters of a claim that scans from the start and reads no events (no floors kept)."""
    return {"floor_np": [START[0]] * len(queues), "floor_at": [START[1]] * len(queues),
            "floor_id": [START[2]] * len(queues), "since": START[1], "peek": False}


class Floors:
    """The floors of one family of claimers, per queue. Thread-safe."""

    def __init__(self, *, lag: float | None = None, reset_every: float | None = None) -> None:
        self.lag = FLOOR_LAG if lag is None else lag
        self.reset_every = FLOOR_RESET_SECONDS if reset_every is None else reset_every
        self._lock = threading.Lock()
        self._floor: dict[str, Position] = {}
        self._version: dict[str, int] = {}  # bumped by every lowering: an advance must not undo one
        self._offset: float | None = None  # database clock minus time.monotonic(), learned from claims
        self._seen_until = 0.0  # monotonic start of the latest finished claim: its snapshot saw older events
        self._last_reset = time.monotonic()
        self._claims = 0
        self.resets = 0  # test signal

    def ticket(self, queues: Sequence[str]) -> Ticket:
        now = time.monotonic()
        with self._lock:
            if now - self._last_reset >= self.reset_every:
                self._floor.clear()
                self._last_reset = now
                self.resets += 1
            if self._offset is None or not self._seen_until:
                since = START[1]
            else:
                since = self._db_time(self._seen_until) - timedelta(seconds=EVENT_SETTLE)
            floors = [self._floor.get(q, START) for q in queues]
            self._claims += 1
            peek = self._claims % PEEK_EVERY == 0 or START in floors
            return Ticket(list(queues), floors, since, [self._version.get(q, 0) for q in queues], now, peek=peek)

    def advance(self, ticket: Ticket, claimed: Sequence[Record]) -> None:
        """After a claim that peeked: each queue's floor moves up to the first pending record the claim saw,
        never within the lag of the claim's clock."""
        finished = time.monotonic()
        with self._lock:
            if claimed:
                # claimed_at is the database's clock during the statement, at or before its end
                self._offset = claimed[0].claimed_at.timestamp() - finished
            self._seen_until = max(self._seen_until, ticket.started)
            if not ticket.seen or not claimed:
                return  # did not peek, or claimed nothing: the floors stay
            first: dict[str, Record] = {}
            for rec in claimed:  # in claim order: each queue's first record is its first occurrence
                if rec.queue not in first:
                    first[rec.queue] = rec
                    if len(first) == len(ticket.queues):
                        break
            for q, version in zip(ticket.queues, ticket.versions, strict=True):
                head = first.get(q)
                seen = ticket.seen.get(q)
                if head is None or seen is None:
                    continue
                pos = min(position(head), seen)
                cap = (pos[0], head.claimed_at - timedelta(seconds=self.lag), 0)
                new = min(pos, cap)
                if self._version.get(q, 0) == version:
                    self._floor[q] = new
                else:  # lowered meanwhile: keep the lowering
                    self._floor[q] = min(self._floor.get(q, START), new)

    def lower(self, positions: Iterable[tuple[str, Position]]) -> None:
        """Records became claimable at these positions: the family's next claims look there again."""
        with self._lock:
            for q, pos in positions:
                current = self._floor.get(q)
                if current is not None and pos < current:
                    self._floor[q] = pos
                self._version[q] = self._version.get(q, 0) + 1

    def lower_records(self, records: Iterable[Record]) -> None:
        """Lower to records whose keys' next records are now claimable (completed, or claimed and unblocked)."""
        lowest: dict[str, Position] = {}
        for r in records:  # per queue, the lowest keyed record: one comparison per record, one lowering
            if r.ordering_key is not None:
                pos = (-r.priority, r.run_at, r.id)
                if r.queue not in lowest or pos < lowest[r.queue]:
                    lowest[r.queue] = pos
        if lowest:
            self.lower(lowest.items())

    def floor(self, queue: str) -> Position:
        with self._lock:
            return self._floor.get(queue, START)

    def _db_time(self, monotonic: float) -> datetime:
        assert self._offset is not None
        return datetime.fromtimestamp(monotonic + self._offset, timezone.utc)
