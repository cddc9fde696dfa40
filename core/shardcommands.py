"""``dproc shards status|add|retire``: the operator's view of the shards and the moves between them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.errors import DatabaseUnavailable
from core.plans import run
from core.shardmove import PREFIX, rebalance
from core.shardtopology import rows


def shards_command(p: Any, args: argparse.Namespace) -> int:
    store = p.store
    topology = store.topology
    if args.shards_command == "add":
        p.migrate()  # numbers the new shards and gives them the map
        result = rebalance(topology)
        print(f"moved {result['moved_partitions']} partitions ({result['moved_records']} records); in-doubt moves"
              f" settled: {result['committed']} committed, {result['rolled_back']} rolled back")
        return 0
    if args.shards_command == "retire":
        result = rebalance(topology, retire=args.shard_no)
        print(f"shard {args.shard_no} retired: moved {result['moved_partitions']} partitions and"
              f" {result['moved_records']} records; it holds only finished records now and can leave the"
              " configuration")
        return 0
    report = status(p)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
        return 0
    print(f"{'shard':>6}  {'target':<40}{'partitions':>11}{'pending':>10}{'processing':>12}{'in doubt':>10}")
    for s in report["shards"]:
        if "error" in s:
            print(f"{'?':>6}  {s['target']:<40}  unreachable: {s['error']}")
            continue
        print(f"{s['shard']:>6}  {s['target']:<40}{s['partitions']:>11}{s['pending']:>10}{s['processing']:>12}"
              f"{len(s['in_doubt']):>10}")
    if report["moving"]:
        print(f"partitions in a move: {report['moving']} (run `dproc shards add` again to finish it)")
    return 0


def status(p: Any) -> dict[str, Any]:
    topology = p.store.topology
    shard_map = topology.shard_map(refresh=True)
    counts = run(p.store.shard_counts(None))
    shards = []
    for i, store in enumerate(topology.stores):
        t = store.db.target()
        target = f"{t['host']}:{t['port']}/{t['dbname']}"
        try:
            no = topology.number(i)
            prepared = rows(store, "move_prepared", {"prefix": f"{PREFIX}{store.db.settings.schema}:%"})
        except DatabaseUnavailable as exc:
            shards.append({"index": i, "target": target, "error": str(exc)[:200]})
            continue
        mine = counts.get(str(no), [])
        shards.append({
            "index": i, "shard": no, "target": target, "partitions": len(shard_map.partitions_of(no)),
            "pending": sum(r[2] for r in mine if r[1] == "pending"),
            "processing": sum(r[2] for r in mine if r[1] == "processing"),
            "in_doubt": [str(r[0]) for r in prepared],
        })
    return {"shards": shards, "moving": [i for i, m in enumerate(shard_map.moving) if m]}
