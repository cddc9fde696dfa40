"""Inserting records: one call of the enqueue function (``dp_add_records``, migration 0008) per batch, or a
COPY between its two halves for a large one; on the processor's pool or on an application's connection.

Everything ``add_records`` guarantees is decided in the database, in the inserting transaction: ids in input
order, per-key order (producers of a key take turns, so id order is commit order within a key; records
close behind a pending one of their key are inserted blocked, see ``KEY_GAP``), dedupe keys (a key held by a
transaction still open makes the next producer wait, then either find it taken or take it), queue limits
(exact: producers of a limited queue take turns on its row), the announcement to the claimers whose floors
may have passed the batch (core/floors.py), and the NOTIFY, which the server delivers at the commit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from core.appconn import AppConn
from core.backend import NewRecords
from core.db import Database
from core.errors import DatabaseUnavailable, QueueFull
from core.payloads import copy_text, encode_payload
from core.plans import Copy, Plan, Sleep, Stmt, on, transaction, using
from core.record import AddResult

# How far apart (in ids) two records of a key must be for the later one to be inserted claimable rather than
# blocked. A blocked record costs one more write when its key's head moves on (the unblock), which is most of
# what per-key ordering costs. Records of one batch share their priority and run_at, so claims reach them in
# id order; a record of an earlier batch counts when claims reach it first too (the key's last pending
# record). By the time a claim reaches a record this far behind the previous one of its key, that one has
# been claimed and, unless its handler is slower than this many records, finished. If not, the claim rejects
# the record (it is never started out of order) and reads it again on its next statement, as it reads any
# key head's successor while the head runs. A failure that makes the key wait blocks its later records again
# (fail statement). The rule itself runs in SQL (dp_enqueue_prepare); inserted_blocked is its reference.
KEY_GAP = 1000

# Records per COPY write: large enough to amortise the call, small enough to overlap with the server.
COPY_CHUNK = 1000


class Refused(Exception):
    """The database refused the batch without writing anything: not the shard expected, a key of another
    shard (``owner``), a partition moving, a retiring shard and keyless records (``status``)."""

    def __init__(self, status: str, owner: int | None) -> None:
        self.status = status
        self.owner = owner
        super().__init__(f"{status} (shard {owner})")


def inserted_blocked(
    keys: Sequence[str | None], prior: Mapping[str, int | None], first_id: int = 0, gap: int = KEY_GAP
) -> list[bool]:
    """The reference of ``dp_enqueue_prepare``'s rule: which records of a batch are inserted blocked. A keyed
    record with an earlier pending record of its key is, unless that one is claimable, reached by claims first,
    and ``gap`` or more ids earlier; a record blocked blocks every later one of its key.

    ``prior``: the keys that already have pending records, each with the id of its latest one when a new
    record may follow it claimable, else None. ``first_id``: a lower bound of the batch's first id.
    """
    blocked = [False] * len(keys)
    stuck = {k for k, last_id in prior.items() if last_id is None}  # every further record of these waits
    last = {k: last_id for k, last_id in prior.items() if last_id is not None}
    for i, k in enumerate(keys):
        if k is None:
            continue
        rid = first_id + i
        if k in stuck or (k in last and rid - last[k] < gap):
            blocked[i] = True
            stuck.add(k)
        last[k] = rid
    return blocked


def _column(values: list[str | None]) -> list[str | None] | None:
    """A per-record key column, or None when no record has one (less to send and to unnest)."""
    return values if any(v is not None for v in values) else None


class Enqueuer:
    """``add_records`` against one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q
        self._sequence: str | None = None  # the id sequence, looked up on the first COPY

    def add(self, batch: NewRecords, conn: AppConn | None = None, *,
            expect_shard: int | None = None) -> Plan[AddResult]:
        """Insert ``batch`` atomically (on ``conn``, inside its transaction): ids in input order.

        Raises ``QueueFull`` (nothing written; on ``conn`` its transaction stays usable) and :class:`Refused`
        (a shard's guard: nothing written). ``expect_shard``: the shard number this database must be.
        """
        n = len(batch.payloads)
        if n == 0:
            return AddResult()
        use_copy = n >= self.db.settings.copy_threshold and not any(d is not None for d in batch.dedupes)
        limit = self.db.settings.max_payload_bytes
        # On the pool, COPY encodes as it streams (the server parses one chunk while the next is encoded), and
        # an invalid payload aborts our own transaction. On an application's connection everything is encoded
        # first: nothing of ours may fail in its transaction half way.
        texts = [] if use_copy and conn is None else [encode_payload(i, p, limit) for i, p in enumerate(batch.payloads)]
        if conn is not None:
            if use_copy:
                return (yield from using(conn, self._copy(batch, texts, expect_shard, undo=True)))
            return (yield from using(conn, self._call(batch, texts, expect_shard, own=False)))
        # A broken connection is not retried (during the commit it is unknown whether the batch landed); a
        # deadlock or serialization failure rolled everything back, so that is run again.
        for attempt in range(5):
            try:
                if use_copy:
                    return (yield from on(self.db, lambda: self._in_transaction(batch, expect_shard), attempts=1))
                # autocommit: one statement, one transaction
                return (yield from on(self.db, lambda: self._call(batch, texts, expect_shard), attempts=1))
            except DatabaseUnavailable as exc:
                # A producer's key-head locks can deadlock with a claim unblocking those heads; the server
                # rolled the whole batch back, so it is simply run again.
                if not exc.rolled_back or attempt == 4:
                    raise
                yield Sleep(0.01 * (attempt + 1) * (1 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _params(self, batch: NewRecords, expect_shard: int | None, own: bool) -> dict[str, Any]:
        # own: our own short transaction (the key heads may be locked until its commit; see the SQL)
        return {"queue": batch.queue, "priority": batch.priority, "run_at": batch.run_at,
                "keys": _column(batch.keys), "dedupes": _column(batch.dedupes), "expect_shard": expect_shard,
                "key_gap": KEY_GAP, "own": own}

    def _call(self, batch: NewRecords, texts: list[str], expect_shard: int | None, *,
              own: bool = True) -> Plan[AddResult]:
        if len(texts) == 1 and expect_shard is None and batch.keys[0] is None and batch.dedupes[0] is None:
            # The commonest call, one record without keys: dp_add_one (no arrays to send and to unnest, and in
            # an application's transaction its announcement is decided at the commit).
            one = {"queue": batch.queue, "payload": texts[0], "priority": batch.priority, "run_at": batch.run_at,
                   "max_attempts": batch.max_attempts, "notify": self.db.settings.notify, "own": own,
                   "trace": batch.trace}
            status, rid, queue_limit, depth = yield Stmt(self.q.add_one, one, "one")
            if status == "ok":
                return AddResult([rid], [])
            if status == "full":
                raise QueueFull(batch.queue, int(queue_limit), int(depth), 1)
            # "general": this database is a shard; dp_add_records guards its records
        params = {**self._params(batch, expect_shard, own), "payloads": texts, "max_attempts": batch.max_attempts,
                  "dedupe_while": batch.dedupe_while, "notify": self.db.settings.notify, "trace": batch.trace}
        row = yield Stmt(self.q.add_records, params, "one", binary=True)
        status, ids, deduplicated, owner, queue_limit, depth, adding = row
        if status == "full":
            raise QueueFull(batch.queue, int(queue_limit), int(depth), int(adding))
        if status != "ok":
            raise Refused(str(status), owner)
        return AddResult(ids, deduplicated)

    def _in_transaction(self, batch: NewRecords, expect_shard: int | None) -> Plan[AddResult]:
        return (yield from transaction(self._copy(batch, None, expect_shard, undo=False)))

    def _copy(self, batch: NewRecords, texts: list[str] | None, expect_shard: int | None, *,
              undo: bool) -> Plan[AddResult]:
        """prepare, COPY, finish. ``undo``: over the queue's limit, finish deletes the batch again (an
        application's transaction stays usable); otherwise QueueFull rolls our own transaction back."""
        q, n = self.q, len(batch.payloads)
        own = not undo  # undo: an application's transaction
        status, owner, blocked, queue_limit = yield Stmt(q.enqueue_prepare, self._params(batch, expect_shard, own),
                                                         "one")
        if status != "ok":
            raise Refused(str(status), owner)
        if self._sequence is None:
            row = yield Stmt(q.records_sequence, {"table": q.records_table}, "one")
            self._sequence = str(row[0])
        # Binary: the ids arrive as integers, no text to parse per id. Taken after the key locks: id order is
        # commit order within a key.
        (ids,) = yield Stmt(q.allocate_ids, {"seq": self._sequence, "n": n}, "one", binary=True)
        # The payloads first (an invalid one aborts before any record row is sent), then the records without.
        yield Copy(q.copy_payloads, self._payload_chunks(batch, texts, ids))
        stmt = q.copy_records if batch.run_at is None else q.copy_records_at
        yield Copy(stmt, self._copy_chunks(batch, ids, blocked or [False] * n))
        # Without a limit, dp_enqueue_finish only asks whether the batch is empty: one id, not a 10,000-id array
        # to format and parse (with one, it counts the batch and may delete it again).
        status, depth = yield Stmt(q.enqueue_finish, {
            "queue": batch.queue, "priority": batch.priority, "run_at": batch.run_at,
            "ids": ids if queue_limit is not None else ids[:1],
            "limit": queue_limit, "notify": self.db.settings.notify, "undo": undo}, "one")
        if status == "full":
            raise QueueFull(batch.queue, int(queue_limit), int(depth), n)
        if not own and blocked and any(blocked):
            yield Stmt(q.enqueue_key_checks, {"queue": batch.queue, "keys": batch.keys, "blocked": blocked}, "none")
        return AddResult(ids)

    def _payload_chunks(self, batch: NewRecords, texts: list[str] | None, ids: list[int]) -> Iterator[str]:
        # Rows are formatted here as COPY text, a chunk per write: much cheaper than a write_row per record,
        # and the server parses one chunk while the next is encoded. JSON from the encoder has no raw control
        # characters, so only backslashes need escaping.
        items, n = batch.payloads, len(batch.payloads)
        limit = self.db.settings.max_payload_bytes
        for start in range(0, n, COPY_CHUNK):
            lines = []
            for i in range(start, min(n, start + COPY_CHUNK)):
                text = texts[i] if texts is not None else encode_payload(i, items[i], limit)
                lines.append(f"{ids[i]}\t{text.replace(chr(92), chr(92) * 2)}\n")
            yield "".join(lines)

    def _copy_chunks(self, batch: NewRecords, ids: list[int], blocked: list[bool]) -> Iterator[str]:
        # The records' rows, as _payload_chunks formats its. run_at left out takes the column default, now().
        # The trace context is the batch's (core/tracing.py), the same on every row.
        n = len(batch.payloads)
        constant = "\t".join(("", copy_text(batch.queue), str(batch.priority), str(batch.max_attempts), ""))
        if batch.run_at is not None:
            constant = f"{constant}{batch.run_at.isoformat()}\t"
        constant += ("\\N" if batch.trace is None else copy_text(batch.trace)) + "\t"
        null = "\\N\tf"
        key_texts = [null if k is None else copy_text(k) + ("\tt" if b else "\tf")
                     for k, b in zip(batch.keys, blocked, strict=True)]
        for start in range(0, n, COPY_CHUNK):
            yield "".join(f"{ids[i]}{constant}{key_texts[i]}\n" for i in range(start, min(n, start + COPY_CHUNK)))
