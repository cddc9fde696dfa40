"""The public API shared by every processor: argument checks and docstrings, delegating to a store.

:class:`core.DistributedProcessor` derives from :class:`ProcessorAPI`; any other processor over another store
does too, so they offer the same methods with the same parameters and the same typed errors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

from core import checks, operations
from core.backend import Store
from core.checks import MAX_BATCH, check_queues, check_records, positive_int
from core.config import Settings, run_default, trace_parent_value
from core.constants import INSTANCE_STATUSES
from core.errors import InvalidArgument
from core.floors import Floors
from core.flows import operations as flow_operations
from core.flows.dispatch import FlowHandler
from core.flows.template import as_flows
from core.instance import ProcessFacts
from core.metrics import Metrics
from core.operations import Operations
from core.payloads import serialise
from core.plans import blocking
from core.plans import run as drive
from core.record import Record
from core.worker import Handler, RunOptions, RunSummary, Worker
from core.worker.fanout import Fanout

log = logging.getLogger("core.processor")

P = TypeVar("P", bound="ProcessorAPI")


class ProcessorAPI(Operations):
    """Claim, process and complete records from any number of processes. Thread-safe.

    The producer and operator methods are :mod:`core.operations`' plans, run with the blocking driver."""

    settings: Settings
    store: Store

    def _setup(self, settings: Settings, store: Store, facts: ProcessFacts) -> None:
        self.settings = settings
        self.store = store
        self.facts = facts
        self.metrics = Metrics(settings.instance_id, sharded=hasattr(store, "shard_counts"))
        self.worker: Worker | Fanout | None = None
        # Where claim_records' scans start (core/floors.py); a run() keeps floors of its own.
        self.floors = Floors()

    # ------------------------------------------------------------------ producing

    @staticmethod
    def _serialise(payloads: Sequence[Any]) -> list[str]:
        return serialise(payloads)

    add_records = blocking(operations.add_records)
    start_flow = blocking(flow_operations.start_flow)
    flow_status = blocking(flow_operations.flow_status)
    cancel_flow = blocking(flow_operations.cancel_flow)
    list_flow_runs = blocking(flow_operations.list_flow_runs)

    # ------------------------------------------------------------------ claiming

    def _queues(self, queues: Sequence[str] | str | None) -> list[str]:
        return check_queues(queues, self.settings.queue)

    def claim_records(self, batch_size: int | None = None, *, queues: Sequence[str] | None = None) -> list[Record]:
        """Claim up to ``batch_size`` due records in one round trip (priority DESC, run_at, id).

        Each claimed record is ``processing`` under a fresh lease token; per-key ordering and concurrency
        limits are applied in the same statement.
        """
        return self.complete_and_claim((), batch_size, queues=queues)[0]

    def complete_and_claim(
        self,
        done: Iterable[Record],
        batch_size: int | None = None,
        *,
        queues: Sequence[str] | None = None,
        unblock: Iterable[str] = (),
        defer_unblock: bool = False,
    ) -> tuple[list[Record], int]:
        """Complete ``done`` (fenced, like :meth:`mark_completed`) and claim the next batch in one statement.

        Returns (claimed records, how many of ``done`` were completed). The worker loop uses this so that a
        batch costs one round trip and one commit. The next record of each claimed record's ordering key is
        made claimable by a later statement (it must see inserts committed meanwhile): at once here, or, with
        ``defer_unblock``, by the caller passing those keys as ``unblock`` to its next statement.
        """
        size = self.settings.batch_size if batch_size is None else positive_int(
            "batch_size", batch_size, maximum=MAX_BATCH)
        queue_list = self._queues(queues)
        records = check_records(done, "done")
        unblock = checks.keys("unblock", unblock)
        checks.flag("defer_unblock", defer_unblock)
        # Unblocks are announced to every claimer: this one keeps no record of what it unblocks.
        claimed, completed = self.store.claim(records, size, queue_list, sorted(set(unblock)), self.floors, True)
        self.floors.lower_records(records)  # the next records of completed keys are claimable
        if not defer_unblock:
            self.store.unblock({r.ordering_key for r in claimed if r.ordering_key is not None})
        return claimed, completed

    # ------------------------------------------------------------------ completing

    def mark_completed(self, records: Iterable[Record], *, unblock: Iterable[str] = ()) -> int:
        """Complete records still held under their claim's lease token; returns how many were updated.

        A record whose lease was lost (recovered and possibly re-claimed elsewhere) is left untouched and not
        counted. A record flagged by ``cancel()`` ends ``cancelled`` instead.
        """
        batch = check_records(records)
        keys = checks.keys("unblock", unblock)
        if not batch:
            return 0
        updated = self.store.complete(batch, sorted(set(keys)), True)
        self.floors.lower_records(batch)
        if updated < len(batch):
            log.warning(
                "lost leases on completion",
                extra={"instance_id": self.instance_id, "lost": len(batch) - updated, "batch": len(batch)},
            )
        return updated

    def mark_failed(self, records: Iterable[Record], error: BaseException | str, *, retry: bool = True) -> int:
        """Record a failure for records still held; returns how many were updated.

        With ``retry`` and the error retryable under the policy, a record with attempts left returns to
        ``pending`` after its backoff; otherwise it ends ``failed``. The error lands in ``last_error``.
        """
        batch = check_records(records)
        if not isinstance(error, BaseException | str):
            raise InvalidArgument(f"error must be an exception or a string, got {type(error).__name__}")
        checks.flag("retry", retry)
        if not batch:
            return 0
        retryable = retry and self.retry.should_retry(error if isinstance(error, BaseException) else None)
        return len(self.store.fail(batch, error, retryable))

    def release_records(self, records: Iterable[Record], reason: str = "released by its instance") -> int:
        """Hand held records back to ``pending`` at once, the attempt not charged (graceful shutdown)."""
        batch = check_records(records)
        checks.text("reason", reason, max_length=2000)
        return self.store.release(batch, reason)

    def extend_leases(self, records: Iterable[Record]) -> tuple[set[int], set[int]]:
        """Push the leases of held records; returns (ids still held, ids whose cancel was requested)."""
        return self.heartbeat(records, registered=False)

    def heartbeat(self, records: Iterable[Record], *, registered: bool = True) -> tuple[set[int], set[int]]:
        """Beat the instance's registry row and extend held leases in one round trip.

        Returns (ids still held, ids whose cancel was requested).
        """
        return self.store.heartbeat(check_records(records), registered=checks.flag("registered", registered))

    # ------------------------------------------------------------------ registry

    def register_instance(self, metadata: dict[str, Any] | None = None) -> None:
        """Add (or revive) this instance in the registry as ``running``."""
        self.store.register(None if metadata is None else checks.json_object("metadata", metadata))

    def set_instance_status(self, status: str) -> None:
        """Set this instance's registry status (``running``, ``stopping``, ``stopped`` or ``dead``)."""
        if status not in INSTANCE_STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(INSTANCE_STATUSES)}, got {status!r}")
        self.store.set_instance_status(status)

    def deregister_instance(self) -> None:
        """Mark this instance ``stopped`` (clean shutdown)."""
        self.set_instance_status("stopped")

    # ------------------------------------------------------------------ worker loop

    def run(
        self,
        handler: Handler,
        *,
        concurrency: int = run_default("concurrency"),
        queues: Sequence[str] | None = None,
        stop_when_empty: bool = False,
        stop_event: threading.Event | None = None,
        transactional: bool = False,
        handler_timeout: float | None = run_default("handler_timeout"),
        poll_interval: float = run_default("poll_interval"),
        listen: bool = True,
        handle_signals: bool = True,
        grace_seconds: float = run_default("grace_seconds"),
        prefetch: int | None = None,
        register: bool = True,
        metadata: dict[str, Any] | None = None,
        claimers: int = 2,
        trace_parent: str = run_default("trace_parent"),
    ) -> RunSummary:
        """Claim and process records until stopped; returns a :class:`RunSummary`.

        ``handler``: a function, or a :class:`core.flows.Flow` (or a list of them): each record goes to its
        step's function, the queues default to the flows' (transactional steps get their own transaction).
        ``handler(record)`` runs on a pool of ``concurrency`` threads (a coroutine function is awaited on an
        event-loop thread). Success completes the record, an exception fails it through the retry policy.
        With ``transactional=True`` the handler is called as ``handler(record, conn)`` inside a transaction that
        also writes the completion, so its own database writes and the completion commit together.
        Called from the main thread it handles SIGTERM/SIGINT (unless ``handle_signals=False``): the first
        signal drains for ``grace_seconds``, a second aborts the grace. ``stop_event`` or :meth:`stop` stop it
        from elsewhere; ``stop_when_empty`` returns once nothing is due or held. ``trace_parent``: with
        OpenTelemetry and a tracer provider configured, each record's ``process`` span links to the trace
        context its ``add_records`` stored (``"link"``) or is that context's child (``"child"``).
        """
        positive_int("concurrency", concurrency, maximum=1000)
        checks.seconds("poll_interval", poll_interval, allow_zero=False)
        checks.seconds("handler_timeout", handler_timeout, allow_zero=False, allow_none=True)
        checks.seconds("grace_seconds", grace_seconds)
        if prefetch is not None:
            positive_int("prefetch", prefetch, allow_zero=True, maximum=10 * MAX_BATCH)
        positive_int("claimers", claimers, maximum=64)
        try:
            trace_parent = trace_parent_value(trace_parent)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        for name, value in (("stop_when_empty", stop_when_empty), ("transactional", transactional),
                            ("listen", listen), ("handle_signals", handle_signals), ("register", register)):
            checks.flag(name, value)
        if stop_event is not None and not callable(getattr(stop_event, "is_set", None)):
            raise InvalidArgument("stop_event must be a threading.Event (or have is_set())")
        if metadata is not None:
            checks.json_object("metadata", metadata)
        flows = as_flows(handler)
        if flows is not None:
            handler = FlowHandler(flows, self.settings.max_payload_bytes)
            if queues is None:
                queues = handler.queues()
            if transactional:
                raise InvalidArgument("transactional: a flow's steps say whether they are (step(transactional=True))")
        elif not callable(handler):
            raise InvalidArgument("handler must be callable (a function), or a Flow or a list of flows")
        slots = concurrency if transactional or (isinstance(handler, FlowHandler) and handler.any_transactional) else 0
        options = RunOptions(
            handler=handler,
            concurrency=concurrency,
            queues=self._queues(queues),
            stop_when_empty=stop_when_empty,
            stop_event=stop_event,
            transactional=transactional,
            handler_timeout=handler_timeout,
            poll_interval=poll_interval,
            listen=listen,
            handle_signals=handle_signals,
            grace_seconds=grace_seconds,
            prefetch=prefetch,
            register=register,
            metadata=metadata or {},
            claimers=claimers,
            trace_parent=trace_parent,
        )
        claimers = max(1, claimers)
        runs = self.store.for_run(claimers=claimers, handler_slots=slots,
                                  listen_to=options.queues if listen else [])
        parts = list(runs) if isinstance(runs, Sequence) else [runs]  # several: one per shard
        try:
            worker: Worker | Fanout
            if isinstance(runs, Sequence):
                worker = Fanout([partial(Worker, run, self.settings, self.metrics.for_shard(i))
                                 for i, run in enumerate(parts)], options)
            else:
                worker = Worker(runs, self.settings, self.metrics, options)
            self.worker = worker
            summary = worker.run()
        finally:
            for run in parts:
                run.close()
        log.info("run finished", extra={"instance_id": self.instance_id, **summary.as_dict()})
        return summary

    def stop(self, grace_seconds: float | None = None) -> None:
        """Ask a running :meth:`run` to drain: no new claims, in-flight records get ``grace_seconds``."""
        checks.seconds("grace_seconds", grace_seconds, allow_none=True)
        if self.worker is not None:
            self.worker.stop(grace_seconds)

    # ------------------------------------------------------------------ maintenance and operator actions

    def cleanup_orphaned_records(self) -> int:
        """Recover records whose lease expired or whose instance is dead; returns how many were recovered.

        Runs in bounded batches with SKIP LOCKED and a status guard, so every instance may run it at once and
        it never touches a row completed or re-claimed in between. Records with attempts left go back to
        ``pending`` (claimable at once), the others to ``failed``.
        """
        return self.store.recover()

    cancel = blocking(operations.cancel)
    retry_failed = blocking(operations.retry_failed)
    purge = blocking(operations.purge)

    # ------------------------------------------------------------------ admission settings

    set_key_concurrency = blocking(operations.set_key_concurrency)
    set_queue_limit = blocking(operations.set_queue_limit)

    # ------------------------------------------------------------------ observing

    pause = blocking(operations.pause)
    resume = blocking(operations.resume)
    paused_queues = blocking(operations.paused_queues)
    set_queue_rate = blocking(operations.set_queue_rate)
    set_key_rate = blocking(operations.set_key_rate)
    rates = blocking(operations.rates)
    schedule = blocking(operations.schedule)  # type: ignore[arg-type]  # (mypy: ParamSpec with **kwargs)
    unschedule = blocking(operations.unschedule)
    list_schedules = blocking(operations.list_schedules)
    fire_due_schedules = blocking(operations.fire_due_schedules)

    get_queue_status = blocking(operations.get_queue_status)
    list_instances = blocking(operations.list_instances)
    health_check = blocking(operations.health_check)

    def horizon(self) -> dict[str, Any]:
        """What holds back the database's MVCC horizon and for how long, and the queue table's dead row
        versions (the ``horizon`` part of :meth:`health_check`)."""
        return drive(self.store.horizon())

    def ready(self) -> tuple[bool, str | None]:
        """Readiness for probes: (ready, reason when not)."""
        return self.store.ready()

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release every resource (the pool). Idempotent."""
        self.store.close()

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
