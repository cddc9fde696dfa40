"""Maintenance: orphan recovery (expired leases, dead instances, the sweep of blocked keys) on a jittered
interval, so instances started together do not clean at the same moment."""

from __future__ import annotations

import logging
import random

from core.errors import DatabaseUnavailable
from core.worker.state import RunState

log = logging.getLogger("core.worker")


class Maintainer:
    def __init__(self, state: RunState) -> None:
        self.s = state

    def run(self) -> None:
        s = self.s
        interval = s.settings.cleanup_interval
        # A random first delay spreads the cleaners of instances started together.
        wait = interval * random.uniform(0.1, 1.0)
        while not s.finished.wait(wait):
            try:
                s.store.recover()
                purged = s.store.retain()
                if purged:
                    log.info("deleted finished records past the retention", extra={"deleted": purged})
            except DatabaseUnavailable as exc:
                log.warning("cleanup failed", extra={"error": str(exc)})
            except Exception:
                log.exception("cleanup error")
            wait = interval * random.uniform(0.8, 1.2)
