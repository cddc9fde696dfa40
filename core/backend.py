"""The seam between the public API, the worker loop and the storage: what a store of records must offer.

A store is one database's state changes (:class:`core.store.PostgresStore`). The facade (:mod:`core.api`)
checks arguments and calls a store; the worker loop (:mod:`core.worker`) depends on :class:`WorkerStore`
only, never on the facade. The operations the asyncio API shares (:mod:`core.operations`) return plans
(:mod:`core.plans`), which a blocking or an asyncio driver runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from core.floors import Floors
from core.plans import Plan
from core.record import AddResult, Record
from core.retry import RetryPolicy

if TYPE_CHECKING:
    from core.appconn import AppConn
    from core.flows.run import FlowRun, StartRequest

# (queue, status, count, oldest pending age in seconds or None, due count): one row per queue and status.
CountRow = tuple[str, str, int, float | None, int]


@dataclass(frozen=True)
class NewRecords:
    """A checked ``add_records`` batch: one entry per payload in ``keys`` and ``dedupes``."""

    payloads: list[dict[str, Any]]
    queue: str
    priority: int
    run_at: datetime | None
    max_attempts: int
    keys: list[str | None]
    dedupes: list[str | None]
    dedupe_while: str
    # The trace context stored with every record of the batch (core/tracing.py): the W3C traceparent, then a
    # space and the tracestate when there is one; None without tracing.
    trace: str | None = None


class Listener(Protocol):
    """What a run listens with, for probes and tests: NOTIFY is a hint, the claim loop polls regardless."""

    connected: threading.Event  # set while it listens
    reconnects: int

    @property
    def backend_pid(self) -> int | None: ...


class WorkerStore(Protocol):
    """What the worker loop needs for one run: claim and the fenced outcome writes; heartbeats, recovery,
    retention and the registry (one thread at a time: the service loop); transactions for handlers."""

    listener: Listener | None  # what it listens with (None: the poll alone)

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]:
        """Complete ``done`` (fenced) and claim up to ``size`` records in one statement; (claimed, completed).

        ``floors``: where each queue's scan starts, moved up by the claim (:mod:`core.floors`); ``announce``:
        the keys unblocked are announced to other claimers (the caller does not lower floors of its own)."""
        ...

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        """Make each key's earliest pending record claimable. Best effort: the sweep repairs a miss."""
        ...

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int: ...

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        """Fenced failure; returns (id, status after) of the records still held."""
        ...

    def release(self, records: Sequence[Record], reason: str) -> int: ...

    def any_due(self, queues: list[str]) -> bool: ...

    def notify_owed(self, *, force: bool = False) -> None:
        """Send the keyed completions' wake-ups held back whose window has passed, or all (``force``: the run
        stops) (core.claims.KeyNotices)."""
        ...

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        """Beat the registry row and extend leases; (ids still held, ids whose cancel was requested)."""
        ...

    def maintenance(self) -> Iterator[Callable[[], int]]:
        """One maintenance round (recovery of orphaned records, then the retention of finished ones), as steps
        of one statement each: the service loop runs them one at a time between heartbeats."""
        ...

    def register(self, metadata: dict[str, Any] | None) -> None: ...

    def set_instance_status(self, status: str) -> None: ...

    def fire_due(self) -> int:
        """Fire the schedules' due ticks (each once across instances); how many records were added."""
        ...

    def seconds_to_next_schedule(self) -> float | None:
        """Seconds until the next tick of any schedule (None: no schedule)."""
        ...

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a notification of an insert; whether one (or a reconnect) came."""
        ...

    def interrupt(self) -> None:
        """End a ``wait`` under way at once (the run is stopping)."""
        ...

    def transaction(self) -> AbstractContextManager[Any]:
        """A transaction for a transactional handler: yields the connection it is called with."""
        ...

    def complete_in(self, conn: Any, records: Sequence[Record]) -> int:
        """Fenced completion inside the caller's transaction (``transaction()``)."""
        ...

    def check_budget(self) -> None:
        """Raise ConfigurationError when the run can never get the connections it needs."""
        ...

    def close(self) -> None: ...


class Store(Protocol):
    """Everything the facade needs: inserts, claims and outcomes, operator actions, observation, and a
    store for each ``run()`` (:meth:`for_run`)."""

    def for_run(
        self, *, claimers: int, handler_slots: int, listen_to: Sequence[str]
    ) -> WorkerStore | Sequence[WorkerStore]:
        """The connections of one run: ``claimers`` for claims, one for the service loop, ``handler_slots``
        for transactional handlers; LISTEN for inserts into ``listen_to``. Several databases (shards): one
        such run for each, worked side by side (:class:`core.worker.fanout.Fanout`)."""
        ...

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]: ...

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None: ...

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int: ...

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]: ...

    def release(self, records: Sequence[Record], reason: str) -> int: ...

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]: ...

    def recover(self) -> int: ...

    def register(self, metadata: dict[str, Any] | None) -> None: ...

    def set_instance_status(self, status: str) -> None: ...

    def add(self, batch: NewRecords, conn: AppConn | None = None) -> Plan[AddResult]:
        """Insert a batch (on ``conn``, an application's connection, inside its transaction)."""
        ...

    def cancel(self, ids: list[int]) -> Plan[dict[int, str]]: ...

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> Plan[int]: ...

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> Plan[int]: ...

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> Plan[None]: ...

    def set_queue_limit(self, queue: str, n: int | None) -> Plan[None]: ...

    def counts(self, queue: str | None) -> Plan[list[CountRow]]:
        """Counts per queue and status (pending rows with their oldest age and due count)."""
        ...

    def list_instances(self, include_stopped: bool) -> Plan[list[dict[str, Any]]]: ...

    def probe(self, report: dict[str, Any], timeout: float) -> Plan[list[CountRow] | None]:
        """Fill ``report["database"]`` (and ``pool``); return the counts, or None when not migrated."""
        ...

    def ready(self) -> tuple[bool, str | None]: ...

    def pause(self, queue: str, until: datetime | None, reason: str | None) -> Plan[None]: ...

    def resume(self, queue: str) -> Plan[bool]: ...

    def paused(self) -> Plan[dict[str, dict[str, Any]]]: ...

    def set_queue_rate(self, queue: str, n: float | None, per: float | None) -> Plan[None]: ...

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> Plan[None]: ...

    def rates(self) -> Plan[dict[str, dict[str, dict[str, float]]]]: ...

    def declare_schedule(self, spec: Any) -> Plan[None]:
        """Declare (or update) a schedule: a :class:`core.schedules.ScheduleSpec`."""
        ...

    def remove_schedule(self, name: str) -> Plan[bool]: ...

    def list_schedules(self) -> Plan[list[dict[str, Any]]]: ...

    def fire_schedules(self) -> Plan[int]: ...

    def horizon(self) -> Plan[dict[str, Any]]:
        """Who holds back the MVCC horizon (``health_check()["horizon"]``)."""
        ...

    def start_flow(self, req: StartRequest, conn: AppConn | None = None) -> Plan[FlowRun]:
        """Write a run and its records in one transaction (core/flows/)."""
        ...

    def flow_status(self, run_id: int) -> Plan[dict[str, Any] | None]: ...

    def cancel_flow(self, run_id: int) -> Plan[str | None]: ...

    def list_flow_runs(self, flow: str | None, status: str | None, limit: int) -> Plan[list[dict[str, Any]]]: ...

    def flow_defects(self) -> Plan[list[int]]:
        """Waiting flow records none of whose parents is unfinished (the oldest slice): a defect."""
        ...

    def retain(self) -> int: ...

    def close(self) -> None: ...
