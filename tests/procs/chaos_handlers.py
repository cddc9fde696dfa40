"""Handlers for the chaos suite, run inside `dproc run` worker processes.

``work`` writes its side effect and an execution-ledger row in one transaction of its own (not the
completion's), so the ledger counts executions while the record's status counts completions.
Payload switches: ``sleep`` (seconds), ``exit`` (``os._exit`` mid-record), ``raise`` (an exception),
``hang`` (sleep far past any timeout).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

CHAOS_DDL = """
CREATE TABLE IF NOT EXISTS exec_ledger (
    seq bigserial PRIMARY KEY,
    record_id bigint NOT NULL,
    instance text NOT NULL,
    attempt int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS side_effects (record_id bigint NOT NULL, instance text NOT NULL);
"""

_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        # A connection of its own, named so that fault injection aimed at the processor spares it; without
        # prepared statements, so that it works through a transaction pooler too.
        conn = psycopg.connect(os.environ["DATABASE_URL"], application_name="chaos-handler", connect_timeout=5,
                               prepare_threshold=None)
        _local.conn = conn
    return conn


def work(record: Any) -> None:
    payload = record.payload
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    if payload.get("exit"):
        os._exit(int(payload["exit"]))
    if payload.get("hang"):
        time.sleep(float(payload["hang"]))
    if payload.get("raise"):
        raise ValueError(f"planned failure of record {record.id}")
    instance = os.environ.get("DP_INSTANCE_ID", "?")
    conn = _conn()
    try:
        with conn.transaction():
            conn.execute("INSERT INTO side_effects (record_id, instance) VALUES (%s, %s)", (record.id, instance))
            conn.execute(
                "INSERT INTO exec_ledger (record_id, instance, attempt) VALUES (%s, %s, %s)",
                (record.id, instance, record.attempts),
            )
    except psycopg.OperationalError:
        conn.close()
        raise


_limit_lock = threading.Lock()
_limited = False


def hog(record: Any) -> None:
    """``work``, in a process whose address space is capped (RLIMIT_AS, set on the first call: what the
    process had then plus ``DP_TEST_HEADROOM_MB``); ``payload['hog']`` bytes are asked for first, which the
    cap refuses with MemoryError."""
    global _limited
    with _limit_lock:
        if not _limited:
            import resource

            import psutil

            cap = psutil.Process().memory_info().vms + int(os.environ.get("DP_TEST_HEADROOM_MB", "384")) * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            _limited = True
    if record.payload.get("hog"):
        block = bytearray(int(record.payload["hog"]))
        block[-1] = 1
    work(record)
