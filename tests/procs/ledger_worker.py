"""A worker OS process running ``DistributedProcessor.run`` with the ledger handler.

Usage: python -m tests.procs.ledger_worker DSN INSTANCE_ID [--concurrency N] [--slow SECONDS]
           [--stop-when-empty] [--lease S] [--queues a,b] [--schedule NAME]
Runs until SIGTERM (or until nothing is due with --stop-when-empty); prints the run summary as JSON.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import time
from typing import Any

from core import DistributedProcessor, RetryPolicy
from tests.procs.ledger import ledger_handler


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on SIGUSR1 (terminate_all)
    ap = argparse.ArgumentParser()
    ap.add_argument("dsn")
    ap.add_argument("instance")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--slow", type=float, default=0.0, help="extra seconds per record in this process")
    ap.add_argument("--stop-when-empty", action="store_true")
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--poll", type=float, default=0.2)
    ap.add_argument("--queues", default="default", help="comma-separated queues to work")
    ap.add_argument("--schedule", help="declare this every-second schedule (queue 'ticks') before running, as a"
                                       " container declares its schedules at start")
    args = ap.parse_args()
    with DistributedProcessor(
        args.dsn,
        instance_id=args.instance,
        lease_seconds=args.lease,
        batch_size=args.batch,
        retry=RetryPolicy(base_delay=0.05, max_delay=0.2, jitter=0),
        pool_max=args.concurrency + 4,
        application_name=f"ledger-{args.instance}",  # a test can tell this process's backends apart
    ) as p:
        inner = ledger_handler(p, args.instance)
        if args.schedule:
            p.schedule(args.schedule, every=1, queue="ticks", payload={"schedule": args.schedule})

        def handler(record: Any) -> None:
            if args.slow:
                time.sleep(args.slow)
            inner(record)

        summary = p.run(
            handler, concurrency=args.concurrency, stop_when_empty=args.stop_when_empty, poll_interval=args.poll,
            queues=args.queues.split(","),
        )
    print(json.dumps(summary.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
