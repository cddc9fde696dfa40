"""Maintenance: orphan recovery (expired leases, dead instances, the sweep of blocked keys) and the retention
of finished records, a round on a jittered interval (instances started together do not clean at the same
moment), one statement at a time: the service loop (:mod:`.service`) runs a step whenever no heartbeat is
due, so a long round over a slow link never makes a heartbeat late."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator

from core.worker.state import RunState

log = logging.getLogger("core.worker")


class Maintainer:
    def __init__(self, state: RunState) -> None:
        self.s = state
        # A random first delay spreads the cleaners of instances started together.
        self.next_round = time.monotonic() + state.settings.cleanup_interval * random.uniform(0.1, 1.0)
        self._steps: Iterator[Callable[[], int]] | None = None

    @property
    def busy(self) -> bool:
        """A round is under way: its next step should follow at once."""
        return self._steps is not None

    def step(self) -> None:
        """Run the next step of the current round, or start a round when one is due."""
        if self._steps is None:
            if time.monotonic() < self.next_round:
                return
            self._steps = iter(self.s.store.maintenance())
        step = next(self._steps, None)
        if step is None:
            self._steps = None
            self.next_round = time.monotonic() + self.s.settings.cleanup_interval * random.uniform(0.8, 1.2)
            return
        try:
            n = step()
            metric = getattr(step, "metric", None)  # a step whose result is counted (core.flows.store.CountedStep)
            if metric is not None and n:
                self.s.metrics.count(metric, n)
        except BaseException:
            self._steps = None  # a failed round starts afresh next time
            self.next_round = time.monotonic() + min(1.0, self.s.settings.cleanup_interval)
            raise
