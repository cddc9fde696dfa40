"""Several databases behind one processor: :class:`ShardedStore` implements :class:`core.backend.Store` over
one :class:`core.store.PostgresStore` per shard (docs/scale-out.md).

Inserts are split by key (core/sharding.py) and each shard checks, inside the insert's transaction, that the
partitions it was given are still its own (a producer with a stale map is refused and routes again);
operations on records go to the records' shards (``Record.shard``); operations on ids and queues go to every
shard; counts and health are summed and reported per shard. A shard that is down fails only what needs it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import psycopg

from core.backend import CountRow, NewRecords
from core.config import Settings
from core.db import Conn
from core.errors import DatabaseUnavailable, QueueFull
from core.floors import Floors
from core.instance import ProcessFacts
from core.payloads import encode_payload
from core.record import AddResult, Record
from core.runstore import PostgresRun
from core.shardhealth import probe_shards
from core.sharding import merge_counts, partition_of, routing_key, split_batch, subset
from core.shardtopology import Topology, rows
from core.store import PostgresStore

log = logging.getLogger("core.shards")
T = TypeVar("T")

REROUTE_SECONDS = 30.0  # how long an insert waits for a partition that is moving


class Rerouted(Exception):
    """A shard refused part of a batch: the map moved on (or the shard is retiring). Routed again."""


class ShardRun(PostgresRun):
    """One shard's part of a run: learns the shard's number when its worker starts (a shard down when the
    run began is numbered when it answers), so every record it claims says where it came from."""

    def __init__(self, *args: Any, resolve: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resolve = resolve

    def check_budget(self) -> None:
        shard = self._resolve()  # DatabaseUnavailable / SchemaNotMigrated: the worker starts again later
        for db in (self.claims_db, self.handler_db, self.service_db):
            if db is not None:
                db.shard = shard
        super().check_budget()


class ShardedStore:
    """The records of several databases (see the module docstring)."""

    def __init__(self, settings: Settings, facts: ProcessFacts, dsns: Sequence[str]) -> None:
        self.settings = settings
        self.facts = facts
        self.stores = [PostgresStore(settings, facts, dsn) for dsn in dsns]
        for store in self.stores:
            store.db.name = "shard"
        self.topology = Topology(self.stores)
        for i, store in enumerate(self.stores):
            store.enqueuer.guard = self._guard(i)
        self._turn = itertools.count()

    @property
    def db(self) -> Any:
        """The first shard's database (its statements and settings are every shard's)."""
        return self.stores[0].db

    # ------------------------------------------------------------------ producing

    def _guard(self, index: int) -> Callable[[Conn, NewRecords], None]:
        def guard(conn: Conn, batch: NewRecords) -> None:
            q, me = self.stores[index].db.q, self.topology.number(index)
            row = conn.execute(q.shard_guard_identity).fetchone()
            if row is None or int(row[0]) != me:
                raise Rerouted(f"database is not shard {me}")
            parts = sorted({partition_of(rk) for k, d in zip(batch.keys, batch.dedupes, strict=True)
                            if (rk := routing_key(k, d)) is not None})
            if not row[1] and any(routing_key(k, d) is None for k, d in zip(batch.keys, batch.dedupes, strict=True)):
                raise Rerouted(f"shard {me} is retiring: it takes no new keyless records")
            if parts:
                rows = conn.execute(q.shard_guard_partitions, {"partitions": parts}).fetchall()
                if len(rows) != len(parts) or any(int(r[1]) != me or r[2] for r in rows):
                    raise Rerouted(f"partitions moved off shard {me} or moving")
        return guard

    def add(self, batch: NewRecords) -> AddResult:
        """Insert a batch: each shard's part atomically, the parts one after another (see the README's
        limits: a failure after the first part leaves the parts already stored; ``stored_ids`` on the
        error says which)."""
        n = len(batch.payloads)
        if n == 0:
            return AddResult()
        limit = self.settings.max_payload_bytes
        for i, p in enumerate(batch.payloads):  # bad input is refused before any shard is written
            encode_payload(i, p, limit)
        with self._queue_limit(batch.queue, n):
            return self._add_routed(batch)

    @contextmanager
    def _queue_limit(self, queue: str, n: int) -> Iterator[None]:
        """A queue's limit holds across the shards, exactly: its producers take turns on the home shard,
        which refuses a batch that the pending records of all shards leave no room for (conservatively:
        records that turn out deduplicated count too)."""
        known = self.topology.known()
        if not known:
            raise DatabaseUnavailable("no shard is reachable")
        home = known[min(known)]
        q = home.db.q
        if home.db.with_retry(lambda c: c.execute(q.shard_queue_limit_value, {"queue": queue}).fetchone()) is None:
            yield  # no limit: no turn to take
            return
        # The turn is held on a connection of its own (not the pool's, which the insert itself draws from);
        # it writes nothing, so how its transaction ends never matters to what the insert stored.
        try:
            conn = psycopg.connect(home.db.dsn, **{**home.db.connection_kwargs(), "autocommit": False})
        except psycopg.OperationalError as exc:
            raise home.db.unavailable(exc) from None
        try:
            row = conn.execute(q.shard_queue_limit_turn, {"queue": queue}).fetchone()
            if row is not None and row[1] is not None:
                limit = int(row[1])
                cap = {"queue": queue, "cap": limit + 1}
                depth = sum(int(rows(store, "pending_depth", cap)[0][0]) for store in self.stores)
                if depth + n > limit:
                    raise QueueFull(queue, limit, depth, n)
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _add_routed(self, batch: NewRecords) -> AddResult:
        n = len(batch.payloads)
        ids: list[int] = [0] * n
        deduplicated: list[int] = []
        todo = list(range(n))
        deadline = time.monotonic() + REROUTE_SECONDS
        refresh = False
        while todo:
            shard_map = self.topology.shard_map(refresh=refresh)
            sub = subset(batch, todo)
            split = split_batch(sub.keys, sub.dedupes, shard_map)
            parts = {shard: [todo[i] for i in idx] for shard, idx in split.parts.items()}
            keyless = [todo[i] for i in split.keyless]
            retry: list[int] = []
            try:
                if keyless:
                    self._add_keyless(batch, keyless, ids, deduplicated)
                for shard in sorted(parts):
                    try:
                        self._add_part(shard, batch, parts[shard], ids, deduplicated)
                    except Rerouted:
                        retry.extend(parts[shard])
            except (DatabaseUnavailable, QueueFull) as exc:
                exc.stored_ids = [i for i in ids if i]  # type: ignore[union-attr]  # what the other shards took
                raise
            todo, refresh = sorted(retry), True
            if todo:
                if time.monotonic() > deadline:
                    error = DatabaseUnavailable(f"{len(todo)} records' partitions stayed in a move for "
                                                f"{REROUTE_SECONDS:g}s")
                    error.stored_ids = [i for i in ids if i]  # type: ignore[attr-defined]
                    raise error
                time.sleep(0.05)
        return AddResult(ids, sorted(deduplicated))

    def _add_part(self, shard: int, batch: NewRecords, idx: list[int], ids: list[int],
                  deduplicated: list[int]) -> None:
        result = self.topology.store_of(shard).add(subset(batch, idx))
        for j, rid in enumerate(result):
            ids[idx[j]] = rid
        deduplicated.extend(idx[j] for j in result.deduplicated)

    def _add_keyless(self, batch: NewRecords, idx: list[int], ids: list[int], deduplicated: list[int]) -> None:
        """The keyless records of a call go to one shard, each call's to the next in turn (so a call's
        keyless part is atomic); a shard that is full, down or retiring passes them on to the next."""
        known = self.topology.known()
        order = sorted(known)
        if not order:
            raise DatabaseUnavailable("no shard is reachable")
        start = next(self._turn) % len(order)
        candidates = order[start:] + order[:start]
        last: Exception | None = None
        for shard in candidates:
            try:
                self._add_part(shard, batch, idx, ids, deduplicated)
                return
            except DatabaseUnavailable as exc:
                # Passed on only when nothing can have been stored there: no connection was had, or the
                # server rolled it back. A connection lost around the commit leaves that unknown.
                if exc.retryable and not exc.rolled_back:
                    raise
                last = exc
            except (QueueFull, Rerouted) as exc:
                last = exc
        if isinstance(last, Rerouted) or last is None:
            raise DatabaseUnavailable(f"no shard takes new keyless records ({last})")
        raise last

    # ------------------------------------------------------------------ records: to their shard

    def _by_shard(self, records: Iterable[Record]) -> dict[int, list[Record]]:
        out: dict[int, list[Record]] = {}
        for r in records:
            out.setdefault(r.shard, []).append(r)
        return out

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]:
        """Complete ``done`` on their shards, then claim up to ``size`` from the shards in turn (library use;
        ``run()`` gives every shard claimers of its own)."""
        completed = sum(self.topology.store_of(s).complete(rs, (), announce) for s, rs in self._by_shard(done).items())
        if unblock:
            self.unblock(unblock, announce=announce)
        known = self.topology.known()
        claimed: list[Record] = []
        if size <= 0 or not known:
            return claimed, completed
        # Each shard's first positions in claim order are read (not locked), the first ``size`` of them all
        # say how many each shard gives, and each shard claims that many: the order of one database, with
        # no record claimed and handed back (key rules may make a shard give fewer).
        heads: list[tuple[tuple[int, Any, int], int]] = []
        for shard, store in sorted(known.items()):
            try:
                peeked = rows(store, "shard_peek", {"queues": queues, "n": size})
            except DatabaseUnavailable as exc:  # a shard down costs only its share
                log.warning("shard unreachable for a claim", extra={"shard": shard, "error": str(exc)[:200]})
                continue
            heads.extend(((int(r[0]), r[1], int(r[2])), shard) for r in peeked)
        heads.sort(key=lambda h: h[0])
        share: dict[int, int] = {}
        for _, shard in heads[:size]:
            share[shard] = share.get(shard, 0) + 1
        for shard, n in sorted(share.items()):
            try:
                got, _ = known[shard].claim([], n, queues, ())
            except DatabaseUnavailable as exc:
                log.warning("shard unreachable for a claim", extra={"shard": shard, "error": str(exc)[:200]})
                continue
            claimed.extend(got)
        claimed.sort(key=lambda r: (-r.priority, r.run_at, r.id))
        return claimed, completed

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        shard_map = self.topology.shard_map()
        by: dict[int, list[str]] = {}
        for k in keys:
            by.setdefault(shard_map.owner[partition_of(k)], []).append(k)
        for shard, ks in by.items():
            self.topology.store_of(shard).unblock(ks, announce=announce)

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int:
        total = sum(self.topology.store_of(s).complete(rs, (), announce) for s, rs in self._by_shard(records).items())
        if unblock:
            self.unblock(unblock, announce=announce)
        return total

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for shard, rs in self._by_shard(records).items():
            out.extend(self.topology.store_of(shard).fail(rs, error, retryable))
        return out

    def release(self, records: Sequence[Record], reason: str) -> int:
        return sum(self.topology.store_of(s).release(rs, reason) for s, rs in self._by_shard(records).items())

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        held: set[int] = set()
        cancel: set[int] = set()
        for shard, rs in self._by_shard(records).items():
            h, c = self.topology.store_of(shard).heartbeat(rs, registered=registered)
            held |= h
            cancel |= c
        return held, cancel

    def for_run(self, *, claimers: int, handler_slots: int, listen_to: Sequence[str]) -> list[PostgresRun]:
        """One run per shard (``run()`` works each with claimers and handler threads of its own)."""
        listen = [] if not self.settings.notify or self.db.transaction_pooling else list(listen_to)
        return [ShardRun(self.settings, self.facts, s.db.dsn, claimers=claimers, handler_slots=handler_slots,
                         listen_to=listen, resolve=partial(self.topology.number, i))
                for i, s in enumerate(self.stores)]

    # ------------------------------------------------------------------ ids and queues: every shard

    def _each(self, op: Callable[[PostgresStore], T], *, tolerate: bool = False) -> list[T]:
        """``op`` on every shard; with ``tolerate``, shards that are down are skipped (unless all are)."""
        out: list[T] = []
        errors: list[DatabaseUnavailable] = []
        for store in self.stores:
            try:
                out.append(op(store))
            except DatabaseUnavailable as exc:
                if not tolerate:
                    raise
                errors.append(exc)
        if errors and not out:
            raise errors[0]
        return out

    def recover(self) -> int:
        return sum(self._each(lambda s: s.recover(), tolerate=True))

    def retain(self) -> int:
        return sum(self._each(lambda s: s.retain(), tolerate=True))

    def register(self, metadata: dict[str, Any] | None) -> None:
        self._each(lambda s: s.register(metadata), tolerate=True)

    def set_instance_status(self, status: str) -> None:
        self._each(lambda s: s.set_instance_status(status), tolerate=True)

    def cancel(self, ids: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for part in self._each(lambda s: s.cancel(ids)):
            out.update(part)
        return out

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> int:
        return sum(self._each(lambda s: s.retry_failed(ids, queue, pattern, batch)))

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> int:
        return sum(self._each(lambda s: s.purge(older_than, batch, max_batches)))

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> None:
        self._each(lambda s: s.set_key_concurrency(pattern, n, block_on_failure))

    def set_queue_limit(self, queue: str, n: int | None) -> None:
        """Exact across the shards (see :meth:`_queue_limit`); every shard stores it."""
        self._each(lambda s: s.set_queue_limit(queue, n))

    # ------------------------------------------------------------------ observing

    def counts(self, queue: str | None) -> list[CountRow]:
        return merge_counts(self._each(lambda s: s.counts(queue), tolerate=True))

    def shard_counts(self, queue: str | None) -> dict[str, list[CountRow]]:
        out: dict[str, list[CountRow]] = {}
        for i, store in enumerate(self.stores):
            try:
                out[str(self.topology.number(i))] = store.counts(queue)
            except DatabaseUnavailable:
                continue
        return out

    def list_instances(self, include_stopped: bool) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for i, store in enumerate(self.stores):
            try:
                rows, shard = store.list_instances(include_stopped), self.topology.number(i)
            except DatabaseUnavailable:
                continue
            for row in rows:
                entry = seen.setdefault(row["instance_id"], {**row, "shards": []})
                entry["shards"].append(shard)
        return list(seen.values())

    def probe(self, report: dict[str, Any], timeout: float) -> list[CountRow] | None:
        return probe_shards(self.stores, self.topology, report, timeout)

    def ready(self) -> tuple[bool, str | None]:
        answers = [s.ready() for s in self.stores]
        if any(ok for ok, _ in answers):
            return True, None
        return False, "; ".join(r or "" for _, r in answers)

    def horizon(self) -> dict[str, Any]:
        parts = self._each(lambda s: s.horizon(), tolerate=True)
        holders = [p["holder"] for p in parts if p.get("holder")]
        return {"holder": max(holders, key=lambda h: h["age_seconds"]) if holders else None, "shards": parts}

    def close(self) -> None:
        for store in self.stores:
            store.close()


