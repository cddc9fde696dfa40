"""Maintenance: orphan recovery (expired leases, dead instances, the sweep of blocked keys) and the retention
of finished records; the service loop (:mod:`.service`) runs a round on a jittered interval, so instances
started together do not clean at the same moment."""

from __future__ import annotations

import logging

from core.worker.state import RunState

log = logging.getLogger("core.worker")


class Maintainer:
    def __init__(self, state: RunState) -> None:
        self.s = state

    def maintain(self) -> None:
        """One round: recover orphans, then delete a few batches of finished records past the retention."""
        self.s.store.recover()
        purged = self.s.store.retain()
        if purged:
            log.info("deleted finished records past the retention", extra={"deleted": purged})
