"""Inserting records: one statement (or one COPY) per batch, ordering-key blocking, dedupe, queue limits."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.backend import NewRecords
from core.db import Conn, Database
from core.errors import DatabaseUnavailable, QueueFull
from core.floors import must_announce
from core.payloads import copy_text, encode_payload
from core.queries import channel_for
from core.record import AddResult

# How far apart (in ids) two records of a key must be for the later one to be inserted claimable rather than
# blocked. A blocked record costs one more write when its key's head moves on (the unblock), which is most of
# what per-key ordering costs. Records of one batch share their priority and run_at, so claims reach them in
# id order; a record of an earlier batch counts when claims reach it first too (key_heads). By the time a
# claim reaches a record this far behind the previous one of its key, that one has been claimed and, unless
# its handler is slower than this many records, finished. If not, the claim rejects the record (it is never
# started out of order) and reads it again on its next statement, as it reads any key head's successor
# while the head runs. A failure that makes the key wait blocks its later records again (fail statement).
KEY_GAP = 1000

# Records per COPY write: large enough to amortise the call, small enough to overlap with the server.
COPY_CHUNK = 1000


def inserted_blocked(
    keys: Sequence[str | None], prior: Mapping[str, int | None], first_id: int = 0, gap: int = KEY_GAP
) -> list[bool]:
    """Which records of a batch are inserted blocked (``key_blocked``): a keyed record with an earlier pending
    record of its key, unless that one is claimable, reached by claims first, and ``gap`` or more ids earlier.

    ``prior``: the keys that already have pending records, each with the id of its latest one when a new
    record may follow it claimable, else None. ``first_id``: a lower bound of the batch's first id (the
    later ones follow it in order).
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


class Enqueuer:
    """``add_records`` against one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q
        self._sequence: str | None = None  # the id sequence, looked up on the first COPY
        # Run first in each insert's transaction (a shard checks that the batch is still its own: core/sharded.py)
        self.guard: Callable[[Conn, NewRecords], None] | None = None

    def add(self, batch: NewRecords) -> AddResult:
        """Insert ``batch`` atomically: ids in input order; ``QueueFull`` rolls the whole batch back."""
        n = len(batch.payloads)
        if n == 0:
            return AddResult()
        has_dedupe = any(d is not None for d in batch.dedupes)
        use_copy = n >= self.db.settings.copy_threshold and not has_dedupe
        # COPY encodes as it streams (the server parses one chunk while the next is encoded); an invalid
        # payload then aborts the COPY and rolls the transaction back, so nothing is written either way.
        limit = self.db.settings.max_payload_bytes
        texts = [] if use_copy else [encode_payload(i, p, limit) for i, p in enumerate(batch.payloads)]
        # A broken connection is not retried (during COMMIT it is unknown whether the batch landed); a
        # deadlock or serialization failure rolled everything back, so that is retried.
        for attempt in range(5):
            try:
                with self.db.borrow(internal=True) as conn:
                    return self._add_on(conn, batch, texts, use_copy, has_dedupe)
            except DatabaseUnavailable as exc:
                # A producer's key-head locks can deadlock with a claim unblocking those heads; the server
                # rolled the whole batch back, so it is simply run again.
                if not exc.rolled_back or attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1) * (1 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _add_on(self, conn: Conn, batch: NewRecords, texts: list[str], use_copy: bool, has_dedupe: bool) -> AddResult:
        q, n, queue = self.q, len(batch.payloads), batch.queue
        key_set = sorted({k for k in batch.keys if k is not None})
        started = time.monotonic()
        # Records claims may have passed already are announced to them (core/floors.py).
        announce = must_announce(batch.priority, batch.run_at, 0.0)
        with conn.transaction():
            if self.guard is not None:
                self.guard(conn, batch)
            blocked = [False] * n
            if has_dedupe:
                conn.execute(q.lock_dedupe_keys, {"queue": queue, "keys": batch.dedupes})
            if key_set:
                conn.execute(q.lock_ordering_keys, {"keys": key_set})
                # A record behind an earlier pending one of its key is inserted blocked: claims skip it
                # until the key's head moves on (the claim statement's unblock), unless the batch spreads
                # the key's records out (see KEY_GAP).
                heads = conn.execute(q.key_heads, {
                    "keys": key_set, "queue": queue, "priority": batch.priority, "run_at": batch.run_at}).fetchall()
                prior = {k: (last_id if follows else None) for k, has, last_id, follows, _ in heads if has}
                blocked = inserted_blocked(batch.keys, prior, int(heads[0][4] or 0) + 1)
            limit_row = conn.execute(q.lock_queue_limit, {"queue": queue}).fetchone()
            if use_copy:
                result = self._insert_copy(conn, batch, blocked)
            else:
                result = self._insert_statement(conn, batch, texts, blocked, announce)
            inserted = n - len(result.deduplicated)
            if inserted and ((use_copy and announce) or (
                    not announce and must_announce(batch.priority, batch.run_at, time.monotonic() - started))):
                conn.execute(q.announce_floor, {"queue": queue, "priority": batch.priority, "run_at": batch.run_at,
                                                "id": min(result)})
            if limit_row is not None and inserted:
                limit = int(limit_row[0])
                depth_row = conn.execute(q.pending_depth, {"queue": queue, "cap": limit + inserted + 1}).fetchone()
                depth_after = int(depth_row[0]) if depth_row else 0
                if depth_after > limit:
                    raise QueueFull(queue, limit, depth_after - inserted, inserted)
            if self.db.settings.notify and inserted:
                conn.execute(q.notify, {"channel": channel_for(self.db.settings.schema, queue), "queue": queue})
        return result

    def _insert_statement(
        self, conn: Conn, batch: NewRecords, texts: list[str], blocked: list[bool], announce: bool
    ) -> AddResult:
        rows = conn.execute(
            self.q.insert_records,
            {
                "queue": batch.queue,
                "payloads": texts,
                "priority": batch.priority,
                "run_at": batch.run_at,
                "max_attempts": batch.max_attempts,
                "keys": batch.keys,
                "dedupes": batch.dedupes,
                "dedupe_while": batch.dedupe_while,
                "blocked": blocked,
                "announce": announce,
            },
        ).fetchall()
        n = len(texts)
        if len(rows) == n:
            # Ids are assigned in input order (INSERT ... SELECT ... ORDER BY ordinality).
            return AddResult(sorted(int(r[0]) for r in rows))
        return self._with_duplicates(conn, batch, rows)

    def _with_duplicates(self, conn: Conn, batch: NewRecords, rows: list[Any]) -> AddResult:
        """Some inputs were deduplicated: rebuild the input order from the dedupe keys."""
        new_by_key: dict[str, int] = {}
        keyless_ids = iter(sorted(int(r[0]) for r in rows if r[1] is None))
        for rid, dkey in rows:
            if dkey is not None:
                new_by_key[dkey] = int(rid)
        missing = {d for d in batch.dedupes if d is not None and d not in new_by_key}
        existing: dict[str, int] = {}
        if missing:
            for dkey, rid in conn.execute(
                self.q.existing_dedupe, {"queue": batch.queue, "dedupes": sorted(missing)}
            ).fetchall():
                existing[dkey] = int(rid)
        ids: list[int] = []
        deduplicated: list[int] = []
        seen: set[str] = set()
        for i, dkey in enumerate(batch.dedupes):
            if dkey is None:
                ids.append(next(keyless_ids))
            elif dkey in new_by_key and dkey not in seen:
                seen.add(dkey)
                ids.append(new_by_key[dkey])
            else:
                deduplicated.append(i)
                ids.append(new_by_key.get(dkey) or existing.get(dkey, 0))
        return AddResult(ids, deduplicated)

    def _insert_copy(self, conn: Conn, batch: NewRecords, blocked: list[bool]) -> AddResult:
        items, n = batch.payloads, len(batch.payloads)
        limit = self.db.settings.max_payload_bytes
        if self._sequence is None:
            row = conn.execute(self.q.records_sequence, {"table": self.q.records_table}).fetchone()
            self._sequence = str(row[0]) if row else None
        # Binary: the ids arrive as integers, no text to parse per id.
        ids: list[int] = [r[0] for r in conn.execute(
            self.q.allocate_ids, {"seq": self._sequence, "n": n}, binary=True).fetchall()]
        # Rows are formatted here as COPY text, a chunk per write: much cheaper than a write_row per record,
        # and the server parses one chunk while the next is encoded. JSON from the encoder has no raw control
        # characters, so only backslashes need escaping. run_at left out takes the column default, now().
        constant = "\t".join(("", copy_text(batch.queue), str(batch.priority), str(batch.max_attempts), ""))
        if batch.run_at is not None:
            constant = f"{constant}{batch.run_at.isoformat()}\t"
        stmt = self.q.copy_records if batch.run_at is None else self.q.copy_records_at
        null = "\\N\tf"
        key_texts = [null if k is None else copy_text(k) + ("\tt" if b else "\tf")
                     for k, b in zip(batch.keys, blocked, strict=True)]
        with conn.cursor().copy(stmt) as copy:
            for start in range(0, n, COPY_CHUNK):
                lines = []
                for i in range(start, min(n, start + COPY_CHUNK)):
                    text = encode_payload(i, items[i], limit).replace("\\", "\\\\")  # COPY doubles a backslash
                    lines.append(f"{ids[i]}{constant}{key_texts[i]}\t{text}\n")
                copy.write("".join(lines))
        return AddResult(ids)
