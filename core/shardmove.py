"""Moving partitions between shards while workers run, with two-phase commit (docs/scale-out.md).

A move of partitions from shard A to shard B:

1. The partitions are marked moving in every shard's map (A's first): producers of their keys are refused
   by the shards and wait (core/sharded.py), so no new record of them lands anywhere.
2. Rounds, each one distributed transaction: on A, every pending record of a set of keys none of whose
   records is running is locked, read and deleted, and the transaction is prepared (``PREPARE TRANSACTION``);
   on B, the same rows (same ids) are inserted with the move's log entry, and prepared; then B commits, then
   A. A key moves whole, never while one of its records runs on A, so its records never run on two shards at
   once and keep their order. Keys that are busy wait for a later round.
3. When A holds no unfinished record of the partitions, the map names B (B's copy first, A's last).

A mover killed at any point leaves prepared transactions that :func:`resolve` settles from the move's log
(both prepared: commit both; B committed: commit A; else roll A back), and partitions still marked moving,
which the next move of them (``dproc shards add`` or ``retire`` run again) finishes. Records are never lost
or doubled: a row leaves A only in the transaction that, by the log, put it on B.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from core.errors import ConfigurationError
from core.sharding import partition_of
from core.shardtopology import Topology, rows
from core.store import PostgresStore

log = logging.getLogger("core.shards")

ROUND_KEYS = 100  # keys per distributed transaction (each with its history)
ROUND_KEYLESS = 2000  # keyless records per distributed transaction (retiring a shard)
MOVER_LOCK = 0x64705F6D6F7665  # 'dp_move': one mover at a time
PREFIX = "dp-move:"


def _connect(store: PostgresStore) -> psycopg.Connection[Any]:
    kwargs = store.db.connection_kwargs()
    kwargs["autocommit"] = False  # two-phase commit runs in an explicit transaction
    kwargs["application_name"] = (store.db.settings.application_name + "-mover")[:63]
    return psycopg.connect(store.db.dsn, **kwargs)


class Mover:
    """Moves partitions between the shards of ``topology`` (one mover at a time: a lock on every shard)."""

    def __init__(self, topology: Topology, *, pause: Callable[[], None] | None = None) -> None:
        self.topology = topology
        self.pause = pause or (lambda: None)  # tests: called between the steps of a round
        self.moved = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        conns = []
        try:
            for store in self.topology.known().values():
                conn = psycopg.connect(store.db.dsn, **store.db.connection_kwargs())
                conns.append(conn)
                row = conn.execute(store.db.q.move_lock, {"key": MOVER_LOCK}).fetchone()
                if not row or not row[0]:
                    raise ConfigurationError("another mover is running")
            yield
        finally:
            for conn in conns:
                conn.close()  # a session lock ends with its session

    # ------------------------------------------------------------------ in-doubt transactions

    def resolve(self) -> dict[str, int]:
        """Settle the prepared transactions of moves that did not finish; {'committed': n, 'rolled_back': m}."""
        shards = self.topology.known()
        prepared: dict[int, list[str]] = {}
        mine = f"{PREFIX}{self.topology.stores[0].db.settings.schema}:"  # this deployment's moves only
        for no, store in shards.items():
            with psycopg.connect(store.db.dsn, **store.db.connection_kwargs()) as conn:
                prepared[no] = [str(r[0]) for r in conn.execute(store.db.q.move_prepared,
                                                                {"prefix": mine + "%"}).fetchall()]
        out = {"committed": 0, "rolled_back": 0}
        for no, gids in prepared.items():
            for gid in gids:
                move_id, role, other = gid[len(mine):].split(":")
                peer = shards.get(int(other))
                if peer is None:
                    raise ConfigurationError(f"in-doubt move {move_id} involves shard {other}, which is not reachable")
                if role == "dst":
                    src_gid = f"{mine}{move_id}:src:{no}"
                    # prepared after its source; the source commits after it: no source, no move
                    commit = src_gid in prepared.get(int(other), [])
                    self._finish(shards[no], gid, commit)
                    if commit:
                        self._finish(peer, src_gid, True)
                        prepared[int(other)].remove(src_gid)
                else:
                    dst_gid = f"{mine}{move_id}:dst:{no}"
                    if dst_gid in prepared.get(int(other), []):
                        continue  # settled when its destination's entry is
                    with psycopg.connect(peer.db.dsn, **peer.db.connection_kwargs()) as conn:
                        row = conn.execute(peer.db.q.move_logged, {"move_id": move_id}).fetchone()
                    commit = bool(row and row[0])
                    self._finish(shards[no], gid, commit)
                out["committed" if commit else "rolled_back"] += 1
        if any(out.values()):
            log.warning("in-doubt moves settled", extra=out)
        return out

    @staticmethod
    def _finish(store: PostgresStore, gid: str, commit: bool) -> None:
        with _connect(store) as conn:  # a transaction prepared by another session, settled by its id
            if commit:
                conn.tpc_commit(gid)
            else:
                conn.tpc_rollback(gid)

    # ------------------------------------------------------------------ moving

    def move(self, partitions: list[int], source: int, target: int, *, keyless: bool = False,
             timeout: float = 600.0) -> int:
        """Move ``partitions`` (and, with ``keyless``, the keyless records) from shard ``source`` to ``target``;
        returns how many records moved."""
        src, dst = self.topology.store_of(source), self.topology.store_of(target)
        shard_map = self.topology.shard_map(refresh=True)
        version = max(shard_map.version[p] for p in partitions) + 1 if partitions else 0
        wanted = set(partitions)
        if partitions:
            # moving, still on the source: producers of these keys wait from here on (the source first)
            order = [src, *[s for s in self.topology.known().values() if s is not src]]
            self.topology.write_map({p: source for p in partitions}, version=version, moving=True, stores=order)
        deadline = time.monotonic() + timeout
        moved = 0
        while True:
            keys = [k for (k,) in rows(src, "move_routing_keys", {}) if partition_of(k) in wanted]
            n, _ = self._round_keys(src, dst, source, target, keys) if keys else (0, 0)
            if keyless:
                n += self._round_keyless(src, dst, source, target)
            moved += n
            left = self._unfinished(src, keys, keyless)
            if left == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} records of the partitions are still on shard {source} after {timeout:g}s")
            if n == 0:
                time.sleep(0.1)  # only busy keys left: their running records finish first
        if partitions or moved:
            # The target's own later records get ids above the ones moved in (FIFO is id order); also when
            # this run moved nothing (a killed mover's rounds did), and with no statement timeout: it takes
            # as long as the gap it closes.
            above = int(rows(src, "shard_max_id", {})[0][0])
            with dst.db.connection(internal=True) as conn, conn.transaction():
                conn.execute(dst.db.q.shard_no_statement_timeout)
                conn.execute(dst.db.q.shard_raise_ids, {"above": above})
        if partitions:
            order = [dst, *[s for s in self.topology.known().values() if s not in (dst, src)], src]
            self.topology.write_map({p: target for p in partitions}, version=version + 1, stores=order)
        self.topology.shard_map(refresh=True)
        self.moved += moved
        log.info("partitions moved", extra={"partitions": len(partitions), "source": source, "target": target,
                                            "records": moved})
        return moved

    def _unfinished(self, src: PostgresStore, keys: list[str], keyless: bool) -> int:
        left = int(rows(src, "move_unfinished", {"keys": keys})[0][0]) if keys else 0
        if keyless:
            left += int(rows(src, "move_unfinished_keyless", {})[0][0])
        return left

    def _round_keys(self, src: PostgresStore, dst: PostgresStore, source: int, target: int,
                    keys: list[str]) -> tuple[int, int]:
        moved = busy = 0
        for start in range(0, len(keys), ROUND_KEYS):
            chunk = keys[start:start + ROUND_KEYS]
            n, b = self._transfer(src, dst, source, target, "move_lock_keys", {"keys": chunk}, chunk)
            moved, busy = moved + n, busy + b
        return moved, busy

    def _round_keyless(self, src: PostgresStore, dst: PostgresStore, source: int, target: int) -> int:
        n, _ = self._transfer(src, dst, source, target, "move_lock_keyless", {"limit": ROUND_KEYLESS}, [])
        return n

    def _transfer(self, src: PostgresStore, dst: PostgresStore, source: int, target: int, lock: str,
                  params: dict[str, Any], keys: list[str]) -> tuple[int, int]:
        """One distributed transaction (see the module docstring); (records moved, keys left busy)."""
        move_id = uuid.uuid4().hex
        prefix = f"{PREFIX}{src.db.settings.schema}:{move_id}"
        src_gid, dst_gid = f"{prefix}:src:{target}", f"{prefix}:dst:{source}"
        # Finished counts of the moved rows go to a slot of this move's own (the trigger reads dp.stats_slot):
        # a prepared transaction left by a killed mover then locks no row that completions write.
        slot = {"slot": str(16 + int(move_id[:8], 16) % 30_000)}  # queue_stats.slot is a smallint
        busy: set[str] = set()
        if keys:  # keys with a running record are left out before anything is locked
            busy = {r[0] for r in rows(src, "move_busy_keys", {"keys": keys})}
            keys = [k for k in keys if k not in busy]
            if not keys:
                return 0, len(busy)
            params = {**params, "keys": keys}
        with _connect(src) as a, _connect(dst) as b:
            a.tpc_begin(src_gid)
            try:
                a.execute(src.db.q.move_stats_slot, slot)
                locked_rows = a.execute(getattr(src.db.q, lock), params).fetchall()
                if keys:
                    # In this order: a claim that commits before the count shows in the busy check, one that
                    # commits later leaves the count above the rows locked. Either way the round is given
                    # up (its locks released at once) and the key waits for a later one.
                    locked: dict[str, int] = {}
                    for r in locked_rows:
                        locked[r[1]] = locked.get(r[1], 0) + 1
                    counts = dict(a.execute(src.db.q.move_pending_counts, {"keys": keys}).fetchall())
                    late = {k for k, n in counts.items() if locked.get(k, 0) != n}
                    late |= {r[0] for r in a.execute(src.db.q.move_busy_keys, {"keys": keys}).fetchall()}
                    if late:
                        a.tpc_rollback()
                        return 0, len(busy | late)
                ids = [int(r[0]) for r in locked_rows]
                if not locked_rows or a.execute(src.db.q.move_delete, {"ids": ids}).rowcount != len(ids):
                    a.tpc_rollback()
                    return 0, len(busy)
                self.pause()
                a.tpc_prepare()
            except BaseException:
                if a.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    a.tpc_rollback()  # nothing prepared yet: nothing in doubt
                raise
            self.pause()
            try:
                b.tpc_begin(dst_gid)
                b.execute(dst.db.q.move_stats_slot, slot)
                # the rows as JSON text, never parsed here: numbers stay exactly as stored
                b.execute(dst.db.q.move_insert, {"rows": "[" + ",".join(str(r[2]) for r in locked_rows) + "]"})
                b.execute(dst.db.q.move_announce, {"ids": ids})
                b.execute(dst.db.q.move_log, {"move_id": move_id, "records": len(ids)})
                b.tpc_prepare()
            except BaseException:
                # B never prepared: the move did not happen. A's prepared half goes too (settling would
                # roll it back as well), so nothing stays locked.
                with contextlib.suppress(psycopg.Error):
                    if b.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        b.tpc_rollback()
                a.tpc_rollback()
                raise
            self.pause()
            b.tpc_commit()  # from here on a failure is settled by resolve(): B committed means A commits
            self.pause()
            a.tpc_commit()
        moved_keys = sorted({r[1] for r in locked_rows if r[1] is not None})
        if moved_keys:
            dst.unblock(moved_keys)  # each key's first record claimable on its new shard
        return len(ids), len(busy)


# ---------------------------------------------------------------------- operations


def rebalance(topology: Topology, *, retire: int | None = None, mover: Mover | None = None) -> dict[str, Any]:
    """Spread the partitions evenly over the shards (all but ``retire``, whose records all move, keyless
    ones too, and which takes no new records from the start). Resumes a move a killed mover left."""
    from core.sharding import rebalanced

    mover = mover or Mover(topology)
    shards = topology.known()
    if len(shards) != len(topology.stores):
        raise ConfigurationError("every configured shard must be reachable to move partitions")
    if retire is not None:
        if retire not in shards:
            raise ConfigurationError(f"no shard {retire}")
        if len(shards) == 1:
            raise ConfigurationError("the last shard cannot be retired")
        shards[retire].db.with_retry(
            lambda conn: conn.execute(shards[retire].db.q.shard_set_accepting, {"accepting": False}))
    with mover.locked():
        settled = mover.resolve()
        owner = topology.shard_map(refresh=True).owner
        keep = [s for s in sorted(shards) if s != retire]
        plan: dict[tuple[int, int], list[int]] = {}
        for p, target in sorted(rebalanced(owner, keep).items()):
            plan.setdefault((owner[p], target), []).append(p)
        moved = 0
        for (source, target), parts in sorted(plan.items()):
            moved += mover.move(parts, source, target)
        if retire is not None:  # its keyless records go to the next shard
            moved += mover.move([], retire, keep[0], keyless=True)
    return {"moved_records": moved, "moved_partitions": sum(len(p) for p in plan.values()), **settled}
