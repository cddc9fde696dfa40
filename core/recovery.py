"""Recovery: records of expired leases and dead instances back in service; the registry's dead instances;
the sweep that repairs a key left blocked. Safe to run from every instance at once (SKIP LOCKED)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

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
        self._last_batch = 0

    def recover(self) -> int:
        """Recover records whose lease expired or whose instance is dead; returns how many were recovered.

        Records with attempts left go back to ``pending`` (claimable at once), the others to ``failed``.
        """
        recovered = 0
        for step in self.steps():
            recovered += step()
        return recovered

    def steps(self) -> Iterator[Callable[[], int]]:
        """The work of :meth:`recover` as steps of one statement each (each returns how many records it
        recovered): a caller with a heartbeat to keep (the worker's service loop) runs one at a time."""
        s, q = self.db.settings, self.q

        def registry() -> int:
            def op(conn: Conn) -> None:
                dead = conn.execute(q.mark_dead_instances, {"dead_after": s.dead_after}).fetchall()
                if dead:
                    log.warning("instances declared dead", extra={"instances": [r[0] for r in dead]})
                conn.execute(q.prune_instances, {"retention": s.instance_retention})

            self.db.with_retry(op)
            return 0

        def sweep() -> int:
            row = self.db.with_retry(lambda conn: conn.execute(
                q.unblock_sweep, {"after": self._sweep_after, "keys": SWEEP_KEYS}).fetchone())
            if row is not None:
                self._sweep_after = "" if row[0] is None else str(row[0])
                if row[1]:
                    log.info("sweep made key heads claimable", extra={"keys": int(row[1])})
            return 0

        def prune_events() -> int:
            row = self.db.with_retry(lambda conn: conn.execute(q.prune_floor_events, {
                "after": self._events_pruned, "older_than": EVENT_RETENTION, "batch": PRUNE_BATCH}).fetchone())
            if row is not None and row[0] is not None:
                self._events_pruned = int(row[0])
            return 0

        yield registry
        yield sweep
        yield prune_events
        while True:
            yield self.recover_batch
            if self._last_batch < s.cleanup_batch:
                return

    def recover_batch(self) -> int:
        """One bounded batch of orphans back in service (or to failed); how many."""
        rows = self.db.with_retry(lambda conn: conn.execute(
            self.q.recover_orphans, {"batch": self.db.settings.cleanup_batch,
                                     "dead_after": self.db.settings.dead_after}).fetchall())
        self._last_batch = len(rows)
        # A keyed record recovered to failed or cancelled may have been its claimer's last: nobody else would
        # make its key's next record claimable.
        ended = {str(r[2]) for r in rows if r[2] is not None and r[1] in ("failed", "cancelled")}
        if ended:
            self.claims.unblock(ended)
        if rows:
            log.info("recovered orphaned records", extra={"recovered": len(rows)})
        return len(rows)
