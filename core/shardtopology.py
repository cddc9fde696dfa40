"""The shards of a sharded processor: each database's number (``shard_identity``), the partition map copies,
and setting a database up as a shard (numbered, ids strided, the map copied). See docs/scale-out.md."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from core.errors import ConfigurationError, DatabaseUnavailable, SchemaNotMigrated
from core.plans import Plan, Stmt, on, run
from core.sharding import MAX_SHARDS, PARTITIONS, ShardMap
from core.store import PostgresStore

log = logging.getLogger("core.shards")


class Topology:
    """The shard stores, their numbers once known, and the partition map (re-read when a shard says the
    map moved on)."""

    def __init__(self, stores: Sequence[PostgresStore]) -> None:
        if len(stores) > MAX_SHARDS:
            raise ConfigurationError(f"at most {MAX_SHARDS} shards, got {len(stores)}")
        self.stores = list(stores)
        self._numbers: dict[int, int] = {}  # list index -> shard number
        self._map: ShardMap | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ numbers

    def number(self, index: int) -> int:
        """The shard number of ``stores[index]`` (read once from its database)."""
        return run(self.number_plan(index))

    def number_plan(self, index: int) -> Plan[int]:
        n = self._numbers.get(index)
        if n is None:
            store = self.stores[index]
            found = yield from rows_plan(store, "shard_identity")
            row = found[0] if found else None
            if row is None:
                raise SchemaNotMigrated(f"database {store.db.target()} is not set up as a shard yet: run migrate()")
            n = self._numbers[index] = int(row[0])
            store.db.shard = n
        return n

    def store_of(self, shard_no: int) -> PostgresStore:
        return run(self.store_of_plan(shard_no))

    def store_of_plan(self, shard_no: int) -> Plan[PostgresStore]:
        for i in range(len(self.stores)):
            try:
                if (yield from self.number_plan(i)) == shard_no:
                    return self.stores[i]
            except (DatabaseUnavailable, SchemaNotMigrated):
                continue
        raise DatabaseUnavailable(f"shard {shard_no} is not reachable (or not configured)")

    def known(self) -> dict[int, PostgresStore]:
        """{shard number: store} of every shard whose number could be read (a shard down since the start
        is left out until it answers)."""
        return run(self.known_plan())

    def known_plan(self) -> Plan[dict[int, PostgresStore]]:
        out = {}
        for i, store in enumerate(self.stores):
            try:
                out[(yield from self.number_plan(i))] = store
            except (DatabaseUnavailable, SchemaNotMigrated):
                continue
        return out

    # ------------------------------------------------------------------ the map

    def shard_map(self, *, refresh: bool = False) -> ShardMap:
        return run(self.shard_map_plan(refresh=refresh))

    def shard_map_plan(self, *, refresh: bool = False) -> Plan[ShardMap]:
        with self._lock:
            if self._map is not None and not refresh:
                return self._map
        copies, errors = [], []
        for store in self.stores:
            try:
                copies.append((yield from rows_plan(store, "shard_map_read")))
            except DatabaseUnavailable as exc:
                errors.append(exc)
        merged = ShardMap.merge(copies)
        if not merged.complete:
            if errors:
                raise errors[0]
            raise ConfigurationError("the shards carry no partition map: run migrate()")
        with self._lock:
            self._map = merged
        return merged

    # ------------------------------------------------------------------ setup

    def set_up(self) -> None:
        """Number every shard that has no number yet (the lowest free numbers, in configuration order),
        stride its ids, give every shard the map (the first one: partition p on shard p mod n), and give a
        new shard the key and queue limits the others have. One set-up at a time (a lock on the first
        configured shard), so two migrations never give two databases one number."""
        first = self.stores[0]
        with first.db.connection(internal=True) as lock_conn, lock_conn.transaction():
            lock_conn.execute(first.db.q.shard_setup_lock)
            self._set_up()

    def _set_up(self) -> None:
        taken: dict[int, int] = {}
        for i, store in enumerate(self.stores):
            identity = rows(store, "shard_identity")
            if identity:
                if int(identity[0][0]) in taken.values():
                    raise ConfigurationError(f"two configured databases are both shard {identity[0][0]}")
                taken[i] = int(identity[0][0])
        old = [self.stores[i] for i in sorted(taken)]
        free = (n for n in range(MAX_SHARDS) if n not in taken.values())
        # a new shard's ids start above every id the others hold (moves then keep per-key id order)
        above = max(int(rows(s, "shard_max_id")[0][0]) for s in self.stores)
        new: list[PostgresStore] = []
        for i, store in enumerate(self.stores):
            if i in taken:
                continue
            n = next(free)
            with store.db.connection(internal=True) as conn, conn.transaction():
                claimed = conn.execute(store.db.q.shard_identity_claim, {"shard_no": n}).fetchone()
                if claimed is not None:  # ours: its ids strided for it
                    conn.execute(store.db.q.shard_set_ids, {"shard_no": n, "stride": MAX_SHARDS, "above": above})
            if claimed is None:
                raise ConfigurationError(f"database {store.db.target()} was numbered by another set-up meanwhile;"
                                         " run migrate() again")
            taken[i] = n
            new.append(store)
            log.info("database set up as a shard", extra={"shard": n, "target": store.db.target()})
        self._numbers = dict(taken)
        for i, store in enumerate(self.stores):
            store.db.shard = taken[i]
        if old and new:  # the admission settings hold on a new shard as on the others
            keys, queues = rows(old[0], "shard_key_limits"), rows(old[0], "shard_queue_limits")
            for store in new:
                for pattern, n_max, block in keys:
                    run(store.set_key_concurrency(str(pattern), int(n_max), bool(block)))
                for queue, n_max in queues:
                    run(store.set_queue_limit(str(queue), int(n_max)))
        copies = [rows(s, "shard_map_read") for s in self.stores]
        if not any(copies):  # a new deployment: the first map, partition p on the (p mod n)-th shard
            numbers = sorted(taken.values())
            self.write_map({p: numbers[p % len(numbers)] for p in range(PARTITIONS)}, version=1)
        else:  # a shard added: it gets the map the others carry
            merged = ShardMap.merge(copies)
            for store, copy in zip(self.stores, copies, strict=True):
                if not copy:
                    self._copy_map(store, merged)
        self.shard_map(refresh=True)

    def _copy_map(self, store: PostgresStore, m: ShardMap) -> None:
        with store.db.connection(internal=True) as conn, conn.transaction():
            for p in range(PARTITIONS):
                conn.execute(store.db.q.shard_map_put, {"partition": p, "shard_no": m.owner[p],
                                                        "version": m.version[p], "moving": m.moving[p]})

    def write_map(self, owners: dict[int, int], *, version: int, moving: bool = False,
                  stores: Sequence[PostgresStore] | None = None) -> None:
        """Set partitions' owners at ``version`` on every shard (or ``stores``)."""
        for store in stores if stores is not None else self.stores:
            with store.db.connection(internal=True) as conn, conn.transaction():
                for p, owner in sorted(owners.items()):
                    conn.execute(store.db.q.shard_map_put, {"partition": p, "shard_no": owner, "version": version,
                                                            "moving": moving})


def rows(store: PostgresStore, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """The rows of a shard's named statement (an idempotent read, retried on a broken connection)."""
    return run(rows_plan(store, statement, params))


def rows_plan(store: PostgresStore, statement: str, params: dict[str, Any] | None = None) -> Plan[list[Any]]:
    found: list[Any] = yield from on(store.db, Stmt(getattr(store.db.q, statement), params))
    return found
