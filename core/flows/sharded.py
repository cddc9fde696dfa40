"""Flows over shards: a run and all its records live on one shard (the shard its dedupe key routes to, else
the shards in turn), so its settling never crosses databases; a run's id is unique across shards (the
records' sequence), and lookups by id ask each shard."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from core.appconn import AppConn
from core.errors import DatabaseUnavailable, FlowDefinitionChanged
from core.flows.run import FlowRun, StartRequest
from core.flows.store import StartRefused
from core.plans import Plan
from core.sharding import partition_of
from core.shardtopology import Topology
from core.store import PostgresStore, start_refused


class ShardedFlows:
    """The flow operations of a :class:`core.sharded.ShardedStore`."""

    def __init__(self, stores: Sequence[PostgresStore], topology: Topology) -> None:
        self.stores = list(stores)
        self.topology = topology
        self._turn = itertools.count()
        # Templates checked on every shard by this processor: (name, version, hash).
        self._checked: set[tuple[str, int, str]] = set()

    def check_template(self, req: StartRequest) -> Plan[None]:
        """Before a template's first run from this processor: its definition stored on every shard that answers
        (or the stored one's hash read), and refused if any shard holds another under the same version. Each
        shard also checks it in the run's own transaction (dp_start_flow); this makes the check independent of
        which shard a run goes to."""
        key = (req.flow, req.version, req.hash)
        if key in self._checked:
            return
        hashes = yield from self._each(lambda s: s.flows.put_template(req))
        if any(h != req.hash for h in hashes):
            raise FlowDefinitionChanged(req.flow, req.version)
        self._checked.add(key)

    def start(self, req: StartRequest, conn: AppConn | None) -> Plan[FlowRun]:
        yield from self.check_template(req)
        if conn is not None:  # one shard's connection: the run is that shard's (its guard checks a dedupe key)
            return (yield from self.stores[0].start_flow(req, conn))
        if req.dedupe_key is not None:
            shard_map = yield from self.topology.shard_map_plan()
            shard = shard_map.owner[partition_of(req.dedupe_key)]
            store = yield from self.topology.store_of_plan(shard)
            return (yield from self._start_on(store, req, shard))
        known = yield from self.topology.known_plan()
        order = sorted(known)
        if not order:
            raise DatabaseUnavailable("no shard is reachable")
        start = next(self._turn) % len(order)
        last: Exception | None = None
        for shard in order[start:] + order[:start]:
            try:
                return (yield from self._start_on(known[shard], req, shard))
            except DatabaseUnavailable as exc:
                if exc.retryable and not exc.rolled_back:  # the run may have been written: not passed on
                    raise
                last = exc
            except StartRefused as exc:  # a retiring shard: the next one
                last = start_refused(exc, req)
        raise last or DatabaseUnavailable("no shard takes new flow runs")

    def _start_on(self, store: PostgresStore, req: StartRequest, shard: int) -> Plan[FlowRun]:
        try:
            return (yield from store.flows.start(req, None, expect_shard=shard))
        except StartRefused as exc:
            if exc.status == "retiring":
                raise
            raise start_refused(exc, req) from None

    def _each(self, op: Any) -> Plan[list[Any]]:
        out: list[Any] = []
        errors: list[DatabaseUnavailable] = []
        for store in self.stores:
            try:
                out.append((yield from op(store)))
            except DatabaseUnavailable as exc:
                errors.append(exc)
        if errors and not out:
            raise errors[0]
        return out

    def status(self, run_id: int) -> Plan[dict[str, Any] | None]:
        for found in (yield from self._each(lambda s: s.flow_status(run_id))):
            if found is not None:
                return dict(found)
        return None

    def cancel(self, run_id: int) -> Plan[str | None]:
        for found in (yield from self._each(lambda s: s.cancel_flow(run_id))):
            if found is not None:
                return str(found)
        return None

    def list_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]:
        parts = yield from self._each(lambda s: s.list_flow_runs(flow, status, limit))
        rows = sorted((r for part in parts for r in part), key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return rows[:limit]

    def defects(self) -> Plan[list[int]]:
        return [i for part in (yield from self._each(lambda s: s.flow_defects())) for i in part]
