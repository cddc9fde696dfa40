"""The public API shared by every processor: argument checks and docstrings, delegating to a store.

:class:`core.DistributedProcessor` derives from :class:`ProcessorAPI`; any other processor over another store
does too, so they offer the same methods with the same parameters and the same typed errors.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, TypeVar

from core.backend import Store
from core.checks import MAX_BATCH, check_new_records, check_queues, check_records, positive_int
from core.config import Settings, SettingsView, run_default
from core.constants import STATUSES
from core.errors import InvalidArgument
from core.floors import Floors
from core.health import health_report, status_dict
from core.instance import ProcessFacts
from core.metrics import Metrics
from core.payloads import serialise
from core.record import AddResult, Record
from core.worker import Handler, RunOptions, RunSummary, Worker
from core.worker.fanout import Fanout

log = logging.getLogger("core.processor")

P = TypeVar("P", bound="ProcessorAPI")


class ProcessorAPI(SettingsView):
    """Claim, process and complete records from any number of processes. Thread-safe."""

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

    def add_records(
        self,
        payloads: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        max_attempts: int | None = None,
        ordering_key: str | Sequence[str | None] | None = None,
        dedupe_key: str | Sequence[str | None] | None = None,
        dedupe_while: str = "pending",
    ) -> AddResult:
        """Insert a batch atomically and return the ids in input order.

        One statement (or one COPY above ``copy_threshold`` records) for the whole batch. Invalid input raises
        before anything is written; ``QueueFull`` rolls the whole batch back. Records whose ``dedupe_key`` is
        already held in the queue are not inserted: their index is in ``result.deduplicated`` and their id is
        the existing record's.
        """
        batch = check_new_records(
            payloads, queue=self.settings.queue if queue is None else queue, priority=priority, run_at=run_at,
            delay=delay, max_attempts=self.settings.max_attempts if max_attempts is None else max_attempts,
            ordering_key=ordering_key, dedupe_key=dedupe_key, dedupe_while=dedupe_while, now=self._now())
        if not batch.payloads:
            return AddResult()
        return self.store.add(batch)

    def _now(self) -> datetime:
        """The clock ``delay`` counts from (the in-memory processor's is a fake one)."""
        return datetime.now(timezone.utc)

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
        records = check_records(done)
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
        if not batch:
            return 0
        updated = self.store.complete(batch, sorted(set(unblock)), True)
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
        if not batch:
            return 0
        retryable = bool(retry) and self.retry.should_retry(error if isinstance(error, BaseException) else None)
        return len(self.store.fail(batch, error, retryable))

    def release_records(self, records: Iterable[Record], reason: str = "released by its instance") -> int:
        """Hand held records back to ``pending`` at once, the attempt not charged (graceful shutdown)."""
        return self.store.release(check_records(records), reason)

    def extend_leases(self, records: Iterable[Record]) -> tuple[set[int], set[int]]:
        """Push the leases of held records; returns (ids still held, ids whose cancel was requested)."""
        return self.heartbeat(records, registered=False)

    def heartbeat(self, records: Iterable[Record], *, registered: bool = True) -> tuple[set[int], set[int]]:
        """Beat the instance's registry row and extend held leases in one round trip.

        Returns (ids still held, ids whose cancel was requested).
        """
        return self.store.heartbeat(check_records(records), registered=registered)

    # ------------------------------------------------------------------ registry

    def register_instance(self, metadata: dict[str, Any] | None = None) -> None:
        """Add (or revive) this instance in the registry as ``running``."""
        self.store.register(metadata)

    def set_instance_status(self, status: str) -> None:
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
    ) -> RunSummary:
        """Claim and process records until stopped; returns a :class:`RunSummary`.

        ``handler(record)`` runs on a pool of ``concurrency`` threads (a coroutine function is awaited on an
        event-loop thread). Success completes the record, an exception fails it through the retry policy.
        With ``transactional=True`` the handler is called as ``handler(record, conn)`` inside a transaction that
        also writes the completion, so its own database writes and the completion commit together.
        Called from the main thread it handles SIGTERM/SIGINT (unless ``handle_signals=False``): the first
        signal drains for ``grace_seconds``, a second aborts the grace. ``stop_event`` or :meth:`stop` stop it
        from elsewhere; ``stop_when_empty`` returns once nothing is due or held.
        """
        positive_int("concurrency", concurrency, maximum=1000)
        if poll_interval <= 0:
            raise InvalidArgument("poll_interval must be > 0")
        if handler_timeout is not None and handler_timeout <= 0:
            raise InvalidArgument("handler_timeout must be > 0")
        if not callable(handler):
            raise InvalidArgument("handler must be callable")
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
        )
        claimers = max(1, claimers)
        runs = self.store.for_run(claimers=claimers, handler_slots=concurrency if transactional else 0,
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

    def cancel(self, ids: Iterable[int]) -> dict[int, str]:
        """Cancel records: pending (and failed) ones at once; processing ones are flagged, the handler can see it
        (``core.worker.current_record_cancelled()``) and their outcome becomes ``cancelled``.

        Returns ``{id: status_after}`` for the records it touched; completed and cancelled ones are left alone.
        """
        return self.store.cancel([positive_int("id", i) for i in ids])

    def retry_failed(
        self,
        ids: Iterable[int] | None = None,
        *,
        queue: str | None = None,
        error_pattern: str | None = None,
        batch: int = 1000,
    ) -> int:
        """Move failed records back to ``pending`` with a fresh attempt budget; returns how many moved."""
        id_list = None if ids is None else [positive_int("id", i) for i in ids]
        if error_pattern is not None:
            try:
                re.compile(error_pattern)
            except re.error as exc:
                raise InvalidArgument(f"error_pattern is not a valid regular expression: {exc}") from None
        return self.store.retry_failed(id_list, queue, error_pattern, positive_int("batch", batch))

    def purge(self, older_than: float | timedelta, *, batch: int = 5000, max_batches: int | None = None) -> int:
        """Delete finished records older than ``older_than`` in bounded, ordered batches; returns the count."""
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
        if seconds < 0:
            raise InvalidArgument("older_than must be >= 0")
        return self.store.purge(seconds, positive_int("batch", batch), max_batches)

    # ------------------------------------------------------------------ admission settings

    def set_key_concurrency(self, key_or_pattern: str, n: int | None, *, block_on_failure: bool = False) -> None:
        """Limit how many records of matching ordering keys may be processing at once (``None`` removes it).

        ``key_or_pattern`` is an exact key or a glob (``*``, ``?``); an exact key wins over patterns, a longer
        pattern over a shorter one. Stored in the database: every instance obeys it from its next claim.
        """
        if not isinstance(key_or_pattern, str) or not key_or_pattern:
            raise InvalidArgument("key_or_pattern must be a non-empty string")
        limit = None if n is None else positive_int("n", n)
        self.store.set_key_concurrency(key_or_pattern, limit, bool(block_on_failure))

    def set_queue_limit(self, queue: str, n: int | None) -> None:
        """Cap the number of pending records of ``queue`` (``None`` removes the cap); enforced on insert."""
        if not isinstance(queue, str) or not queue:
            raise InvalidArgument("queue must be a non-empty string")
        self.store.set_queue_limit(queue, None if n is None else positive_int("n", n, allow_zero=True))

    # ------------------------------------------------------------------ observing

    def get_queue_status(self, queue: str | None = None, *, statuses: Sequence[str] | None = None) -> dict[str, Any]:
        """Counts per status per queue, and the age of the oldest pending record.

        Pending and processing are counted through their partial indexes; finished counts come from the
        trigger-maintained ``queue_stats`` table, so the call stays cheap with millions of finished rows.
        """
        wanted = list(STATUSES) if statuses is None else list(statuses)
        unknown = [s for s in wanted if s not in STATUSES]
        if unknown:
            raise InvalidArgument(f"unknown status filter {unknown}; valid statuses are {list(STATUSES)}")
        out = status_dict(self.store.counts(queue), wanted)
        per_shard = getattr(self.store, "shard_counts", None)  # several databases: each one's counts too
        if per_shard is not None:
            out["shards"] = {shard: status_dict(rows, wanted) for shard, rows in per_shard(queue).items()}
        return out

    def list_instances(self, *, include_stopped: bool = False) -> list[dict[str, Any]]:
        """Registered instances with their heartbeat and how many records each holds."""
        return self.store.list_instances(include_stopped)

    def health_check(
        self,
        *,
        timeout: float = 5.0,
        latency_degraded_ms: float = 250.0,
        pending_age_degraded_s: float | None = None,
    ) -> dict[str, Any]:
        """A health report that never raises: ``status`` is ``healthy``, ``degraded`` or ``unhealthy``.

        Unreachable database, missing schema: unhealthy (with the reason). Slow round trip, callers waiting
        for pool connections, a snapshot or slot holding the MVCC horizon back longer than
        ``horizon_warning_seconds`` (the reason names it), or (optionally) a pending backlog older than
        ``pending_age_degraded_s``: degraded.
        """
        return health_report(self.store, self.instance_id, self.facts, timeout=timeout,
                             latency_degraded_ms=latency_degraded_ms, pending_age_degraded_s=pending_age_degraded_s,
                             horizon_warning_seconds=self.settings.horizon_warning_seconds)

    def horizon(self) -> dict[str, Any]:
        """What holds back the database's MVCC horizon and for how long, and the queue table's dead row
        versions (the ``horizon`` part of :meth:`health_check`)."""
        return self.store.horizon()

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
