"""The fenced statements of claimed records: claim (carrying completions), complete, fail, release, extend.

Every update of a claimed record pairs its id with the claim's lease token; zero rows updated means the claim
was lost, which the caller reports. The id arrays are sorted, so each statement finds a row's own token by a
binary search (``width_bucket``) instead of joining the arrays to the table.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from core.db import Conn, Database
from core.errors import DatabaseUnavailable, InvalidArgument
from core.floors import Floors, Ticket, start_params
from core.plans import Plan, Stmt, on, run
from core.queries import channel_for
from core.record import Claimed, Record, format_error
from core.retry import RetryPolicy

log = logging.getLogger("core.claims")

ERROR_TEXT_LIMIT = 2000

# Sort key of the fenced statements' id arrays: id, then claimed_at (fields 0 and 7 of the named tuple;
# faster than attrgetter). For an id offered twice (an old claim and its re-claim) width_bucket picks the
# last, so the latest claim, the only one whose token can still be on the row, comes last.
_record_order = operator.itemgetter(0, 7)

# A keyed completion may free its key's next record, which only a claim after it can see: its statement wakes
# the idle workers of the record's queue by NOTIFY. A run sends that at most once per queue per database in this
# window (a drain of keyed records completes a batch every few milliseconds, and every notification costs each
# listening server process a transaction and wakes every listening instance: measured, several per cent of the
# keyed drain's throughput). A notice held back goes with the run's next keyed completion after the window, or
# alone once the window has passed (the completer thread looks every 10 ms, and sends what is left when the run
# stops): an idle worker hears of a freed key within about this long. The library's own completions
# (mark_completed, complete_and_claim) have no completer to send a held-back one: they notify every time.
KEY_NOTIFY_SECONDS = 0.05
# How long sending the held-back wake-ups waits for a connection (the completer thread sends them).
NOTIFY_BORROW_SECONDS = 0.05


class KeyNotices:
    """Which queues a keyed completion statement wakes now, and which wait for the window (thread-safe: the
    claimer threads and the completer share it)."""

    def __init__(self, window: float = KEY_NOTIFY_SECONDS, clock: Any = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}  # queue -> when a notification was last sent for it
        self._owed: set[str] = set()  # queues whose notification was held back

    def take(self, keyed: Iterable[str], *, carry: bool = True) -> list[str]:
        """The queues to wake with a statement completing keyed records of ``keyed``: those not woken within the
        window, and (``carry``) the ones held back whose window has passed; the others are held back. Nothing
        without a keyed completion. ``carry=False`` for a statement whose commit is the caller's: a rollback
        would lose what it carried for others."""
        queues = set(keyed)
        if not queues:
            return []
        with self._lock:
            now = self.clock()
            before = self._owed
            due = {q for q in (queues | before if carry else queues) if self._due(q, now)}
            for q in due:
                self._sent[q] = now
            # Without carry, a queue already held back for another completion stays held back even when this
            # statement wakes it too (at worst one wake-up more): this one's rollback must not lose that one's.
            self._owed = (before | queues) - (due if carry else due - before)
        return sorted(due)

    def owed(self, *, force: bool = False) -> list[str]:
        """The queues held back whose window has passed (all of them with ``force``), taken: the caller sends
        them now."""
        if not self._owed:  # read without the lock: a notice added meanwhile is seen at the next look
            return []
        with self._lock:
            now = self.clock()
            due = {q for q in self._owed if force or self._due(q, now)}
            for q in due:
                self._sent[q] = now
            self._owed -= due
        return sorted(due)

    def defer(self, queues: Iterable[str]) -> None:
        """``queues`` taken but not sent (no connection): held back again, due a window later."""
        with self._lock:
            self._owed.update(queues)

    def restore(self, queues: Iterable[str]) -> None:
        """``queues`` taken for a statement that failed: held back again, due at once."""
        with self._lock:
            for q in queues:
                self._owed.add(q)
                self._sent.pop(q, None)

    def _due(self, queue: str, now: float) -> bool:
        last = self._sent.get(queue)
        return last is None or now - last >= self.window


def done_results(done: Sequence[Record]) -> str | None:
    """The results of the flow steps among ``done`` (JSON text), in the order of the fenced id arrays, as an
    array literal (a list would be dumped element by element); None when none is a flow step's."""
    if not any(r.flow_run is not None for r in done):
        return None
    return "{" + ",".join(map(_array_element, [r.result for r in sorted_records(done)])) + "}"


def _array_element(text: str | None) -> str:
    # An element of an array literal: quoted, its backslashes and double quotes escaped; NULL without one.
    if text is None:
        return "NULL"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _token_text(tokens: list[Any]) -> dict[Any, str]:
    # A claim's records share its token: format each distinct one once, not once per record.
    return {t: str(t) for t in set(tokens)}


def sorted_records(records: Iterable[Record]) -> list[Record]:
    """``records`` type-checked and sorted by id: the fenced statements find each row's own token (and
    delay) in the arrays by a binary search (width_bucket) over the ids."""
    batch = list(records)
    for r in batch:
        if not isinstance(r, Record):
            raise InvalidArgument(f"expected Record objects, got {type(r).__name__}")
    batch.sort(key=_record_order)
    return batch


def fence(records: Iterable[Record]) -> tuple[list[int], list[Any]]:
    """The (ids, tokens) arrays of a fenced statement, in id order."""
    batch = sorted_records(records)
    return [r.id for r in batch], [r.lease_token for r in batch]


class Claims:
    """Claim and the outcome writes of one database, for one instance."""

    def __init__(self, db: Database, *, key_window: float = 0.0) -> None:
        self.db = db
        self.q = db.q
        self.settings = db.settings
        # Keyed completions' wake-ups: a run's claims hold them back within KEY_NOTIFY_SECONDS (its completer
        # sends the held-back ones); the library's (key_window 0) send every one.
        self.notices = KeyNotices(key_window)
        # Which claim statement the next claim sends: the lean one until a full one's gate says otherwise (a
        # hint only: the lean statement tests its gate itself). Claimer threads share it; a stale read costs
        # at most one extra statement.
        self.lean = True

    # ------------------------------------------------------------------ claim

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str] = (),
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]:
        """Complete ``done`` and claim up to ``size`` records in one statement (retried on a broken
        connection: the fencing makes a repeat harmless). Returns (claimed, completed). With ``floors``,
        each queue's scan starts at its floor, which the claimed records then move up."""
        ticket = floors.ticket(queues) if floors is not None and size else None
        claimed, completed = self.db.with_retry(
            lambda conn: self.claim_on(conn, done, size, queues, unblock, ticket=ticket, announce=announce))
        if floors is not None and ticket is not None:
            floors.advance(ticket, claimed)
        return claimed, completed

    def claim_params(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str] = (),
        *, ticket: Ticket | None = None, announce: bool = False, carry: bool = True,
    ) -> dict[str, Any]:
        """The claim statement's parameters (a fresh lease token under ``"token"``; ``carry``: see
        :meth:`KeyNotices.take`)."""
        s = self.settings
        done_ids, done_tokens = fence(done)
        params: dict[str, Any] = {
            # An array literal, as the id arrays below (psycopg dumps a list element by element).
            "unblock_keys": "{" + ",".join(map(_array_element, unblock)) + "}",
            # Array literals built here: psycopg would dump each element in Python (a UUID dumper call per
            # token); one join is much cheaper on this per-batch path.
            "done_ids": "{" + ",".join(map(str, done_ids)) + "}",
            "done_tokens": "{" + ",".join(map(_token_text(done_tokens).__getitem__, done_tokens)) + "}",
            # Flow steps' results, aligned with done_ids (none without flow records: the statement reads none).
            "done_results": done_results(done),
            "queues": queues,
            "token": uuid.uuid4(),
            "batch": size,
            "instance_id": s.instance_id,
            "lease_seconds": s.lease_seconds,
            "default_key_concurrency": s.key_concurrency,
            "default_block_on_failure": s.block_on_failure,
            "announce": announce,
            **(ticket.params() if ticket is not None else start_params(queues)),
        }
        # Queues to wake (keyed records among those completed; within the window). Taken last: nothing after
        # this can fail before the statement, whose failure gives them back (claim_on).
        nqueues = (self.notices.take([r.queue for r in done if r.ordering_key is not None], carry=carry)
                   if s.notify else [])
        params["channels"] = [channel_for(s.schema, q) for q in nqueues]
        params["nqueues"] = nqueues
        return params

    def claim_on(
        self, conn: Conn, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str] = (),
        *, ticket: Ticket | None = None, announce: bool = False, carry: bool = True,
    ) -> tuple[list[Record], int]:
        params = self.claim_params(done, size, queues, unblock, ticket=ticket, announce=announce, carry=carry)
        # The lean statement while no claimed queue has a control set (its gate, read in the statement itself,
        # says so) and no flow record is among the completed (their settlement is the full statement's). Flow
        # records completed by a claim: the full statement that also takes the children they release
        # (claimflow.sql; the others never pay for taking).
        flows = params["done_results"] is not None
        lean = (self.lean or not size) and not flows
        name = "claim_lean" if lean else "claim_flow" if flows and size else "claim"
        # Binary results: timestamps, UUIDs and integers decode several times faster than from text.
        try:
            rows = self.db.execute_raw(conn, name, params, binary=True).fetchall()
        except BaseException:
            self.notices.restore(params["nqueues"])  # not sent: the next statement or the completer sends them
            raise
        completed = int(rows[0][-3]) if rows else 0
        if size and rows:
            self.lean = bool(rows[0][-1])
            if lean and not self.lean:
                # The gate was shut (a pause or a rate set since): the completion is done, the claim is not.
                # The full statement claims, from the same floors (the lean one read no floor event).
                claimed, _ = self.claim_on(conn, [], size, queues, ticket=ticket, announce=announce)
                return claimed, completed
        claimed = Claimed()
        if rows:
            claimed.rate_wait = rows[0][-2]  # a rate-limited queue or key has no token for that long
        if not rows or rows[0][0] is None:
            return claimed, completed
        new, head, tail = tuple.__new__, (params["token"],), (self.db.shard,)
        if ticket is not None:  # where each queue's floor moves: its first pending record, seen unlocked
            ticket.seen = {r[1]: (r[18], r[19], r[20]) for r in rows if r[18] is not None}
        # The row's columns in the named tuple's order: the token (ours) after the first six, the shard after
        # the thirteenth, then the flow columns, no result yet, and the trace context.
        claimed.extend([new(Record, r[:6] + head + r[6:13] + tail + r[13:18]) for r in rows])
        return claimed, completed

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        """Make each key's earliest pending record claimable (after a claim or a cancel), through the claim
        statement with nothing to claim. Best effort: the maintenance sweep repairs a miss. ``announce``: tell
        every claimer by a floor event (a worker unblocking the keys of records it claimed does not need to:
        its own floors come down to those records)."""
        run(self.unblock_plan(keys, announce=announce))

    def unblock_plan(self, keys: Iterable[str], *, announce: bool = True) -> Plan[None]:
        """:meth:`unblock` as a plan."""
        ordered = sorted(set(keys))
        if not ordered:
            return
        params = self.claim_params([], 0, [], ordered, announce=announce)
        try:
            yield from on(self.db, Stmt(self.q.claim, params, "all", binary=True, raw=True))
        except DatabaseUnavailable as exc:
            log.warning("could not unblock key heads; the sweep will", extra={"error": str(exc)})

    def notify_owed(self, *, force: bool = False) -> None:
        """Send the keyed completions' wake-ups held back whose window has passed (all of them with ``force``:
        the run stops), in one statement. Best effort, never waiting long for a connection: the idle workers'
        poll finds the freed records anyway."""
        queues = self.notices.owed(force=force)
        if not queues:
            return
        params = {"channels": [channel_for(self.settings.schema, q) for q in queues], "nqueues": queues}
        try:
            with self.db.borrow(NOTIFY_BORROW_SECONDS, internal=True) as conn:
                conn.execute(self.q.notify_queues, params)
        except Exception as exc:  # a fault here must not end the completer thread that calls this
            self.notices.defer(queues)  # tried again a window later, not at every turn of the completer's loop
            log.debug("could not send held-back wake-ups", extra={"error": str(exc)[:200]})

    def any_due(self, queues: list[str]) -> bool:
        """Whether any record of ``queues`` is pending and due (claimable or held back by its key)."""
        row = self.db.with_retry(lambda conn: conn.execute(self.q.any_due, {"queues": queues}).fetchone())
        return bool(row and row[0])

    # ------------------------------------------------------------------ outcomes

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int:
        """Fenced completion; returns how many were still held (and are now completed or cancelled)."""
        keys = sorted(set(unblock))
        return self.db.with_retry(lambda conn: self.claim_on(conn, records, 0, [], keys, announce=announce)[1])

    def complete_in(self, conn: Conn, records: Sequence[Record], unblock: Iterable[str] = ()) -> int:
        """Fenced completion of ``records`` on ``conn`` (inside the caller's transaction, if any)."""
        # Its NOTIFY goes at the caller's commit, if any: it carries no wake-up held back for other completions.
        return self.claim_on(conn, records, 0, [], sorted(set(unblock)), carry=False)[1]

    def fail_params(self, records: Iterable[Record], error: BaseException | str, retryable: bool,
                    policy: RetryPolicy | None = None) -> dict[str, Any]:
        """Parameters of the fail statement: the arrays in id order, each record with its own backoff (from
        ``policy``, a flow step's, else the processor's)."""
        batch = sorted_records(records)
        retry = policy or self.settings.retry
        return {
            "ids": [r.id for r in batch],
            "tokens": [r.lease_token for r in batch],
            "delays": [retry.delay_for(r.attempts) for r in batch],
            "retry": retryable,
            "error": format_error(error, ERROR_TEXT_LIMIT),
            "default_block_on_failure": self.settings.block_on_failure,
        }

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        """Fenced failure: back to ``pending`` after its backoff when retryable with attempts left, else
        ``failed`` (``cancelled`` when flagged). Returns (id, status after) of the records still held."""
        if not records:
            return []
        params = self.fail_params(records, error, retryable, policy)
        rows = self.db.with_retry(lambda conn: conn.execute(self.q.fail, params).fetchall())
        return [(int(r[0]), str(r[1])) for r in rows]

    def release(self, records: Sequence[Record], reason: str) -> int:
        """Hand held records back to ``pending`` at once, the attempt not charged."""
        ids, tokens = fence(records)
        if not ids:
            return 0
        params = {"ids": ids, "tokens": tokens, "reason": reason}
        return self.db.with_retry(lambda conn: conn.execute(self.q.release, params).rowcount)

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        """Beat the instance's registry row and extend held leases in one round trip.

        Returns (ids still held, ids whose cancel was requested).
        """
        ids, tokens = fence(records)
        params = {
            "ids": ids,
            "tokens": tokens,
            "lease_seconds": self.settings.lease_seconds,
            "instance_id": self.settings.instance_id,
            "registered": registered,
        }
        rows = self.db.with_retry(lambda conn: conn.execute(self.q.heartbeat, params).fetchall())
        return {int(r[0]) for r in rows}, {int(r[0]) for r in rows if r[1]}
