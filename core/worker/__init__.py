"""The worker loop behind :meth:`DistributedProcessor.run`, one module per role (see :mod:`.loop`).

It depends on the narrow :class:`core.backend.WorkerStore` interface, never on the facade, so the same loop
runs over any store that offers it.
"""

from __future__ import annotations

from core.worker.loop import Worker
from core.worker.state import (
    Handler,
    HandlerTimeout,
    LeaseLost,
    RecordCancelled,
    RunOptions,
    RunSummary,
    current_record_cancelled,
)
from core.worker.wake import Wake

__all__ = [
    "Handler",
    "HandlerTimeout",
    "LeaseLost",
    "RecordCancelled",
    "RunOptions",
    "RunSummary",
    "Wake",
    "Worker",
    "current_record_cancelled",
]
