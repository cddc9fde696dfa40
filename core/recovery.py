"""Recovery: records of expired leases and dead instances back in service; the registry's dead instances;
the sweep that repairs a key left blocked. Safe to run from every instance at once (SKIP LOCKED)."""

from __future__ import annotations

import logging

from core.claims import Claims
from core.db import Conn, Database

log = logging.getLogger("core.recovery")

# Keys the maintenance sweep looks at per cleanup (a loose index scan: ~15 ms per 1,000 keys at 1M pending).
SWEEP_KEYS = 1000


# Floor events older than this are pruned (claims read the last EVENT_SETTLE seconds' worth).
EVENT_RETENTION = 60.0
PRUNE_BATCH = 5000


class Recovery:
    """``cleanup_orphaned_records`` against one database."""

    def __init__(self, db: Database, claims: Claims) -> None:
        self.db = db
        self.q = db.q
        self.claims = claims
        self._sweep_after = ""  # where the next maintenance sweep of blocked keys starts ('' = first key)
        self._events_pruned = 0  # the last floor event pruned: the next prune starts after it

    def recover(self) -> int:
        """Recover records whose lease expired or whose instance is dead; returns how many were recovered.

        Records with attempts left go back to ``pending`` (claimable at once), the others to ``failed``.
        """
        ended: set[str] = set()
        recovered = self.db.with_retry(lambda conn: self._recover_on(conn, ended))
        if ended:
            self.claims.unblock(ended)
        if recovered:
            log.info("recovered orphaned records", extra={"recovered": recovered})
        return recovered

    def _recover_on(self, conn: Conn, ended: set[str]) -> int:
        s, q = self.db.settings, self.q
        dead = conn.execute(q.mark_dead_instances, {"dead_after": s.dead_after}).fetchall()
        conn.execute(q.prune_instances, {"retention": s.instance_retention})
        if dead:
            log.warning("instances declared dead", extra={"instances": [r[0] for r in dead]})
        row = conn.execute(q.unblock_sweep, {"after": self._sweep_after, "keys": SWEEP_KEYS}).fetchone()
        if row is not None:
            self._sweep_after = "" if row[0] is None else str(row[0])
            if row[1]:
                log.info("sweep made key heads claimable", extra={"keys": int(row[1])})
        row = conn.execute(q.prune_floor_events, {"after": self._events_pruned, "older_than": EVENT_RETENTION,
                                                   "batch": PRUNE_BATCH}).fetchone()
        if row is not None and row[0] is not None:
            self._events_pruned = int(row[0])
        total = 0
        while True:
            rows = conn.execute(q.recover_orphans, {"batch": s.cleanup_batch}).fetchall()
            total += len(rows)
            # A keyed record recovered to failed or cancelled may have been its claimer's last: nobody else
            # would make its key's next record claimable.
            ended.update(str(r[2]) for r in rows if r[2] is not None and r[1] in ("failed", "cancelled"))
            if len(rows) < s.cleanup_batch:
                break
        return total
