"""A worker OS process for concurrency tests: claims and completes until the queue is drained.

Writes every claimed id (one per line) to the ledger file given, so the parent can prove no duplicates.
Usage: python -m tests.procs.claim_worker DSN BATCH_SIZE LEDGER_PATH INSTANCE_ID [POOLING]
"""

from __future__ import annotations

import faulthandler
import signal
import sys

from core import DistributedProcessor


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on SIGUSR1 (terminate_all)
    dsn, batch, ledger, instance = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    pooling = sys.argv[5] if len(sys.argv) > 5 else "session"
    empty_rounds = 0
    with DistributedProcessor(dsn, instance_id=instance, pool_max=2, pooling=pooling) as p, \
            open(ledger, "w") as out:
        while empty_rounds < 3:
            records = p.claim_records(batch)
            if not records:
                # Empty claim: done only when nothing is pending anywhere (others may hold a few).
                if p.get_queue_status()["totals"]["pending"] == 0:
                    empty_rounds += 1
                continue
            empty_rounds = 0
            out.write("".join(f"{r.id}\n" for r in records))
            if p.mark_completed(records) != len(records):
                print("lost a lease in a test that expires none", file=sys.stderr)
                return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
