"""The producer and operator API, written once as plans (:mod:`core.plans`): ``DistributedProcessor`` (and the
in-memory processor) run them with the blocking driver, ``AsyncDistributedProcessor`` with the asyncio one.
Each function here is a public method of both: its signature, argument checks, typed errors and docstring
are the method's, whichever class it is called on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from core import checks, tracing
from core.backend import Store
from core.checks import check_new_records, positive_int
from core.config import Settings, SettingsView
from core.constants import STATUSES
from core.errors import InvalidArgument
from core.health import health_report, status_dict
from core.instance import ProcessFacts
from core.plans import Call, Plan
from core.record import AddResult


class Operations(SettingsView):
    """What the operations need of a processor: its settings, its store, its clock."""

    settings: Settings
    store: Store
    facts: ProcessFacts

    def _now(self) -> datetime:
        """The clock ``delay`` counts from (the in-memory processor's is a fake one)."""
        return datetime.now(timezone.utc)

    def _application_connection(self, conn: Any) -> Plan[Any]:
        """Take hold of ``conn`` for ``add_records(conn=...)`` (typed errors for what cannot be used)."""
        from core.appconn import aadapt, adapt

        return (yield Call(lambda: adapt(conn), lambda: aadapt(conn)))


def add_records(
    self: Operations,
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
    conn: Any = None,
) -> Plan[AddResult]:
    """Insert a batch atomically and return the ids in input order.

    One statement (or one COPY above ``copy_threshold`` records) for the whole batch. Invalid input raises
    before anything is written; ``QueueFull`` rolls the whole batch back. Records whose ``dedupe_key`` is
    already held in the queue are not inserted: their index is in ``result.deduplicated`` and their id is
    the existing record's.

    ``conn``: the application's connection (psycopg ``Connection``, SQLAlchemy ``Connection`` or ``Session``;
    for the asyncio API psycopg ``AsyncConnection``, SQLAlchemy ``AsyncConnection`` or ``AsyncSession``). The
    records are inserted inside its transaction and commit or roll back with it; nothing is committed or
    rolled back for it, and workers see the records (and are woken) at its commit. A connection in autocommit
    mode outside a transaction block raises ``NotInTransaction``. ``QueueFull`` and a deduplicated record
    leave its transaction usable: nothing of ours fails inside it for them (no savepoint is needed, so none
    is taken). A dedupe or ordering key held by another open transaction makes the call wait for it.
    With shards, ``conn`` is one shard's: a record whose key belongs to another shard raises ``WrongShard``
    naming that shard; keyless records stay on the connection's shard.

    With OpenTelemetry (extra ``[otel]``): a ``send {queue}`` PRODUCER span, and the trace context inside it
    stored with each record, which the worker's ``process`` spans link to (README, "Tracing").
    """
    batch = check_new_records(
        payloads, queue=self.settings.queue if queue is None else queue, priority=priority, run_at=run_at,
        delay=delay, max_attempts=self.settings.max_attempts if max_attempts is None else max_attempts,
        ordering_key=ordering_key, dedupe_key=dedupe_key, dedupe_while=dedupe_while, now=self._now())
    app = None if conn is None else (yield from self._application_connection(conn))
    if not batch.payloads:
        return AddResult()
    send = tracing.sending(batch.queue, len(batch.payloads))  # None without opentelemetry (core/tracing.py)
    if send is None:
        return (yield from self.store.add(batch, app))
    with send:  # the send span, ended when the insert ends (with its error, if any)
        result = yield from self.store.add(replace(batch, trace=send.context), app)
        send.added(result)
    return result


def cancel(self: Operations, ids: Iterable[int]) -> Plan[dict[int, str]]:
    """Cancel records: pending (and failed) ones at once; processing ones are flagged, the handler can see it
    (``core.worker.current_record_cancelled()``) and their outcome becomes ``cancelled``.

    Returns ``{id: status_after}`` for the records it touched; completed and cancelled ones are left alone.
    """
    return (yield from self.store.cancel(checks.record_ids(ids)))


def retry_failed(
    self: Operations,
    ids: Iterable[int] | None = None,
    *,
    queue: str | None = None,
    error_pattern: str | None = None,
    batch: int = 1000,
) -> Plan[int]:
    """Move failed records back to ``pending`` with a fresh attempt budget; returns how many moved."""
    id_list = None if ids is None else checks.record_ids(ids)
    if queue is not None:
        checks.check_queue_name(queue)
    if error_pattern is not None:
        checks.text("error_pattern", error_pattern)
        try:
            re.compile(error_pattern)
        except re.error as exc:
            raise InvalidArgument(f"error_pattern is not a valid regular expression: {exc}") from None
    return (yield from self.store.retry_failed(id_list, queue, error_pattern, positive_int("batch", batch)))


def purge(self: Operations, older_than: float | timedelta, *, batch: int = 5000,
          max_batches: int | None = None) -> Plan[int]:
    """Delete finished records older than ``older_than`` in bounded, ordered batches; returns the count."""
    age = checks.seconds("older_than", older_than) or 0.0
    rounds = None if max_batches is None else positive_int("max_batches", max_batches)
    return (yield from self.store.purge(age, positive_int("batch", batch), rounds))


def set_key_concurrency(self: Operations, key_or_pattern: str, n: int | None, *,
                        block_on_failure: bool = False) -> Plan[None]:
    """Limit how many records of matching ordering keys may be processing at once (``None`` removes it).

    ``key_or_pattern`` is an exact key or a glob (``*``, ``?``); an exact key wins over patterns, a longer
    pattern over a shorter one. Stored in the database: every instance obeys it from its next claim.
    """
    checks.text("key_or_pattern", key_or_pattern, max_length=checks.MAX_KEY)
    limit = None if n is None else positive_int("n", n)
    yield from self.store.set_key_concurrency(key_or_pattern, limit, checks.flag("block_on_failure", block_on_failure))


def set_queue_limit(self: Operations, queue: str, n: int | None) -> Plan[None]:
    """Cap the number of pending records of ``queue`` (``None`` removes the cap); enforced on insert."""
    checks.check_queue_name(queue)
    yield from self.store.set_queue_limit(queue, None if n is None else positive_int("n", n, allow_zero=True))


def get_queue_status(self: Operations, queue: str | None = None, *,
                     statuses: Sequence[str] | None = None) -> Plan[dict[str, Any]]:
    """Counts per status per queue, and the age of the oldest pending record.

    Pending and processing are counted through their partial indexes; finished counts come from the
    trigger-maintained ``queue_stats`` table, so the call stays cheap with millions of finished rows.
    """
    if queue is not None:
        checks.check_queue_name(queue)
    if statuses is not None and (isinstance(statuses, str) or not isinstance(statuses, Iterable)):
        raise InvalidArgument(f"statuses must be a list of statuses, got {type(statuses).__name__}")
    wanted = list(STATUSES) if statuses is None else list(statuses)
    unknown = [s for s in wanted if not isinstance(s, str) or s not in STATUSES]
    if unknown:
        raise InvalidArgument(f"unknown status filter {unknown}; valid statuses are {list(STATUSES)}")
    out = status_dict((yield from self.store.counts(queue)), wanted)
    per_shard = getattr(self.store, "shard_counts", None)  # several databases: each one's counts too
    if per_shard is not None:
        rows = yield from per_shard(queue)
        out["shards"] = {shard: status_dict(r, wanted) for shard, r in rows.items()}
    paused = {q: state for q, state in (yield from self.store.paused()).items() if queue is None or q == queue}
    out["paused"] = paused
    for name in paused:  # a paused queue is listed, records or not
        out["queues"].setdefault(name, {**dict.fromkeys(wanted, 0), "due": 0, "oldest_pending_age_seconds": None})
    for name, entry in out["queues"].items():
        entry["paused"] = paused.get(name)
    return out


def list_instances(self: Operations, *, include_stopped: bool = False) -> Plan[list[dict[str, Any]]]:
    """Registered instances with their heartbeat and how many records each holds."""
    return (yield from self.store.list_instances(checks.flag("include_stopped", include_stopped)))


def health_check(
    self: Operations,
    *,
    timeout: float = 5.0,
    latency_degraded_ms: float = 250.0,
    pending_age_degraded_s: float | None = None,
) -> Plan[dict[str, Any]]:
    """A health report that never raises: ``status`` is ``healthy``, ``degraded`` or ``unhealthy``.

    Unreachable database, missing schema: unhealthy (with the reason). Slow round trip, callers waiting
    for pool connections, a snapshot or slot holding the MVCC horizon back longer than
    ``horizon_warning_seconds`` (the reason names it), or (optionally) a pending backlog older than
    ``pending_age_degraded_s``: degraded.
    """
    checks.seconds("timeout", timeout, allow_zero=False)
    checks.seconds("latency_degraded_ms", latency_degraded_ms)
    checks.seconds("pending_age_degraded_s", pending_age_degraded_s, allow_none=True)
    return (yield from health_report(
        self.store, self.instance_id, self.facts, timeout=timeout, latency_degraded_ms=latency_degraded_ms,
        pending_age_degraded_s=pending_age_degraded_s, horizon_warning_seconds=self.settings.horizon_warning_seconds))


# ---------------------------------------------------------------------- queue control


def _until(self: Operations, until: object) -> datetime | None:
    if until is None:
        return None
    if isinstance(until, datetime):
        if until.tzinfo is None or until.utcoffset() is None:
            raise InvalidArgument("until must be a timezone-aware datetime, a timedelta or seconds from now")
        return until
    return self._now() + timedelta(seconds=checks.seconds("until", until, allow_zero=False) or 0.0)


def pause(self: Operations, queue: str, *, until: datetime | timedelta | float | None = None,
          reason: str | None = None) -> Plan[None]:
    """Pause ``queue`` on every instance: from their next claim on, no record of it is claimed (records in
    flight finish; records keep being added). ``until`` (a datetime, or a timedelta or seconds from now): it
    resumes by itself then. ``reason`` shows in status and health, where a pause is a state, not a failure."""
    checks.check_queue_name(queue)
    ends = _until(self, until)
    checks.optional_text("reason", reason, max_length=1000)
    yield from self.store.pause(queue, ends, reason)


def resume(self: Operations, queue: str) -> Plan[bool]:
    """Resume a paused ``queue``; its idle workers are woken at once. Returns whether it was paused."""
    checks.check_queue_name(queue)
    return (yield from self.store.resume(queue))


def paused_queues(self: Operations) -> Plan[dict[str, dict[str, Any]]]:
    """The queues paused now: ``{queue: {"since", "until", "reason"}}``."""
    return (yield from self.store.paused())


def _rate(n: object, per: object) -> tuple[int | None, float | None]:
    if n is None:
        return None, None
    return positive_int("n", n), checks.seconds("per", per, allow_zero=False)


def set_queue_rate(self: Operations, queue: str, n: int | None, per: float | timedelta = 1.0) -> Plan[None]:
    """At most ``n`` records of ``queue`` start per ``per`` seconds across all instances, in bursts of up to
    ``n`` (a token bucket in the database, charged by the claim itself); ``None`` removes the rate. Records
    not yet admitted stay pending in their order. Over shards each shard's bucket has ``n / shards``."""
    checks.check_queue_name(queue)
    count, period = _rate(n, per)
    yield from self.store.set_queue_rate(queue, count, period)


def set_key_rate(self: Operations, key_or_pattern: str, n: int | None, per: float | timedelta = 1.0) -> Plan[None]:
    """At most ``n`` records of each matching ordering key start per ``per`` seconds across all instances
    (patterns as in :meth:`set_key_concurrency`: an exact key wins, then the longest glob); ``None`` removes it.
    Other keys' records are not held back."""
    checks.text("key_or_pattern", key_or_pattern, max_length=checks.MAX_KEY)
    count, period = _rate(n, per)
    yield from self.store.set_key_rate(key_or_pattern, count, period)


def rates(self: Operations) -> Plan[dict[str, dict[str, dict[str, float]]]]:
    """The rates set: ``{"queues": {queue: {"n", "per"}}, "keys": {pattern: {"n", "per"}}}``."""
    return (yield from self.store.rates())


def schedule(self: Operations, name: str, *, cron: str | None = None, every: timedelta | float | None = None,
             payload: dict[str, Any] | None = None, queue: str | None = None, timezone: str = "UTC",
             misfire: str = "latest", backfill: timedelta | float | None = None, overlap: str = "allow",
             flow: Any = None, **add_options: Any) -> Plan[dict[str, Any]]:
    """Declare or update the schedule ``name`` (idempotent: every container may declare its schedules at
    start; a changed definition starts from the next tick after now). Returns it as :meth:`list_schedules`.

    ``cron``: five fields, or six with seconds first, in ``timezone`` (a zoneinfo name); or ``every``: an
    interval of at least a second. Each tick adds one record of ``payload`` to ``queue`` (``run_at`` its tick,
    dedupe key ``schedule:<name>:<tick>``), once however many workers run: any running worker fires a due tick
    by one guarded statement, no leader. ``misfire`` for ticks missed while nothing ran: ``"skip"`` (only a
    tick not missed), ``"latest"`` (one record for them), ``"all"`` (every one within ``backfill``).
    ``overlap="skip_if_running"``: no record while the previous one is pending or processing. ``add_options``:
    ``priority``, ``max_attempts``, ``ordering_key`` of the records.
    """
    from core.schedules import ScheduleSpec

    if flow is not None:
        raise InvalidArgument("flow: a schedule adds records, not flow runs; schedule a record whose handler calls "
                              "start_flow")
    spec = ScheduleSpec.check(
        name, cron=cron, every=every, payload=payload, queue=self.settings.queue if queue is None else queue,
        timezone=timezone, misfire=misfire, backfill=backfill, overlap=overlap, flow=None, options=add_options,
        max_payload_bytes=self.settings.max_payload_bytes)
    yield from self.store.declare_schedule(spec)
    found = [s for s in (yield from self.store.list_schedules()) if s["name"] == spec.name]
    return found[0] if found else {}


def unschedule(self: Operations, name: str) -> Plan[bool]:
    """Remove the schedule ``name`` (records it added stay); returns whether it existed."""
    checks.text("name", name, max_length=200)
    return (yield from self.store.remove_schedule(name))


def list_schedules(self: Operations) -> Plan[list[dict[str, Any]]]:
    """Every schedule: ``name``, ``cron`` or ``every``, ``timezone``, ``queue``, ``next_fire``, ``last_fire``,
    ``misfire``, ``backfill``, ``overlap``, ``fired`` (records added), ..."""
    return (yield from self.store.list_schedules())


def fire_due_schedules(self: Operations) -> Plan[int]:
    """Fire the schedules' due ticks now (workers do it on their own; this is for callers without ``run()``);
    each tick fires once whoever fires it. Returns the records added."""
    return (yield from self.store.fire_schedules())
