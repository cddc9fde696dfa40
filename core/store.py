"""One PostgreSQL database's worth of state changes: the roles (enqueue, claims, recovery, admin, health)
wired to one :class:`Database`. Implements :class:`core.backend.Store`; the facade and the worker call it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from core.admin import Admin
from core.appconn import AppConn
from core.backend import CountRow, NewRecords
from core.claims import Claims
from core.config import Settings
from core.control import Control
from core.db import Borrow, Database
from core.enqueue import Enqueuer, Refused
from core.errors import FlowDefinitionChanged, WrongShard
from core.floors import Floors
from core.flows.run import FlowRun, StartRequest
from core.flows.store import PostgresFlows, StartRefused
from core.health import Health
from core.instance import ProcessFacts
from core.plans import Plan, run
from core.record import AddResult, Record
from core.recovery import Recovery
from core.retry import RetryPolicy
from core.runstore import RETENTION_BATCH, RETENTION_BATCHES, PostgresRun
from core.schedules import Schedules, ScheduleSpec


class PostgresStore:
    """The records of one database, for one processor instance."""

    def __init__(
        self, settings: Settings, facts: ProcessFacts, dsn: str | None = None, borrow: Borrow | None = None
    ) -> None:
        self.settings = settings
        self.facts = facts
        self.db = Database(settings, dsn, borrow)
        # A run's statements pass through the caller's borrow too (core.db.routed), when it gave one.
        self.via = borrow
        self.enqueuer = Enqueuer(self.db)
        self.claims = Claims(self.db)
        self.recovery = Recovery(self.db, self.claims)
        self.admin = Admin(self.db, self.claims, facts)
        self.health = Health(self.db)
        self.control = Control(self.db)
        self.schedules = Schedules(self.db)
        self.flows = PostgresFlows(self.db)

    # ------------------------------------------------------------------ producing and claiming

    def add(self, batch: NewRecords, conn: AppConn | None = None) -> Plan[AddResult]:
        try:
            return (yield from self.enqueuer.add(batch, conn))
        except Refused as exc:  # a shard's database, written to as if it were not one
            raise wrong_shard(exc) from None

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]:
        return self.claims.claim(done, size, queues, unblock, floors, announce)

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        self.claims.unblock(keys, announce=announce)

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int:
        return self.claims.complete(records, unblock, announce)

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        return self.claims.fail(records, error, retryable, policy)

    def release(self, records: Sequence[Record], reason: str) -> int:
        return self.claims.release(records, reason)

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        return self.claims.heartbeat(records, registered=registered)

    def any_due(self, queues: list[str]) -> bool:
        return self.claims.any_due(queues)

    def for_run(self, *, claimers: int, handler_slots: int, listen_to: Sequence[str]) -> PostgresRun:
        # LISTEN is session state: under transaction pooling the jittered poll is the only wake-up.
        listen = [] if not self.settings.notify or self.db.transaction_pooling else list(listen_to)
        return PostgresRun(self.settings, self.facts, self.db.dsn, claimers=claimers, handler_slots=handler_slots,
                           listen_to=listen, via=self.via, shard=self.db.shard)

    # ------------------------------------------------------------------ recovery, admin, registry

    def recover(self) -> int:
        return self.recovery.recover()

    def retain(self) -> int:
        retention = self.settings.retention
        if retention is None:
            return 0
        return run(self.admin.purge(retention, RETENTION_BATCH, RETENTION_BATCHES)) + self.flows.purge_runs(
            retention, RETENTION_BATCH)

    def cancel(self, ids: list[int]) -> Plan[dict[int, str]]:
        return self.admin.cancel(ids)

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> Plan[int]:
        return self.admin.retry_failed(ids, queue, pattern, batch)

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> Plan[int]:
        return self.admin.purge(older_than, batch, max_batches)

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> Plan[None]:
        return self.admin.set_key_concurrency(pattern, n, block_on_failure)

    def set_queue_limit(self, queue: str, n: int | None) -> Plan[None]:
        return self.admin.set_queue_limit(queue, n)

    def register(self, metadata: dict[str, Any] | None) -> None:
        self.admin.register(metadata)

    def set_instance_status(self, status: str) -> None:
        self.admin.set_instance_status(status)

    # ------------------------------------------------------------------ queue control

    def pause(self, queue: str, until: datetime | None, reason: str | None) -> Plan[None]:
        return self.control.pause(queue, until, reason)

    def resume(self, queue: str) -> Plan[bool]:
        return self.control.resume(queue)

    def paused(self) -> Plan[dict[str, dict[str, Any]]]:
        return self.control.paused()

    def set_queue_rate(self, queue: str, n: float | None, per: float | None) -> Plan[None]:
        return self.control.set_queue_rate(queue, n, per)

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> Plan[None]:
        return self.control.set_key_rate(pattern, n, per)

    def rates(self) -> Plan[dict[str, dict[str, dict[str, float]]]]:
        return self.control.rates()

    def declare_schedule(self, spec: ScheduleSpec) -> Plan[None]:
        return self.schedules.declare(spec, datetime.now(timezone.utc))

    def remove_schedule(self, name: str) -> Plan[bool]:
        return self.schedules.remove(name)

    def list_schedules(self) -> Plan[list[dict[str, Any]]]:
        return self.schedules.list()

    def fire_schedules(self) -> Plan[int]:
        return self.schedules.fire_due()

    # ------------------------------------------------------------------ flows

    def start_flow(self, req: StartRequest, conn: AppConn | None = None) -> Plan[FlowRun]:
        try:
            return (yield from self.flows.start(req, conn))
        except StartRefused as exc:
            raise start_refused(exc, req) from None

    def flow_status(self, run_id: int) -> Plan[dict[str, Any] | None]:
        return self.flows.status(run_id)

    def cancel_flow(self, run_id: int) -> Plan[str | None]:
        return self.flows.cancel(run_id)

    def list_flow_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]:
        return self.flows.list_runs(flow, status, limit)

    def flow_defects(self) -> Plan[list[int]]:
        return (yield from self.flows.defects())[1]

    # ------------------------------------------------------------------ observing

    def counts(self, queue: str | None) -> Plan[list[CountRow]]:
        return self.health.counts(queue)

    def list_instances(self, include_stopped: bool) -> Plan[list[dict[str, Any]]]:
        return self.health.list_instances(include_stopped)

    def probe(self, report: dict[str, Any], timeout: float) -> Plan[list[CountRow] | None]:
        return self.health.probe(report, timeout)

    def ready(self) -> tuple[bool, str | None]:
        return self.health.ready()

    def horizon(self) -> Plan[dict[str, Any]]:
        return self.health.horizon()

    def close(self) -> None:
        self.db.close()


def start_refused(exc: StartRefused, req: StartRequest) -> Exception:
    """What ``start_flow`` raises when the database wrote nothing."""
    if exc.status == "changed":
        return FlowDefinitionChanged(req.flow, req.version)
    return wrong_shard(Refused(exc.status, exc.owner))


def wrong_shard(exc: Refused) -> WrongShard:
    """What an application is told when the database of its connection refused a batch (a shard's guard)."""
    if exc.status == "elsewhere":
        return WrongShard(f"a record's key belongs to shard {exc.owner}: add it on that shard's connection; "
                          "nothing was written", exc.owner)
    if exc.status == "moving":
        return WrongShard("a record's key is in a partition moving between shards: try again shortly; nothing "
                          "was written")
    if exc.status == "retiring":
        return WrongShard(f"shard {exc.owner} is retiring and takes no new records without a key; nothing was "
                          "written", exc.owner)
    return WrongShard("the connection's database is not the shard the records belong to; nothing was written")
