"""Flow templates in code: :class:`Flow` and its steps, checked where they are defined.

A step may only follow steps defined before it (by function or by name), so a template is acyclic by
construction; a step naming itself is a cycle, a name not defined yet is unknown, a name defined twice a
duplicate: each a :class:`~core.errors.FlowDefinitionError` at the decorator. The template's definition
(steps, dependencies, options; not the functions' code) is hashed: a run is refused when the database holds
another definition under the same name and version.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from core import checks
from core.errors import FlowDefinitionError, InvalidArgument
from core.retry import RetryPolicy

F = TypeVar("F", bound=Callable[..., Any])
POLICIES = ("cancel", "run")


@dataclass(frozen=True)
class Step:
    """One step of a template: its function and where its records go."""

    name: str
    fn: Callable[..., Any]
    after: tuple[str, ...]
    for_each: str | None
    queue: str
    priority: int
    max_attempts: int | None
    ordering_key: Callable[[Any], str | None] | str | None
    retry: RetryPolicy | None
    on_dependency_failure: str
    transactional: bool

    @property
    def parents(self) -> tuple[str, ...]:
        """Every step this one waits for (its ``for_each`` source included)."""
        return self.after + ((self.for_each,) if self.for_each is not None else ())

    def describe(self) -> dict[str, Any]:
        """The step as stored and hashed: structure and options, not code."""
        key = self.ordering_key
        return {
            "name": self.name, "after": list(self.after), "each": self.for_each, "queue": self.queue,
            "priority": self.priority, "max_attempts": self.max_attempts, "policy": self.on_dependency_failure,
            "transactional": self.transactional,
            "ordering_key": key if key is None or isinstance(key, str) else f"callable:{_qualname(key)}",
            "retry": None if self.retry is None else {
                "base_delay": self.retry.base_delay, "multiplier": self.retry.multiplier,
                "max_delay": self.retry.max_delay, "jitter": self.retry.jitter},
        }


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _bad(flow: str, message: str) -> FlowDefinitionError:
    return FlowDefinitionError(f"flow {flow!r}: {message}")


class Flow:
    """A template of steps: ``Flow("order", version=1)``, then ``@order.step(...)`` per step and optionally
    ``@order.on_failure``. Pass it to ``processor.start_flow`` to start runs and to ``processor.run`` (or
    ``dproc run --handler pkg.mod:order``) to work its steps."""

    def __init__(self, name: str, version: int = 1) -> None:
        self.name = checks.check_queue_name(name, FlowDefinitionError, "name")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**31 - 1:
            raise FlowDefinitionError(f"flow {name!r}: version must be a positive integer, got {version!r}")
        self.version = version
        self.steps: dict[str, Step] = {}
        self.failure: Step | None = None

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, version={self.version}, steps={list(self.steps)})"

    # ------------------------------------------------------------------ defining

    def _ref(self, value: object, what: str, defining: str) -> str:
        """A dependency named by its function or its name: a step defined before ``defining``."""
        if isinstance(value, str):
            name = value
        elif callable(value):
            found = [s.name for s in self.steps.values() if s.fn is value]
            name = found[0] if found else getattr(value, "__name__", repr(value))
        else:
            raise _bad(self.name, f"step {defining!r}: {what} must name steps by function or name, got "
                                  f"{type(value).__name__}")
        if name == defining:
            raise _bad(self.name, f"step {defining!r} depends on itself (a cycle)")
        if name not in self.steps:
            raise _bad(self.name, f"step {defining!r}: {what} names unknown step {name!r} (a step may only "
                                  "follow steps defined before it, so no cycle can form)")
        return name

    def _options(self, name: str, queue: str | None, priority: int, max_attempts: int | None,
                 retry: RetryPolicy | None, transactional: bool) -> tuple[str, int, int | None]:
        try:
            q = self.name if queue is None else checks.check_queue_name(queue)
            p = checks.new_priority(priority)
            m = None if max_attempts is None else checks.positive_int("max_attempts", max_attempts,
                                                                      maximum=2**31 - 1)
            checks.flag("transactional", transactional)
        except InvalidArgument as exc:
            raise _bad(self.name, f"step {name!r}: {exc}") from None
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise _bad(self.name, f"step {name!r}: retry must be a RetryPolicy, got {type(retry).__name__}")
        return q, p, m

    def _name(self, fn: object, name: str | None) -> str:
        if not callable(fn):
            raise _bad(self.name, f"a step must be a function, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            raise _bad(self.name, f"step {getattr(fn, '__name__', fn)!r}: coroutine steps are not supported; "
                                  "use a function")
        step_name = getattr(fn, "__name__", None) if name is None else name
        try:
            step_name = checks.text("name", step_name, max_length=200)
        except InvalidArgument as exc:
            raise _bad(self.name, f"step name: {exc}") from None
        if step_name in self.steps or (self.failure is not None and self.failure.name == step_name):
            raise _bad(self.name, f"step {step_name!r} is defined twice")
        return step_name

    def step(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        after: Iterable[Callable[..., Any] | str] = (),
        for_each: Callable[..., Any] | str | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        ordering_key: Callable[[Any], str | None] | str | None = None,
        retry: RetryPolicy | None = None,
        on_dependency_failure: str = "cancel",
        transactional: bool = False,
    ) -> Any:
        """Define a step (a decorator, with or without arguments). ``after``: the steps it waits for;
        ``for_each``: a step whose result (a list) it runs once per element of, its payload the element;
        ``queue`` (default: the flow's name), ``priority``, ``max_attempts``, ``retry`` of its records;
        ``ordering_key``: a key, or a function of the run's input giving one; ``on_dependency_failure``:
        ``"cancel"`` (the default: a failed or cancelled parent cancels it) or ``"run"`` (it runs without that
        parent's result); ``transactional``: it is called ``(record, conn)`` and its result commits with its
        completion."""

        def define(f: F) -> F:
            step_name = self._name(f, name)
            if isinstance(after, str | bytes) or not isinstance(after, Iterable):
                raise _bad(self.name, f"step {step_name!r}: after must be a list of steps")
            deps: list[str] = []
            for a in after:
                ref = self._ref(a, "after", step_name)
                if ref not in deps:
                    deps.append(ref)
            each = None if for_each is None else self._ref(for_each, "for_each", step_name)
            if each is not None and each in deps:
                deps.remove(each)  # the source is a parent already
            if on_dependency_failure not in POLICIES:
                raise _bad(self.name, f"step {step_name!r}: on_dependency_failure must be 'cancel' or 'run', got "
                                      f"{on_dependency_failure!r}")
            if ordering_key is not None and not callable(ordering_key):
                try:
                    checks.text("ordering_key", ordering_key, max_length=checks.MAX_KEY)
                except InvalidArgument as exc:
                    raise _bad(self.name, f"step {step_name!r}: {exc}") from None
            q, p, m = self._options(step_name, queue, priority, max_attempts, retry, transactional)
            self.steps[step_name] = Step(step_name, f, tuple(deps), each, q, p, m, ordering_key, retry,
                                         on_dependency_failure, transactional)
            return f

        return define(fn) if fn is not None else define

    def on_failure(
        self, fn: F | None = None, *, name: str | None = None, queue: str | None = None, priority: int = 0,
        max_attempts: int | None = None, retry: RetryPolicy | None = None, transactional: bool = False,
    ) -> Any:
        """Define the step that runs once per failed run (a step ended failed or cancelled): its payload is the
        run's input, ``record.parents`` the results of the steps that completed."""

        def define(f: F) -> F:
            if self.failure is not None:
                raise _bad(self.name, "on_failure is defined twice")
            step_name = self._name(f, name)
            q, p, m = self._options(step_name, queue, priority, max_attempts, retry, transactional)
            self.failure = Step(step_name, f, (), None, q, p, m, None, retry, "cancel", transactional)
            return f

        return define(fn) if fn is not None else define

    # ------------------------------------------------------------------ using

    def all_steps(self) -> list[Step]:
        """The steps, then the on_failure step if there is one."""
        return [*self.steps.values(), *([self.failure] if self.failure is not None else [])]

    def queues(self) -> list[str]:
        """The queues its steps' records go to."""
        return sorted({s.queue for s in self.all_steps()})

    def definition(self) -> dict[str, Any]:
        """What is stored and hashed per (name, version)."""
        return {"name": self.name, "version": self.version, "steps": [s.describe() for s in self.steps.values()],
                "on_failure": None if self.failure is None else self.failure.describe()}

    def definition_hash(self) -> str:
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def check_runnable(self) -> None:
        if not self.steps:
            raise _bad(self.name, "has no steps")

    def records(self, run_input: Mapping[str, Any], default_attempts: int) -> list[dict[str, Any]]:
        """The records of a run, one per step in definition order (a ``for_each`` step's placeholder): its
        queue, priority, attempts, ordering key (computed from ``run_input``) and dependencies."""
        out = []
        for s in self.steps.values():
            key = s.ordering_key
            if callable(key):
                try:
                    key = key(run_input)
                except Exception as exc:
                    raise InvalidArgument(f"flow {self.name!r} step {s.name!r}: ordering_key raised "
                                          f"{type(exc).__name__}: {exc}") from None
                if key is not None:
                    key = checks.text(f"ordering_key of step {s.name!r}", key, max_length=checks.MAX_KEY)
            out.append({"name": s.name, "queue": s.queue, "priority": s.priority,
                        "max_attempts": s.max_attempts or default_attempts, "ordering_key": key,
                        "after": list(s.after), "each": s.for_each, "policy": s.on_dependency_failure})
        return out

    def stored(self, default_attempts: int) -> dict[str, Any]:
        """The definition as the database keeps it: the on_failure step's queue, priority and attempts resolved
        (the database adds its record when a run fails)."""
        out = self.definition()
        if self.failure is not None:
            out["on_failure"] = {**self.failure.describe(),
                                 "max_attempts": self.failure.max_attempts or default_attempts}
        return out


def as_flows(handler: object) -> list[Flow] | None:
    """``handler`` as a list of flows when it is a Flow or a non-empty list of them; None otherwise."""
    if isinstance(handler, Flow):
        return [handler]
    if isinstance(handler, list | tuple) and handler and all(isinstance(h, Flow) for h in handler):
        return list(handler)
    return None
