"""Operator actions (cancel, retry_failed, purge), admission settings (key limits, queue limits) and the
instance registry, against one database."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from core.claims import Claims
from core.constants import VERSION
from core.db import Database
from core.instance import ProcessFacts
from core.plans import Plan, Stmt, on, run


def glob_to_like(pattern: str) -> str:
    """Translate a glob (``*``, ``?``) into a LIKE pattern, escaping LIKE's own wildcards."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?")


class Admin:
    def __init__(self, db: Database, claims: Claims, facts: ProcessFacts) -> None:
        self.db = db
        self.q = db.q
        self.claims = claims
        self.facts = facts

    # ------------------------------------------------------------------ operator actions

    def cancel(self, ids: list[int]) -> Plan[dict[int, str]]:
        """Pending and failed records cancelled at once, processing ones flagged; ``{id: status after}``."""
        if not ids:
            return {}
        rows = yield from on(self.db, Stmt(self.q.cancel, {"ids": ids}))
        yield from self.claims.unblock_plan({str(r[2]) for r in rows if r[2] is not None and r[1] == "cancelled"})
        return {int(r[0]): str(r[1]) for r in rows}

    def retry_failed(self, ids: list[int] | None, queue: str | None, pattern: str | None, batch: int) -> Plan[int]:
        params = {"ids": ids, "queue": queue, "pattern": pattern, "batch": batch}
        total = 0
        while True:
            n: int = yield from on(self.db, Stmt(self.q.retry_failed, params, "rowcount"))
            total += n
            if n < batch:  # with ids too: more ids than a batch take several
                return total

    def purge(self, older_than: float, batch: int, max_batches: int | None) -> Plan[int]:
        params = {"older_than": older_than, "batch": batch}
        total, rounds = 0, 0
        while max_batches is None or rounds < max_batches:
            n: int = yield from on(self.db, Stmt(self.q.purge, params, "rowcount"))
            total += n
            rounds += 1
            if n < batch:
                break
        return total

    def purge_steps(self, older_than: float, batch: int, max_batches: int | None) -> Iterator[Callable[[], int]]:
        """The batches of :meth:`purge`, one statement per step (each returns how many rows it deleted)."""
        params = {"older_than": older_than, "batch": batch}
        last = [batch]

        def one() -> int:
            last[0] = run(on(self.db, Stmt(self.q.purge, params, "rowcount")))
            return last[0]

        rounds = 0
        while (max_batches is None or rounds < max_batches) and last[0] >= batch:
            yield one
            rounds += 1

    # ------------------------------------------------------------------ admission settings

    def set_key_concurrency(self, pattern: str, n: int | None, block_on_failure: bool) -> Plan[None]:
        exact = not is_glob(pattern)
        if n is None:
            yield from on(self.db, Stmt(self.q.delete_key_concurrency, {"pattern": pattern}, "none"))
        else:
            params = {
                "pattern": pattern,
                "like_pattern": glob_to_like(pattern),
                "is_exact": exact,
                "n": n,
                "block_on_failure": block_on_failure,
            }
            yield from on(self.db, Stmt(self.q.set_key_concurrency, params, "none"))
        if exact:
            # A key stopped by a failure under block_on_failure had its later records blocked: if it no longer
            # blocks, the next one may go now (a no-op otherwise: the claim still checks the setting). For a
            # pattern, the maintenance sweep gets to each matching key in its turn.
            yield from self.claims.unblock_plan({pattern})

    def set_queue_limit(self, queue: str, n: int | None) -> Plan[None]:
        if n is None:
            yield from on(self.db, Stmt(self.q.delete_queue_limit, {"queue": queue}, "none"))
            return
        yield from on(self.db, Stmt(self.q.set_queue_limit, {"queue": queue, "n": n}, "none"))

    # ------------------------------------------------------------------ registry

    def register(self, metadata: dict[str, Any] | None) -> None:
        """Add (or revive) this instance in ``processor_instances`` as ``running``."""
        facts = self.facts.snapshot()
        params = {
            "instance_id": self.db.settings.instance_id,
            "hostname": facts["hostname"],
            "pid": facts["pid"],
            "version": VERSION,
            "metadata": json.dumps(metadata or {}),
        }
        self.db.with_retry(lambda conn: conn.execute(self.q.register_instance, params))

    def set_instance_status(self, status: str) -> None:
        params = {"instance_id": self.db.settings.instance_id, "status": status}
        self.db.with_retry(lambda conn: conn.execute(self.q.set_instance_status, params))
