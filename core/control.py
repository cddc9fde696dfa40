"""Queue control against one database: pause and resume, rate limits. The claim statement obeys them itself
(``core/sql/claims.sql``: a paused queue gives nothing; a rate-limited queue no more than its bucket's tokens;
a rate-limited key's record starts only with a token), so every instance obeys them from its next claim, and
no message can be missed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.admin import glob_to_like, is_glob
from core.db import Database
from core.plans import Plan, Stmt, on
from core.queries import channel_for
from core.schema import RATE_SLOTS


class Control:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.q = db.q

    def pause(self, queue: str, until: datetime | None, reason: str | None) -> Plan[None]:
        yield from on(self.db, Stmt(self.q.pause_queue, {"queue": queue, "until": until, "reason": reason}, "one"))

    def resume(self, queue: str) -> Plan[bool]:
        channel = channel_for(self.db.settings.schema, queue)
        row = yield from on(self.db, Stmt(self.q.resume_queue, {"queue": queue, "channel": channel}, "one"))
        return bool(row and row[0])

    def paused(self) -> Plan[dict[str, dict[str, Any]]]:
        rows = yield from on(self.db, Stmt(self.q.paused_queues))
        return {str(q): {"since": since, "until": until, "reason": reason} for q, since, until, reason in rows}

    def set_queue_rate(self, queue: str, n: float | None, per: float | None) -> Plan[None]:
        if n is None or per is None:
            yield from on(self.db, Stmt(self.q.delete_queue_rate, {"queue": queue}, "none"))
            return
        # slots of at least one token each (a slot's burst is n / slots): a rate of 3 has 3 slots
        slots = max(1, min(RATE_SLOTS, int(n)))
        params = {"queue": queue, "n": n, "per": per, "slots": slots}
        yield from on(self.db, Stmt(self.q.set_queue_rate, params, "none"))

    def set_key_rate(self, pattern: str, n: int | None, per: float | None) -> Plan[None]:
        if n is None or per is None:
            yield from on(self.db, Stmt(self.q.delete_key_rate, {"pattern": pattern}, "none"))
            return
        params = {"pattern": pattern, "like_pattern": glob_to_like(pattern), "is_exact": not is_glob(pattern),
                  "n": n, "per": per}
        yield from on(self.db, Stmt(self.q.set_key_rate, params, "none"))

    def rates(self) -> Plan[dict[str, dict[str, dict[str, float]]]]:
        rows = yield from on(self.db, Stmt(self.q.rates))
        out: dict[str, dict[str, dict[str, float]]] = {"queues": {}, "keys": {}}
        for scope, name, n, per in rows:
            out["queues" if scope == "queue" else "keys"][str(name)] = {"n": float(n), "per": float(per)}
        return out
