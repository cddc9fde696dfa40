"""A ledger the test handlers write to: one row per execution, with start/end times and the claim time.

The ledger row is written in the handler, so it records what really ran (executions), independent of the
record's own status (completions).
"""

from __future__ import annotations

import time
from typing import Any

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    seq bigserial PRIMARY KEY,
    record_id bigint NOT NULL,
    ordering_key text,
    instance text NOT NULL,
    attempt int NOT NULL,
    claimed_at timestamptz NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz
)
"""


def ensure_ledger(conn: Any) -> None:
    conn.execute(LEDGER_DDL)


def ledger_handler(processor: Any, instance: str) -> Any:
    """A handler that logs start and end to the ledger and sleeps ``payload['sleep']`` seconds.

    ``payload['fail_times']`` makes the first N attempts raise.
    """

    def handle(record: Any) -> None:
        with processor.connection() as conn:
            row = conn.execute(
                "INSERT INTO ledger (record_id, ordering_key, instance, attempt, claimed_at, started_at)"
                " VALUES (%s, %s, %s, %s, %s, clock_timestamp()) RETURNING seq",
                (record.id, record.ordering_key, instance, record.attempts, record.claimed_at),
            ).fetchone()
        seq = row[0]
        if record.payload.get("sleep"):
            time.sleep(float(record.payload["sleep"]))
        with processor.connection() as conn:
            conn.execute("UPDATE ledger SET ended_at = clock_timestamp() WHERE seq = %s", (seq,))
        if record.attempts <= int(record.payload.get("fail_times", 0)):
            raise RuntimeError(f"planned failure {record.attempts}")

    return handle
