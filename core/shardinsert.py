"""Inserting over shards (:class:`core.sharded.ShardedStore`'s producing side): a batch split by key, each part
on its shard in one call of the enqueue function, which checks inside the insert's transaction that the
partitions it was routed by are still that shard's (a producer with a stale map is refused and routes again);
keyless records to the shards in turn; a limited queue's producers taking turns on its home shard.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from core.appconn import AppConn
from core.backend import NewRecords
from core.config import Settings
from core.enqueue import Refused
from core.errors import DatabaseUnavailable, QueueFull
from core.payloads import encode_payload
from core.plans import Own, Plan, Sleep, Stmt, on
from core.record import AddResult
from core.sharding import split_batch, subset
from core.shardtopology import Topology
from core.store import PostgresStore, wrong_shard

REROUTE_SECONDS = 30.0  # how long an insert waits for a partition that is moving


class ShardedInserts:
    def __init__(self, settings: Settings, stores: Sequence[PostgresStore], topology: Topology) -> None:
        self.settings = settings
        self.stores = list(stores)
        self.topology = topology
        self._turn = itertools.count()

    def add(self, batch: NewRecords, conn: AppConn | None = None) -> Plan[AddResult]:
        n = len(batch.payloads)
        if n == 0:
            return AddResult()
        limit = self.settings.max_payload_bytes
        for i, p in enumerate(batch.payloads):  # bad input is refused before any shard is written
            encode_payload(i, p, limit)
        if conn is not None:
            return (yield from self.limited(batch.queue, n, lambda: self._add_on(conn, batch)))
        return (yield from self.limited(batch.queue, n, lambda: self._add_routed(batch)))

    def _add_on(self, conn: AppConn, batch: NewRecords) -> Plan[AddResult]:
        """On an application's connection to one shard: its keys must be that shard's (the enqueue function
        checks, and names the right shard); its keyless records stay there."""
        try:
            return (yield from self.stores[0].enqueuer.add(batch, conn))
        except Refused as exc:
            raise wrong_shard(exc) from None

    def limited(self, queue: str, n: int, body: Callable[[], Plan[AddResult]]) -> Plan[AddResult]:
        """``body`` within the queue's limit across the shards, exactly: its producers take turns on its home
        shard, which refuses a batch that the pending records of all shards leave no room for (conservatively:
        records that turn out deduplicated count too). On an application's connection the turn ends with the
        call, before that transaction commits: its records are counted by the next producers only then."""
        known = yield from self.topology.known_plan()
        if not known:
            raise DatabaseUnavailable("no shard is reachable")
        home = known[min(known)]
        q = home.db.q
        if (yield from on(home.db, Stmt(q.shard_queue_limit_value, {"queue": queue}, "one"))) is None:
            return (yield from body())  # no limit: no turn to take

        def turn() -> Plan[AddResult]:
            # The turn is held on a connection of its own (not the pool's, which the insert itself draws
            # from); it writes nothing, so how its transaction ends never matters to what the insert stored.
            row = yield Stmt(q.shard_queue_limit_turn, {"queue": queue}, "one")
            if row is not None and row[1] is not None:
                limit = int(row[1])
                depth = 0
                for store in self.stores:
                    got = yield from on(store.db, Stmt(q.pending_depth, {"queue": queue, "cap": limit + 1}, "one"))
                    depth += int(got[0])
                if depth + n > limit:
                    raise QueueFull(queue, limit, depth, n)
            return (yield from body())

        added: AddResult = yield Own(home.db, turn)
        return added

    def _add_routed(self, batch: NewRecords) -> Plan[AddResult]:
        n = len(batch.payloads)
        ids: list[int] = [0] * n
        deduplicated: list[int] = []
        todo = list(range(n))
        deadline = time.monotonic() + REROUTE_SECONDS
        refresh = False
        while todo:
            shard_map = yield from self.topology.shard_map_plan(refresh=refresh)
            sub = subset(batch, todo)
            split = split_batch(sub.keys, sub.dedupes, shard_map)
            parts = {shard: [todo[i] for i in idx] for shard, idx in split.parts.items()}
            keyless = [todo[i] for i in split.keyless]
            retry: list[int] = []
            try:
                if keyless:
                    yield from self._add_keyless(batch, keyless, ids, deduplicated)
                for shard in sorted(parts):
                    try:
                        yield from self._add_part(shard, batch, parts[shard], ids, deduplicated)
                    except Refused:
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
                yield Sleep(0.05)
        return AddResult(ids, sorted(deduplicated))

    def _add_part(self, shard: int, batch: NewRecords, idx: list[int], ids: list[int],
                  deduplicated: list[int]) -> Plan[None]:
        store = yield from self.topology.store_of_plan(shard)
        result = yield from store.enqueuer.add(subset(batch, idx), expect_shard=shard)
        for j, rid in enumerate(result):
            ids[idx[j]] = rid
        deduplicated.extend(idx[j] for j in result.deduplicated)

    def _add_keyless(self, batch: NewRecords, idx: list[int], ids: list[int], deduplicated: list[int]) -> Plan[None]:
        """The keyless records of a call go to one shard, each call's to the next in turn (so a call's
        keyless part is atomic); a shard that is full, down or retiring passes them on to the next."""
        known = yield from self.topology.known_plan()
        order = sorted(known)
        if not order:
            raise DatabaseUnavailable("no shard is reachable")
        start = next(self._turn) % len(order)
        candidates = order[start:] + order[:start]
        last: Exception | None = None
        for shard in candidates:
            try:
                yield from self._add_part(shard, batch, idx, ids, deduplicated)
                return
            except DatabaseUnavailable as exc:
                # Passed on only when nothing can have been stored there: no connection was had, or the
                # server rolled it back. A connection lost around the commit leaves that unknown.
                if exc.retryable and not exc.rolled_back:
                    raise
                last = exc
            except (QueueFull, Refused) as exc:
                last = exc
        if isinstance(last, Refused) or last is None:
            raise DatabaseUnavailable(f"no shard takes new keyless records ({last})")
        raise last
