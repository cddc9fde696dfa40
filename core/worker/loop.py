"""The worker loop behind ``run()``: wires the roles, handles signals, drains and shuts down.

One role per thread, each with its own stop condition:

* claimers (the calling thread and ``claimers - 1`` more) claim while there is room (:mod:`.claimer`);
* handler threads run handlers, or one event-loop thread runs coroutine handlers (:mod:`.executor`);
* the completer writes outcomes in batches, one fenced statement per batch (:mod:`.completer`);
* the service loop (:mod:`.service`), on the run's one service connection: heartbeats extend the leases of
  every held record and the instance's heartbeat (:mod:`.heartbeat`), maintenance recovers orphaned records
  and applies the retention (:mod:`.maintainer`), and NOTIFY turns into wake-ups in between; a jittered poll
  runs regardless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from core.backend import Listener, WorkerStore
from core.config import Settings
from core.errors import DatabaseUnavailable
from core.metrics import Metrics
from core.worker.claimer import Claimer
from core.worker.completer import Completer
from core.worker.executor import Executor, is_handler_thread
from core.worker.heartbeat import Heartbeat
from core.worker.maintainer import Maintainer
from core.worker.scheduler import Scheduler
from core.worker.service import Service
from core.worker.signals import SignalDrain
from core.worker.state import Held, RunOptions, RunState, RunSummary
from core.worker.wake import Wake

log = logging.getLogger("core.worker")


class Worker(SignalDrain):
    """Runs a handler over claimed records until stopped. Use through ``DistributedProcessor.run``."""

    def __init__(self, store: WorkerStore, settings: Settings, metrics: Metrics, options: RunOptions) -> None:
        self.state = s = RunState(store, settings, metrics, options)
        self.store = store
        self.options = options
        self._threads: list[threading.Thread] = []
        self.completer = Completer(s)
        self.executor = Executor(s, self.completer, self._spawn)
        self.claimer = Claimer(s, self.completer, self.executor)
        self.heartbeat = Heartbeat(s, self.completer)
        self.maintainer = Maintainer(s)
        self.scheduler = Scheduler(s)
        self.service = Service(s, self.heartbeat, self.maintainer, self.scheduler)
        self.listener: Listener | None = store.listener

    # ------------------------------------------------------------------ what callers and probes see

    @property
    def summary(self) -> RunSummary:
        return self.state.summary

    @property
    def started(self) -> threading.Event:
        return self.state.started

    @property
    def finished(self) -> threading.Event:
        return self.state.finished

    @property
    def stopping(self) -> threading.Event:
        return self.state.stopping

    @property
    def wake(self) -> Wake:
        return self.state.wake

    @property
    def _ready(self) -> deque[Held]:
        return self.state.ready

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop claiming; let in-flight records finish for ``grace_seconds``, then release the rest."""
        self.state.stop(grace_seconds)

    def abort(self) -> None:
        """End the grace period now: release held records at once."""
        self.state.abort()

    def held_count(self) -> int:
        return self.state.held_count()

    def ticked_within(self, seconds: float) -> bool:
        return time.monotonic() - self.state.last_tick <= seconds

    # ------------------------------------------------------------------ run

    def run(self) -> RunSummary:
        s = self.state
        started = time.monotonic()
        with self.handling_signals(self.options.handle_signals, self.options.grace_seconds):
            try:
                self._start_services()
                s.started.set()
                instance = s.settings.instance_id
                extra = [
                    threading.Thread(target=self.claimer.run, name=f"dp-claimer-{i}-{instance}", daemon=True)
                    for i in range(1, s.claimers)
                ]
                for t in extra:
                    t.start()
                self.claimer.run()
                for t in extra:
                    t.join(30)
                self._drain()
                self.completer.flush_unblock()
            finally:
                self._shutdown()
                s.summary.elapsed = time.monotonic() - started
                s.finished.set()
        return s.summary

    def _start_services(self) -> None:
        # The service connection is the main thread's until the service loop starts (and after it ends).
        self.store.check_budget()
        if self.options.register:
            self.store.register(self.options.metadata)
        self.executor.start()
        self._spawn("dp-completer", self.completer.run)
        self._spawn("dp-service", self.service.run)

    def _spawn(self, name: str, target: Callable[[], Any]) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.state.settings.instance_id}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------ shutdown

    def _drain(self) -> None:
        """Release records not yet started at once; let running handlers finish until the grace deadline;
        then release whatever is still held (its late result is fenced out)."""
        s = self.state
        with s.lock:
            deadline = s.grace_deadline if s.grace_deadline is not None else time.monotonic()
        self._release(unstarted_only=True)
        while not s.aborted.is_set() and s.held_count() and time.monotonic() < deadline:
            s.last_tick = time.monotonic()
            # No claim will carry finished records any more: write them here.
            seen = s.wake.generation
            self.completer.flush_done()
            s.wake.wait_since(seen, 0.05)
        s.aborted.set()
        self._release(unstarted_only=False)

    def _release(self, *, unstarted_only: bool) -> None:
        s = self.state
        with s.lock:
            helds = [
                h for h in s.held.values()
                if not h.abandoned and not h.finished and not h.completing
                and (not unstarted_only or h.started is None)
            ]
            for h in helds:
                h.abandoned = True
                s.held.pop(h.record.id, None)
        if not helds:
            return
        try:
            n = self.store.release([h.record for h in helds], "released on shutdown")
            s.count(released=n)
            log.info("released records on shutdown", extra={"released": n})
        except DatabaseUnavailable as exc:
            log.error("could not release records; recovery will", extra={"error": str(exc)})

    def _shutdown(self) -> None:
        s = self.state
        s.stopping.set()
        s.outcomes.put(None)
        with s.ready_cv:
            s.ready.clear()
            s.ready_cv.notify_all()
        for t in self._threads:
            if t.name.startswith("dp-completer"):
                t.join(timeout=10)
        s.finished.set()
        self.store.interrupt()
        with s.ready_cv:
            s.ready_cv.notify_all()
        self.executor.stop()
        for t in self._threads:
            if is_handler_thread(t):
                continue  # a handler that ignored the grace period keeps its (daemon) thread; do not wait
            t.join(timeout=5)
        if self.options.register:
            try:
                self.store.set_instance_status("stopped")
            except DatabaseUnavailable as exc:
                log.warning("could not deregister", extra={"error": str(exc)})
