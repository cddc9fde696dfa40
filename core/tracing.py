"""OpenTelemetry traces (the ``[otel]`` extra: ``opentelemetry-api`` only). The one module that imports
``opentelemetry``, and only when first needed: without the package (or with ``DP_TRACING=off``) every entry
point here answers None after one cached look, and nothing else changes.

Producing: ``add_records`` (every path: the statement, COPY, ``conn=``, the asyncio API, shards) opens a
``send {queue}`` PRODUCER span around the insert and stores the W3C trace context inside it (``traceparent``,
then a space and ``tracestate`` when there is one) with each record of the batch (``trace_context`` column).
Without a configured SDK no span is opened: a context already current (one propagated into the process) is
stored as it is, and none is stored when there is none.

Consuming: a run whose process has a tracer provider configured (checked when the run starts: the API's default
proxy or a no-op provider means no span at all, so the handlers run exactly as without the package) opens a
``process {queue}`` CONSUMER span around each handler call, linked to the stored context (``trace_parent=
"link"``, the default) or its child (``"child"``), with the messaging attributes of the semantic conventions; an
exception is recorded on it and its status set to ERROR. The stored context is never rewritten, so every attempt
of a record links (or belongs) to the trace that added it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.trace import Span, Tracer

    from core.flows.run import FlowRun
    from core.record import AddResult, Record

# DP_TRACING=off (or 0, false, no): behave as if opentelemetry were not installed (read once, at first use).
ENV = "DP_TRACING"
SYSTEM = "distributed-processor"  # messaging.system
TRACER_NAME = "distributed-processor"
TRACE_PARENTS = ("link", "child")

# Attributes of our own, in the messaging.<system> namespace the conventions give a system's attributes.
ATTEMPT = "messaging.distributed_processor.attempt"
SHARD = "messaging.distributed_processor.shard"
ORDERING_KEY = "messaging.distributed_processor.ordering_key"
DEDUPLICATED = "messaging.distributed_processor.deduplicated"
FLOW_RUN = "messaging.distributed_processor.flow_run_id"

_UNLOADED: Any = object()
_api: Any = _UNLOADED  # an _Api once loaded, None when tracing is unavailable


def _off() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no")


def _load() -> _Api | None:
    global _api
    if _api is _UNLOADED:
        api = None
        if not _off():
            try:
                api = _Api()
            except ImportError:
                api = None
        _api = api
    return _api  # type: ignore[no-any-return]


def available() -> bool:
    """Whether tracing can work here: the package importable and not turned off by ``DP_TRACING``."""
    return _load() is not None


def encode(carrier: dict[str, str]) -> str | None:
    """The stored form of a W3C carrier: ``traceparent``, then a space and ``tracestate`` when there is one."""
    parent = carrier.get("traceparent")
    if not parent:
        return None
    state = carrier.get("tracestate")
    return f"{parent} {state}" if state else parent


def decode(text: str) -> dict[str, str]:
    """The W3C carrier of a stored context (``traceparent`` holds no space; ``tracestate`` may)."""
    parent, _, state = text.strip().partition(" ")
    return {"traceparent": parent, "tracestate": state} if state else {"traceparent": parent}


class Sending:
    """One ``add_records`` call's trace: the context stored with its records and, with an SDK, its ``send``
    span, ended (with the error, if any) when the ``with`` block ends."""

    __slots__ = ("context", "span")

    def __init__(self, span: Span | None, context: str | None) -> None:
        self.span = span
        self.context = context

    def __enter__(self) -> Sending:
        return self

    def added(self, result: AddResult) -> None:
        if self.span is None:
            return
        if len(result) == 1:
            self.span.set_attribute("messaging.message.id", str(result[0]))
        if result.deduplicated:
            self.span.set_attribute(DEDUPLICATED, len(result.deduplicated))

    def started(self, run: FlowRun) -> None:
        """A ``start_flow``'s span: the run's id (and whether an earlier run was returned instead)."""
        if self.span is None:
            return
        self.span.set_attribute(FLOW_RUN, str(run.id))
        if run.deduplicated:
            self.span.set_attribute(DEDUPLICATED, 1)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        span = self.span
        if span is None:
            return
        if isinstance(exc, Exception):
            from opentelemetry.trace import Status, StatusCode

            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def sending(queue: str, n: int) -> Sending | None:
    """The trace of an ``add_records`` of ``n`` records into ``queue``; None when there is nothing to store."""
    api = _api if _api is not _UNLOADED else _load()
    if api is None:
        return None
    return api.sending(queue, n)


def traced_handler(handler: Callable[..., Any], *, is_async: bool, trace_parent: str,
                   instance_id: str) -> Callable[..., Any] | None:
    """``handler`` wrapped in a ``process`` span per call, or None when no tracer provider is configured (the
    API's default proxy, a no-op provider, the SDK disabled): the run then calls ``handler`` itself."""
    api = _load()
    if api is None:
        return None
    return api.traced(handler, is_async, trace_parent, instance_id)


class _Api:
    """The opentelemetry API, imported (ImportError when it is not installed)."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()
        self._provider: Any = None
        self._tracer: Any = None

    def tracer(self) -> Tracer | None:
        """Our tracer from the global provider, or None when no provider is configured (the API's default
        proxy, a no-op provider, the SDK disabled). Looked up again only when the provider changes."""
        trace = self.trace
        provider = trace.get_tracer_provider()
        if provider is not self._provider:
            tracer = None
            if not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                tracer = provider.get_tracer(TRACER_NAME, _version())
                if isinstance(tracer, trace.NoOpTracer):  # e.g. the SDK with OTEL_SDK_DISABLED
                    tracer = None
            self._provider, self._tracer = provider, tracer
        return self._tracer  # type: ignore[no-any-return]

    def _inject(self, context: Any) -> str | None:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=context)
        return encode(carrier)

    def sending(self, queue: str, n: int) -> Sending | None:
        trace = self.trace
        tracer = self.tracer()
        if tracer is None:
            # No SDK: no span; a context propagated into this process (valid without an SDK) is passed on.
            if not trace.get_current_span().get_span_context().is_valid:
                return None
            return Sending(None, self._inject(None))
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.operation.type": "send", "messaging.operation.name": "send",
            "messaging.destination.name": queue,
        }
        if n > 1:
            attributes["messaging.batch.message_count"] = n
        span = tracer.start_span(f"send {queue}", kind=trace.SpanKind.PRODUCER, attributes=attributes)
        return Sending(span, self._inject(trace.set_span_in_context(span)))

    def traced(self, handler: Callable[..., Any], is_async: bool, trace_parent: str,
               instance_id: str) -> Callable[..., Any] | None:
        tracer = self.tracer()  # at run start: a provider set later is not used by this run
        if tracer is None:
            return None
        start = functools.partial(self._process_span, tracer, trace_parent == "child", instance_id)
        if is_async:
            async def traced_async(record: Record, *args: Any) -> Any:
                with start(record):
                    return await handler(record, *args)
            return traced_async

        def traced(record: Record, *args: Any) -> Any:
            with start(record):
                return handler(record, *args)
        return traced

    def _process_span(self, tracer: Tracer, child: bool, instance_id: str, record: Record) -> Any:
        """The ``process`` span of one handler call (a context manager making it current)."""
        trace = self.trace
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": record.queue,
            "messaging.message.id": str(record.id), "messaging.client.id": instance_id,
            ATTEMPT: record.attempts, SHARD: record.shard,
        }
        if record.ordering_key is not None:
            attributes[ORDERING_KEY] = record.ordering_key
        parent = None
        links = None
        if record.trace_context:
            stored = self.propagator.extract(decode(record.trace_context))
            span_context = trace.get_current_span(stored).get_span_context()
            if span_context.is_valid:
                if child:
                    parent = stored
                else:
                    links = [trace.Link(span_context)]
        return tracer.start_as_current_span(
            f"process {record.queue}", context=parent, kind=trace.SpanKind.CONSUMER, links=links,
            attributes=attributes, record_exception=True, set_status_on_exception=True)


@functools.lru_cache(maxsize=1)
def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("distributed-processor")
    except Exception:  # not installed as a distribution (a source tree on sys.path)
        return None
