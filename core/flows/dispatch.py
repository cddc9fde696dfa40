"""Working flows: the handler a ``run()`` over flows calls, which routes each record to its step's function
and turns the step's return value into the result its completion stores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.errors import ConfigurationError, ProcessorError
from core.flows.template import Flow, Step
from core.payloads import encode_value
from core.record import Record
from core.retry import RetryPolicy


class StepResultError(ProcessorError, TypeError):
    """A step returned what cannot be its result: not JSON, over ``max_payload_bytes``, or not a list where a
    ``for_each`` step fans out over it. The record fails (its children wait for a retry that returns one)."""


class NotAStep(ProcessorError, LookupError):
    """A record in a flow's queue that is no step of the flows this worker runs."""


class FlowHandler:
    """Calls ``step.fn(record)`` (``(record, conn)`` for a transactional step) for each flow record; returns
    the step's result as JSON text."""

    def __init__(self, flows: Sequence[Flow], max_payload_bytes: int | None) -> None:
        self.flows = list(flows)
        self.max_bytes = max_payload_bytes
        self.routes: dict[tuple[str, str], Step] = {}
        self.sources: set[tuple[str, str]] = set()  # steps whose result a for_each step fans out over
        for flow in self.flows:
            flow.check_runnable()
            for step in flow.all_steps():
                key = (step.queue, step.name)
                if key in self.routes and self.routes[key] is not step:
                    raise ConfigurationError(f"two flows have a step {step.name!r} in queue {step.queue!r}: "
                                             "give one of them another queue")
                self.routes[key] = step
            for step in flow.steps.values():
                if step.for_each is not None:
                    self.sources.add((flow.steps[step.for_each].queue, step.for_each))
        self.any_transactional = any(s.transactional for s in self.routes.values())
        self.__name__ = "+".join(f.name for f in self.flows)

    def queues(self) -> list[str]:
        return sorted({q for q, _ in self.routes})

    def step_of(self, record: Record) -> Step:
        step = None if record.step is None else self.routes.get((record.queue, record.step))
        if step is None:
            raise NotAStep(f"record {record.id} in queue {record.queue!r} is not a step of flow "
                           f"{self.__name__!r} (step {record.step!r})")
        return step

    def transactional(self, record: Record) -> bool:
        step = None if record.step is None else self.routes.get((record.queue, record.step))
        return step is not None and step.transactional

    def retry_for(self, record: Record) -> RetryPolicy | None:
        step = None if record.step is None else self.routes.get((record.queue, record.step))
        return None if step is None else step.retry

    def __call__(self, record: Record, conn: Any = None) -> str:
        step = self.step_of(record)
        value = step.fn(record, conn) if step.transactional else step.fn(record)
        if (record.queue, step.name) in self.sources and not isinstance(value, list | tuple):
            raise StepResultError(f"step {step.name!r} returned {type(value).__name__}: a step that a for_each "
                                  "step fans out over must return a list")
        try:
            return encode_value(value, self.max_bytes)
        except ValueError as exc:
            raise StepResultError(f"step {step.name!r}: its result {exc}") from None
