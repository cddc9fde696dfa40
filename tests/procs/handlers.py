"""Handlers the CLI tests start with ``dproc run --handler tests.procs.handlers:<name>``."""

from __future__ import annotations

import os
from typing import Any

SVC_LEDGER_DDL = ("CREATE TABLE IF NOT EXISTS svc_ledger (seq bigserial, record_id bigint NOT NULL,"
                  " instance text NOT NULL, ordering_key text)")


def noop(record: Any) -> None:
    """Does nothing: the record completes."""


def fail_always(record: Any) -> None:
    raise RuntimeError(f"planned failure of record {record.id}")


def ledger_tx(record: Any, conn: Any) -> None:
    """Transactional: the ledger row commits with the completion, so the ledger counts completions exactly."""
    conn.execute(
        "INSERT INTO svc_ledger (record_id, instance, ordering_key) VALUES (%s, %s, %s)",
        (record.id, os.environ.get("DP_INSTANCE_ID", "?"), record.ordering_key),
    )


not_callable = 42
