"""The flow the flow chaos test runs in `dproc run` worker processes: a diamond and a for_each of 5 (9 records a
run), every step transactional, writing a ledger row (what it saw of its parents) in its completion's
transaction: a ledger row exists exactly when its record completed."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import psycopg

from core import Record
from core.flows import Flow

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS flow_ledger (
    record_id bigint PRIMARY KEY,
    run_id bigint NOT NULL,
    step text NOT NULL,
    parents jsonb,
    payload jsonb,
    instance text NOT NULL
);
"""

flow = Flow("chaos_flow", version=1)


def _ledger(record: Record, conn: Any) -> None:
    # The primary key makes a second completion of one record impossible to hide: it would fail here.
    conn.execute("INSERT INTO flow_ledger (record_id, run_id, step, parents, payload, instance) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (record.id, record.flow_run, record.step, json.dumps(record.parents), json.dumps(record.payload),
                  os.environ.get("DP_INSTANCE_ID", "?")))


@flow.step(transactional=True)
def start(record: Record, conn: Any) -> list[int]:
    _ledger(record, conn)
    n = int(record.payload["n"])
    return [n * 10 + i for i in range(5)]


@flow.step(after=[start], transactional=True)
def left(record: Record, conn: Any) -> int:
    _ledger(record, conn)
    return int(record.payload["n"]) + 1


@flow.step(after=[start], transactional=True)
def right(record: Record, conn: Any) -> int:
    _ledger(record, conn)
    return int(record.payload["n"]) + 2


@flow.step(for_each=start, transactional=True)
def part(record: Record, conn: Any) -> int:
    _ledger(record, conn)
    return int(record.payload) * 2  # type: ignore[call-overload]  # an element of start's list


@flow.step(after=[left, right, part], transactional=True)
def join(record: Record, conn: Any) -> None:
    _ledger(record, conn)


def expected_parents(step: str, n: int) -> dict[str, Any]:
    """What a step of run input ``{"n": n}`` must see of its parents when it starts."""
    elements = [n * 10 + i for i in range(5)]
    return {
        "start": {},
        "left": {"start": elements},
        "right": {"start": elements},
        "part": {"start": elements},
        "join": {"left": n + 1, "right": n + 2, "part": [e * 2 for e in elements]},
    }[step]


# The same flow with plain (not transactional) steps: their completions ride on the worker's next claim, the
# statement that takes the children it releases (migration 0017). A step may run again after its worker was
# killed (at least once, as every plain handler), so each execution is logged, not keyed: the test bounds the
# repeats by the records the killed workers held.
EXEC_DDL = """
CREATE TABLE IF NOT EXISTS flow_exec (
    record_id bigint NOT NULL,
    run_id bigint NOT NULL,
    step text NOT NULL,
    parents jsonb,
    payload jsonb,
    instance text NOT NULL
);
"""

plain_flow = Flow("chaos_flow_plain", version=1)
_local = threading.local()


def _log(record: Record) -> None:
    conn = getattr(_local, "conn", None)
    if conn is None:  # one autocommit connection per handler thread
        conn = _local.conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
    conn.execute("INSERT INTO flow_exec (record_id, run_id, step, parents, payload, instance) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (record.id, record.flow_run, record.step, json.dumps(record.parents), json.dumps(record.payload),
                  os.environ.get("DP_INSTANCE_ID", "?")))


@plain_flow.step(name="start")
def plain_start(record: Record) -> list[int]:
    _log(record)
    n = int(record.payload["n"])
    return [n * 10 + i for i in range(5)]


@plain_flow.step(name="left", after=["start"])
def plain_left(record: Record) -> int:
    _log(record)
    return int(record.payload["n"]) + 1


@plain_flow.step(name="right", after=["start"])
def plain_right(record: Record) -> int:
    _log(record)
    return int(record.payload["n"]) + 2


@plain_flow.step(name="part", for_each="start")
def plain_part(record: Record) -> int:
    _log(record)
    return int(record.payload) * 2  # type: ignore[call-overload]  # an element of start's list


@plain_flow.step(name="join", after=["left", "right", "part"])
def plain_join(record: Record) -> None:
    _log(record)
