"""Several databases behind one processor: :class:`ShardedStore` implements :class:`core.backend.Store` over
one :class:`core.store.PostgresStore` per shard (docs/scale-out.md).

Inserts are split by key (core/sharding.py) and each shard checks, inside the insert's transaction, that the
partitions it was given are still its own (a producer with a stale map is refused and routes again);
operations on records go to the records' shards (``Record.shard``); operations on ids and queues go to every
shard; counts and health are summed and reported per shard. A shard that is down fails only what needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from core.appconn import AppConn
from core.backend import CountRow, NewRecords
from core.config import Settings
from core.errors import DatabaseUnavailable
from core.floors import Floors
from core.flows.run import FlowRun, StartRequest
from core.flows.sharded import ShardedFlows
from core.instance import ProcessFacts
from core.plans import Plan, later, run
from core.record import AddResult, Claimed, Record
from core.retry import RetryPolicy
from core.runstore import PostgresRun
from core.shardhealth import probe_shards
from core.sharding import merge_counts, partition_of
from core.shardinsert import ShardedInserts
from core.shardtopology import Topology, rows
from core.store import PostgresStore

log = logging.getLogger("core.shards")
T = TypeVar("T")


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
        self.inserts = ShardedInserts(settings, self.stores, self.topology)
        self.flows = ShardedFlows(self.stores, self.topology)

    @property
    def db(self) -> Any:
        """The first shard's database (its statements and settings are every shard's)."""
        return self.stores[0].db

    # ------------------------------------------------------------------ producing

    def add(self, batch: NewRecords, conn: AppConn | None = None) -> Plan[AddResult]:
        """Insert a batch: each shard's part atomically, the parts one after another (see the README's
        limits: a failure after the first part leaves the parts already stored; ``stored_ids`` on the
        error says which). With ``conn`` (one shard's), on that shard only."""
        return self.inserts.add(batch, conn)

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
        claimed = Claimed()
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
            waits = [w for w in (claimed.rate_wait, getattr(got, "rate_wait", None)) if w is not None]
            claimed.rate_wait = min(waits, default=None)
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

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for shard, rs in self._by_shard(records).items():
            out.extend(self.topology.store_of(shard).fail(rs, error, retryable, policy))
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

    def _each(self, op: Callable[[PostgresStore], Plan[T]], *, tolerate: bool = False) -> Plan[list[T]]:
        """``op`` on every shard; with ``tolerate``, shards that are down are skipped (unless all are)."""
        out: list[T] = []
        errors: list[DatabaseUnavailable] = []
        for store in self.stores:
            try:
                out.append((yield from op(store)))
            except DatabaseUnavailable as exc:
                if not tolerate:
                    raise
                errors.append(exc)
        if errors and not out:
            raise errors[0]
        return out

    def recover(self) -> int:
        return sum(run(self._each(lambda s: later(s.recover), tolerate=True)))

    def retain(self) -> int:
        return sum(run(self._each(lambda s: later(s.retain), tolerate=True)))

    def register(self, metadata: dict[str, Any] | None) -> None:
        run(self._each(lambda s: later(lambda: s.register(metadata)), tolerate=True))

    def set_instance_status(self, status: str) -> None:
        run(self._each(lambda s: later(lambda: s.set_instance_status(status)), tolerate=True))

    def cancel(self, ids: list[int]) -> Plan[dict[int, str]]:
        out: dict[int, str] = {}
        for part in (yield from self._each(lambda s: s.cancel(ids))):
            out.update(part)
        return out

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> Plan[int]:
        return sum((yield from self._each(lambda s: s.retry_failed(ids, queue, pattern, batch))))

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> Plan[int]:
        return sum((yield from self._each(lambda s: s.purge(older_than, batch, max_batches))))

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> Plan[None]:
        yield from self._each(lambda s: s.set_key_concurrency(pattern, n, block_on_failure))

    def set_queue_limit(self, queue: str, n: int | None) -> Plan[None]:
        """Exact across the shards (see :meth:`ShardedInserts.limited`); every shard stores it."""
        yield from self._each(lambda s: s.set_queue_limit(queue, n))

    # ------------------------------------------------------------------ queue control

    def pause(self, queue: str, until: datetime | None, reason: str | None) -> Plan[None]:
        yield from self._each(lambda s: s.pause(queue, until, reason))

    def resume(self, queue: str) -> Plan[bool]:
        return any((yield from self._each(lambda s: s.resume(queue))))

    def paused(self) -> Plan[dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, Any]] = {}
        for part in (yield from self._each(lambda s: s.paused(), tolerate=True)):
            for queue, state in part.items():
                out.setdefault(queue, state)
        return out

    def set_queue_rate(self, queue: str, n: float | None, per: float | None) -> Plan[None]:
        """A queue's rate is split evenly: each shard's bucket has ``n / shards`` (README "Shards")."""
        share = None if n is None else n / len(self.stores)
        yield from self._each(lambda s: s.set_queue_rate(queue, share, per))

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> Plan[None]:
        """Exact: a key lives on one shard, whose bucket is the key's."""
        yield from self._each(lambda s: s.set_key_rate(pattern, n, per))

    def rates(self) -> Plan[dict[str, dict[str, dict[str, float]]]]:
        first = (yield from self._each(lambda s: s.rates(), tolerate=True))[0]
        for rate in first["queues"].values():
            rate["n"] *= len(self.stores)
        return first

    def declare_schedule(self, spec: Any) -> Plan[None]:
        """A schedule lives on one shard, which fires it: its ordering key's, else the first."""
        key = spec.options.get("ordering_key")
        if key is None:
            known = yield from self.topology.known_plan()
            if not known:
                raise DatabaseUnavailable("no shard is reachable")
            store = known[min(known)]
        else:
            shard_map = yield from self.topology.shard_map_plan()
            store = yield from self.topology.store_of_plan(shard_map.owner[partition_of(key)])
        yield from self._each(lambda s: s.remove_schedule(spec.name) if s is not store else later(lambda: False),
                              tolerate=True)
        yield from store.declare_schedule(spec)

    def remove_schedule(self, name: str) -> Plan[bool]:
        return any((yield from self._each(lambda s: s.remove_schedule(name))))

    def list_schedules(self) -> Plan[list[dict[str, Any]]]:
        parts = yield from self._each(lambda s: s.list_schedules(), tolerate=True)
        return sorted((row for part in parts for row in part), key=lambda r: str(r["name"]))

    def fire_schedules(self) -> Plan[int]:
        return sum((yield from self._each(lambda s: s.fire_schedules(), tolerate=True)))

    # ------------------------------------------------------------------ flows: a run on one shard

    def start_flow(self, req: StartRequest, conn: AppConn | None = None) -> Plan[FlowRun]:
        return self.flows.start(req, conn)

    def flow_status(self, run_id: int) -> Plan[dict[str, Any] | None]:
        return self.flows.status(run_id)

    def cancel_flow(self, run_id: int) -> Plan[str | None]:
        return self.flows.cancel(run_id)

    def list_flow_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]:
        return self.flows.list_runs(flow, status, limit)

    def flow_defects(self) -> Plan[list[int]]:
        return self.flows.defects()

    # ------------------------------------------------------------------ observing

    def counts(self, queue: str | None) -> Plan[list[CountRow]]:
        return merge_counts((yield from self._each(lambda s: s.counts(queue), tolerate=True)))

    def shard_counts(self, queue: str | None) -> Plan[dict[str, list[CountRow]]]:
        out: dict[str, list[CountRow]] = {}
        for i, store in enumerate(self.stores):
            try:
                number = yield from self.topology.number_plan(i)
                out[str(number)] = yield from store.counts(queue)
            except DatabaseUnavailable:
                continue
        return out

    def list_instances(self, include_stopped: bool) -> Plan[list[dict[str, Any]]]:
        seen: dict[str, dict[str, Any]] = {}
        for i, store in enumerate(self.stores):
            try:
                rows = yield from store.list_instances(include_stopped)
                shard = yield from self.topology.number_plan(i)
            except DatabaseUnavailable:
                continue
            for row in rows:
                entry = seen.setdefault(row["instance_id"], {**row, "shards": []})
                entry["shards"].append(shard)
        return list(seen.values())

    def probe(self, report: dict[str, Any], timeout: float) -> Plan[list[CountRow] | None]:
        return probe_shards(self.stores, self.topology, report, timeout)

    def ready(self) -> tuple[bool, str | None]:
        answers = [s.ready() for s in self.stores]
        if any(ok for ok, _ in answers):
            return True, None
        return False, "; ".join(r or "" for _, r in answers)

    def horizon(self) -> Plan[dict[str, Any]]:
        parts = yield from self._each(lambda s: s.horizon(), tolerate=True)
        holders = [p["holder"] for p in parts if p.get("holder")]
        return {"holder": max(holders, key=lambda h: h["age_seconds"]) if holders else None, "shards": parts}

    def close(self) -> None:
        for store in self.stores:
            store.close()


