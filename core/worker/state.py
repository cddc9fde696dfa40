"""What the roles of one ``run()`` share: the records held, the counters, the stop events, the wake-up."""

from __future__ import annotations

import contextvars
import queue as queue_mod
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from core.backend import WorkerStore
from core.config import Settings
from core.errors import ProcessorError
from core.floors import Floors
from core.metrics import Metrics
from core.record import Record
from core.worker.wake import Wake

Handler = Callable[..., Any]

# A record held for a handler should start within this share of its lease (heartbeats extend it meanwhile,
# but no record should depend on them for long): the prefetch is bounded by the measured handler rate.
PREFETCH_LEASE_SHARE = 0.25


class HandlerTimeout(ProcessorError, TimeoutError):
    """A handler ran longer than its per-record timeout; the record was failed and its late result fenced."""


class LeaseLost(ProcessorError):
    """The record's lease was lost before its completion could be written."""


class RecordCancelled(ProcessorError):
    """Raised by :meth:`RunContext.raise_if_cancelled` when ``cancel()`` flagged the running record."""


@dataclass
class RunSummary:
    """What a ``run()`` did."""

    claimed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    lost_leases: int = 0
    released: int = 0
    timed_out: int = 0
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunOptions:
    """The parameters of one ``run()``, checked by the facade (their defaults are ``run()``'s)."""

    handler: Handler
    concurrency: int
    queues: list[str]
    stop_when_empty: bool
    stop_event: threading.Event | None
    transactional: bool
    handler_timeout: float | None
    poll_interval: float
    listen: bool
    handle_signals: bool
    grace_seconds: float
    prefetch: int | None
    register: bool
    metadata: dict[str, Any]
    claimers: int
    trace_parent: str = "link"  # with OpenTelemetry: the stored trace context links ("link") or parents ("child")


class Held:
    """A record this instance holds, with its local state (plain slots: this is on the per-record path)."""

    __slots__ = ("abandoned", "cancel_requested", "completing", "finished", "record", "started")

    def __init__(self, record: Record) -> None:
        self.record = record
        self.started: float | None = None
        self.cancel_requested = record.cancel_requested
        self.abandoned = False  # timed out or released: a late result must be ignored
        self.completing = False  # our own outcome write is under way: a heartbeat miss is not a lost lease
        self.finished = False  # the handler returned: its outcome is queued, never release it


class Outcome:
    __slots__ = ("error", "held")

    def __init__(self, held: Held, error: BaseException | None) -> None:
        self.held = held
        self.error = error


# The record a handler is running: a context variable, so it works for threads and asyncio tasks alike.
current: contextvars.ContextVar[Held | None] = contextvars.ContextVar("dp_current_record", default=None)


def current_record_cancelled() -> bool:
    """Inside a handler: whether ``cancel()`` flagged the record it is running (seen at the next heartbeat)."""
    held = current.get()
    return bool(held and held.cancel_requested)


class RunState:
    """The shared memory of one run: every role reads and writes it under ``lock`` (``ready_cv`` for the
    hand-off queue). Nothing here talks to the database."""

    def __init__(self, store: WorkerStore, settings: Settings, metrics: Metrics, options: RunOptions) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.options = options
        self.claimers = max(1, options.claimers)
        # Hold at most what is running plus a prefetch (default one batch per claimer in flight, one being
        # handed to handlers and one whose outcomes are being written). Every held record is heartbeated, so
        # none expires while it waits; and no new claim starts while a whole batch still waits for a handler,
        # so slow handlers never hoard records that idle instances could take.
        prefetch = options.prefetch
        self.capacity_limit = options.concurrency + (
            (2 + self.claimers) * settings.batch_size if prefetch is None else prefetch)
        # Moving average of one handler call (seconds), measured by the executor; None until the first.
        self.handler_avg: float | None = None
        self.summary = RunSummary()
        self.stopping = threading.Event()  # no new claims
        self.aborted = threading.Event()  # grace over: release what is still held
        self.started = threading.Event()
        self.finished = threading.Event()
        self.wake = Wake()
        self.last_tick = time.monotonic()
        self.lock = threading.Lock()
        self.held: dict[int, Held] = {}
        self.outcomes: queue_mod.SimpleQueue[Outcome | None] = queue_mod.SimpleQueue()
        # Records claimed and waiting for a handler thread, in claim order.
        self.ready: deque[Held] = deque()
        self.ready_cv = threading.Condition(threading.Lock())
        self.claiming = 0  # claim statements under way whose records are not dispatched yet
        self.grace_deadline: float | None = None
        # Where this run's claims start (core/floors.py), shared by its claimers.
        self.floors = Floors()

    def capacity(self) -> int:
        """How many records the run may hold: those running, and a prefetch that can start within a share of
        the lease at the measured handler rate (nothing measured yet: only what can start at once)."""
        concurrency = self.options.concurrency
        avg = self.handler_avg
        if avg is None:
            return min(self.capacity_limit, concurrency)
        startable = concurrency / max(avg, 1e-7) * self.settings.lease_seconds * PREFETCH_LEASE_SHARE
        return int(min(self.capacity_limit, concurrency + max(1.0, startable)))

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` handler calls took ``seconds`` on average."""
        avg = self.handler_avg
        weight = min(1.0, 0.3 * n)
        self.handler_avg = seconds if avg is None else (1 - weight) * avg + weight * seconds

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop claiming; let in-flight records finish for ``grace_seconds``, then release the rest."""
        grace = self.options.grace_seconds if grace_seconds is None else grace_seconds
        with self.lock:
            if self.grace_deadline is None:
                self.grace_deadline = time.monotonic() + grace
        self.stopping.set()
        self.wake.set()

    def abort(self) -> None:
        """End the grace period now: release held records at once."""
        self.stopping.set()
        self.aborted.set()
        self.wake.set()

    def should_stop(self) -> bool:
        external = self.options.stop_event
        if external is not None and external.is_set() and not self.stopping.is_set():
            self.stop()
        return self.stopping.is_set()

    def held_count(self) -> int:
        with self.lock:
            return len(self.held)

    def forget(self, held: Held) -> None:
        with self.lock:
            self.held.pop(held.record.id, None)

    def count(self, **deltas: int) -> None:
        with self.lock:
            for name, n in deltas.items():
                setattr(self.summary, name, getattr(self.summary, name) + n)
