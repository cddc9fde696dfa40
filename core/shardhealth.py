"""Health over shards: every shard probed at once, each reported, the counts summed (core/sharded.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.backend import CountRow
from core.errors import DatabaseUnavailable
from core.plans import Plan, Together
from core.sharding import merge_counts
from core.shardtopology import Topology
from core.store import PostgresStore


def probe_shards(stores: Sequence[PostgresStore], topology: Topology, report: dict[str, Any],
                 timeout: float) -> Plan[list[CountRow] | None]:
    """Every shard probed at once within ``timeout``; a shard down is a reason (degraded), all down
    is an error (unhealthy)."""
    def one(i: int) -> Plan[tuple[dict[str, Any], list[CountRow] | None, int]]:
        part: dict[str, Any] = {"database": {"reachable": False}, "reasons": []}
        counts = yield from stores[i].probe(part, timeout)
        return part, counts, (yield from topology.number_plan(i))

    outcomes = yield Together([one(i) for i in range(len(stores))], timeout + 1)
    shards: list[dict[str, Any]] = []
    rows: list[list[CountRow]] = []
    first_db: dict[str, Any] | None = None
    for i, outcome in enumerate(outcomes):
        target = stores[i].db.target()
        entry: dict[str, Any] = {"index": i, **target, "status": "healthy"}
        if outcome.error is not None:  # reported, never raised: the others answer
            exc = outcome.error
            entry["status"], entry["reason"] = "unhealthy", f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            part, counts, entry["shard"] = outcome.value
            first_db = first_db or part["database"]
            if counts is None:
                entry["status"], entry["reason"] = "unhealthy", "; ".join(part["reasons"]) or "not migrated"
            else:
                rows.append(counts)
                entry["latency_ms"] = part["database"].get("latency_ms")
        if entry["status"] != "healthy":
            report["reasons"].append(f"shard {target['host']}:{target['port']}/{target['dbname']}"
                                     f" unreachable: {entry['reason']}")
        shards.append(entry)
    report["shards"] = shards
    if not rows:
        raise DatabaseUnavailable("no shard is reachable: " + "; ".join(s.get("reason", "") for s in shards))
    report["database"].update(first_db or {}, reachable=True, shards=len(stores),
                              shards_reachable=len(rows))
    return merge_counts(rows)
