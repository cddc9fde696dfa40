"""A worker OS process over several shards: ``DistributedProcessor(shards=...).run`` with a handler that
writes one ledger row per execution into the record's own shard (``connection(shard=record.shard)``).

Usage: python -m tests.procs.shard_worker NAME DSN [DSN ...] [--lease S] [--concurrency N] [--health-port P]
Runs until SIGTERM; prints the run summary as JSON.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import time
from typing import Any

from core import DistributedProcessor, RetryPolicy

SHARD_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS shard_ledger (
    seq bigserial PRIMARY KEY,
    record_id bigint NOT NULL,
    shard int NOT NULL,
    ordering_key text,
    instance text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("instance")
    ap.add_argument("dsns", nargs="+")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--health-port", type=int)
    args = ap.parse_args()
    with DistributedProcessor(shards=args.dsns, instance_id=args.instance, lease_seconds=args.lease,
                              retry=RetryPolicy(base_delay=0.05, max_delay=0.2, jitter=0),
                              pool_max=args.concurrency + 1, connect_timeout=3) as p:
        def handler(record: Any) -> None:
            with p.connection(shard=record.shard) as conn:
                conn.execute("INSERT INTO shard_ledger (record_id, shard, ordering_key, instance)"
                             " VALUES (%s, %s, %s, %s)", (record.id, record.shard, record.ordering_key, args.instance))
            if record.payload.get("sleep"):
                time.sleep(float(record.payload["sleep"]))

        server = None
        if args.health_port:
            from core.http import HealthServer

            server = HealthServer(p, "127.0.0.1", args.health_port).start()
        try:
            summary = p.run(handler, concurrency=args.concurrency, poll_interval=0.2)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(summary.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
