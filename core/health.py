"""Observation: counts per queue and status, the health report, the instance list.

None of it counts finished rows: pending and processing are read through their partial indexes, finished
counts come from the trigger-maintained ``queue_stats``, so every call stays cheap at 10 million rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from core.backend import CountRow, Store
from core.constants import STATUSES
from core.db import Database
from core.dsn import redact
from core.errors import DatabaseUnavailable
from core.instance import ProcessFacts
from core.plans import Plan, PoolStats, Stmt, Transaction, on, transaction

_INSTANCE_COLUMNS = (
    "instance_id", "hostname", "pid", "version", "started_at", "last_heartbeat_at", "stopped_at",
    "status", "metadata", "processing",
)


def status_dict(rows: Sequence[CountRow], wanted: Sequence[str]) -> dict[str, Any]:
    """The shape of ``get_queue_status()``: per queue, the wanted counts, ``due`` and the oldest pending age."""
    queues: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return queues.setdefault(name, {**{s: 0 for s in wanted}, "due": 0, "oldest_pending_age_seconds": None})

    for name, status, n, age, due in rows:
        if status not in ("pending", "processing") and not (status in wanted and n):
            continue  # a finished count of zero does not make a queue appear
        e = entry(name)
        if status in wanted:
            e[status] = int(n)
        if status == "pending":
            e["due"] = int(due)
            e["oldest_pending_age_seconds"] = float(age) if age is not None else None
    totals = {s: sum(q[s] for q in queues.values()) for s in wanted}
    ages = [q["oldest_pending_age_seconds"] for q in queues.values() if q["oldest_pending_age_seconds"]]
    return {"queues": queues, "totals": totals, "oldest_pending_age_seconds": max(ages) if ages else None}


def holder_text(holder: dict[str, Any]) -> str:
    """The holder of a pinned horizon in words: what it is and how long it has held it."""
    age = f"{holder['age_seconds']:.0f}s"
    if holder["kind"] == "slot":
        return f"replication slot {holder['name']!r} (seen holding it for {age})"
    if holder["kind"] == "prepared":
        return f"prepared transaction {holder['name']!r} (prepared {age} ago)"
    if holder["kind"] == "walsender":
        return f"walsender pid {holder['pid']} (hot_standby_feedback; seen holding it for {age})"
    return f"backend pid {holder['pid']} ({holder['application_name'] or 'no application_name'}, {age})"


def health_report(
    store: Store,
    instance_id: str,
    facts: ProcessFacts,
    *,
    timeout: float,
    latency_degraded_ms: float,
    pending_age_degraded_s: float | None,
    horizon_warning_seconds: float | None = None,
) -> Plan[dict[str, Any]]:
    """The report of ``health_check()``; never raises (an exception is the reason it is unhealthy)."""
    report: dict[str, Any] = {
        "status": "unhealthy",
        "instance": {"instance_id": instance_id, **facts.snapshot()},
        "database": {"reachable": False},
        "reasons": [],
        "checked_at": datetime.now(timezone.utc).isoformat(),
    }
    reasons: list[str] = report["reasons"]
    try:
        rows = yield from store.probe(report, timeout)
        if rows is None:
            return report
        report["queues"] = status_dict(rows, STATUSES)
        # A pause is a state the report lists, with its reason, not a failure.
        report["paused"] = yield from store.paused()
        # A flow record waiting although none of its parents is unfinished must never happen (their settle
        # commits with the parent's end): reported, never silent; the maintenance sweep repairs it.
        defects = yield from store.flow_defects()
        report["flows"] = {"defects": len(defects), "defect_ids": defects[:20]}
        if defects:
            reasons.append(f"{len(defects)} flow records wait although none of their parents is unfinished (ids "
                           f"{', '.join(map(str, defects[:5]))}): maintenance repairs them")
        latency_ms = report["database"].get("latency_ms", 0.0)
        if latency_ms > latency_degraded_ms:
            reasons.append(f"database round trip {latency_ms:.0f} ms > {latency_degraded_ms:g} ms")
        if report.get("pool", {}).get("requests_waiting", 0) > 0:
            reasons.append("callers are waiting for pool connections")
        age = report["queues"]["oldest_pending_age_seconds"]
        if pending_age_degraded_s is not None and age is not None and age > pending_age_degraded_s:
            reasons.append(f"oldest pending record is {age:.0f}s old")
        horizon = report.get("horizon") or {}
        holder = horizon.get("holder")
        if horizon_warning_seconds is not None and holder and holder["age_seconds"] > horizon_warning_seconds:
            reasons.append(f"MVCC horizon held back for {holder['age_seconds']:.0f}s > {horizon_warning_seconds:g}s"
                           f" by {holder_text(holder)}; {horizon.get('dead_tuples')} dead row versions in the"
                           " queue table")
        report["status"] = "degraded" if reasons else "healthy"
    except Exception as exc:  # a health probe reports, it never raises
        reasons.append(f"{type(exc).__name__}: {redact(str(exc)).strip()}")
        report["status"] = "unhealthy"
    return report


HOLDER_COLUMNS = ("kind", "pid", "application_name", "name", "age_seconds", "xid_age")


class Health:
    """Observation statements of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q
        # When this process first saw a walsender's or a slot's xmin: the server keeps no time for those.
        self._first_seen: dict[tuple[str, str, str], float] = {}

    def counts(self, queue: str | None) -> Plan[list[CountRow]]:
        return (yield from on(self.db, lambda: self._counts_on(queue)))

    def _counts_on(self, queue: str | None) -> Plan[list[CountRow]]:
        active = yield Stmt(self.q.queue_status_active, {"queue": queue})
        finished = yield Stmt(self.q.queue_status_finished, {"queue": queue})
        return [(str(r[0]), str(r[1]), int(r[2]), r[3], int(r[4])) for r in active] + [
            (str(r[0]), str(r[1]), int(r[2]), None, 0) for r in finished]

    def list_instances(self, include_stopped: bool) -> Plan[list[dict[str, Any]]]:
        rows = yield from on(self.db, Stmt(self.q.list_instances, {"include_stopped": include_stopped}))
        return [dict(zip(_INSTANCE_COLUMNS, row, strict=False)) for row in rows]

    def probe(self, report: dict[str, Any], timeout: float) -> Plan[list[CountRow] | None]:
        """The database part of the health report, within ``timeout`` seconds in all."""
        db = self.db
        report["database"].update(**db.target(), schema=db.settings.schema)
        deadline = time.monotonic() + timeout
        report["pool"] = yield PoolStats(db)
        try:
            return (yield from on(db, lambda: self._probe_once(report, deadline), attempts=1,
                                  timeout=max(timeout, 0.1)))
        except DatabaseUnavailable as exc:
            # A pooled connection the server has since closed fails on first use: that says nothing about
            # the database (its peers are likely broken too, all cut at once), so the probe asks once more
            # on a connection known good, as long as time is left.
            if not exc.retryable or time.monotonic() >= deadline:
                raise
            yield PoolStats(db, check=True)  # drops every idle connection that is broken too
            return (yield from on(db, lambda: self._probe_once(report, deadline), attempts=1,
                                  timeout=max(deadline - time.monotonic(), 0.1)))

    def _probe_once(self, report: dict[str, Any], deadline: float) -> Plan[list[CountRow] | None]:
        db, q = self.db, self.q
        started = time.perf_counter()
        facts = yield Transaction(self._limited(deadline, Stmt(q.server_facts, {"table": q.records_table}, "one")))
        latency_ms = (time.perf_counter() - started) * 1000
        assert facts is not None
        report["database"].update(
            reachable=True, latency_ms=round(latency_ms, 3), server_version=facts[0], migrated=facts[1]
        )
        if not facts[1]:
            report["reasons"].append(f"schema {db.settings.schema!r} is not migrated")
            return None

        def counts_and_horizon() -> Plan[list[CountRow]]:
            counts = yield from self._counts_on(None)
            report["horizon"] = yield from self._horizon_on()
            return counts

        counts: list[CountRow] = yield from transaction(self._limited(deadline, counts_and_horizon()))
        return counts

    def _limited(self, deadline: float, body: Plan[Any] | Stmt) -> Plan[Any]:
        """``body`` under a statement timeout of what is left of ``deadline`` (for the transaction)."""
        remaining = max(0.1, deadline - time.monotonic())
        yield Stmt(self.q.local_statement_timeout, {"ms": str(int(remaining * 1000))}, "none")
        if isinstance(body, Stmt):
            return (yield body)
        return (yield from body)

    def horizon(self) -> Plan[dict[str, Any]]:
        """Who holds back the database's MVCC horizon, and for how long (the oldest holder first)."""
        return (yield from on(self.db, self._horizon_on))

    def _horizon_on(self) -> Plan[dict[str, Any]]:
        now = time.monotonic()
        holders = []
        seen = set()
        for kind, pid, app, name, age, xid_age, xmin in (yield Stmt(self.q.horizon_holders)):
            if age is None:  # a walsender or a slot: its age is how long this process has seen that xmin
                key = (str(kind), str(name if kind == "slot" else pid), str(xmin))
                seen.add(key)
                age = now - self._first_seen.setdefault(key, now)
            holders.append(dict(zip(HOLDER_COLUMNS, (kind, pid, app, name, round(float(age), 3), int(xid_age)),
                                    strict=True)))
        for key in [k for k in self._first_seen if k not in seen]:
            del self._first_seen[key]
        tuples = yield Stmt(self.q.table_tuples, {"table": self.q.records_table}, "one")
        oldest = max(holders, key=lambda h: h["age_seconds"], default=None)
        return {
            "age_seconds": oldest["age_seconds"] if oldest else 0.0,
            "holder": oldest,
            "holders": holders,
            "live_tuples": int(tuples[0]) if tuples else None,
            "dead_tuples": int(tuples[1]) if tuples else None,
            "last_autovacuum": tuples[2].isoformat() if tuples and tuples[2] else None,
        }

    def ready(self) -> tuple[bool, str | None]:
        """Readiness: the database answers and is migrated."""
        try:
            with self.db.borrow(timeout=2.0) as conn:
                row = conn.execute(self.q.server_facts, {"table": self.q.records_table}).fetchone()
        except Exception as exc:
            return False, f"database unreachable: {type(exc).__name__}"
        if not row or not row[1]:
            return False, "schema not migrated"
        return True, None
