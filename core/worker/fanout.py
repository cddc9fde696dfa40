"""One ``run()`` over several shards: a :class:`~core.worker.loop.Worker` per shard, each with claimers,
handler threads and a service loop of its own, so a shard that is down stalls only its own worker (docs/
scale-out.md). Signals and ``stop()`` reach every worker; the summaries add up.

A shard unreachable when the run starts has its worker started again with a capped backoff until it answers
(or the run stops); one that goes down later is waited out by its worker, as a single database would be.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from core.errors import DatabaseUnavailable, SchemaNotMigrated
from core.worker.loop import Worker
from core.worker.signals import SignalDrain
from core.worker.state import RunOptions, RunSummary

log = logging.getLogger("core.worker")

RESTART_DELAYS = (0.5, 10.0)  # first and longest wait before a shard's worker is started again


class Fanout(SignalDrain):
    """The workers of one run over shards: the same surface as a :class:`Worker` for callers and probes."""

    listener = None  # each shard's worker listens on its own connection

    def __init__(self, makers: Sequence[Callable[[RunOptions], Worker]], options: RunOptions) -> None:
        self.options = options
        # Signals are handled here, once; each worker sees the run's stop event and this one's stop().
        self._inner = dataclasses.replace(options, handle_signals=False)
        self._makers = list(makers)
        self.workers: list[Worker | None] = [None] * len(self._makers)
        self.started = threading.Event()
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self._grace: float | None = None
        self._aborted = False
        self._lock = threading.Lock()
        self._summary = RunSummary()
        self._errors: list[BaseException] = []

    @property
    def summary(self) -> RunSummary:
        out = dataclasses.replace(self._summary)
        for w in self.workers:
            if w is not None and not w.finished.is_set():
                _add(out, w.summary)
        return out

    def stop(self, grace_seconds: float | None = None) -> None:
        with self._lock:
            self.stopping.set()
            self._grace = grace_seconds
            workers = [w for w in self.workers if w is not None]
        for w in workers:
            w.stop(grace_seconds)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            workers = [w for w in self.workers if w is not None]
        for w in workers:
            w.abort()

    def held_count(self) -> int:
        return sum(w.held_count() for w in self.workers if w is not None)

    def ticked_within(self, seconds: float) -> bool:
        live = [w for w in self.workers if w is not None and not w.finished.is_set()]
        return all(w.ticked_within(seconds) for w in live)

    def _stopped(self) -> bool:
        event = self.options.stop_event
        return self.stopping.is_set() or (event is not None and event.is_set())

    def run(self) -> RunSummary:
        threads = [threading.Thread(target=self._run_shard, args=(i,), name=f"dp-shard-{i}", daemon=True)
                   for i in range(len(self._makers))]
        try:
            with self.handling_signals(self.options.handle_signals, self.options.grace_seconds):
                for t in threads:
                    t.start()
                self.started.set()
                for t in threads:
                    while t.is_alive():  # joined in slices: the main thread must be free to take a signal
                        t.join(0.2)
        finally:
            self.finished.set()
        if self._errors:
            raise self._errors[0]
        return self._summary

    def _run_shard(self, i: int) -> None:
        delay = RESTART_DELAYS[0]
        wait = threading.Event()
        while True:
            worker = self._makers[i](self._inner)
            with self._lock:
                self.workers[i] = worker
                if self.stopping.is_set():
                    worker.stop(self._grace)
                if self._aborted:
                    worker.abort()
            try:
                summary = worker.run()
            except (DatabaseUnavailable, SchemaNotMigrated) as exc:  # not reachable, or not set up yet: later
                with self._lock:
                    _add(self._summary, worker.summary)
                log.warning("a shard's worker could not start; starting it again", extra={
                    "shard_index": i, "retry_in": delay, "error": str(exc)[:300]})
                slept = 0.0
                while slept < delay and not self._stopped():  # a stop ends the wait within a quarter second
                    wait.wait(0.25)
                    slept += 0.25
                delay = min(RESTART_DELAYS[1], delay * 2)
                if self._stopped():
                    return
                continue
            except BaseException as exc:
                with self._lock:
                    self._errors.append(exc)
                self.stop()
                return
            with self._lock:
                _add(self._summary, summary)
            return


def _add(total: RunSummary, part: RunSummary) -> None:
    for f in dataclasses.fields(RunSummary):
        if f.name == "elapsed":
            total.elapsed = max(total.elapsed, part.elapsed)
        else:
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
