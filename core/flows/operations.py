"""The public flow methods as plans (:mod:`core.plans`): ``start_flow``, ``flow_status``, ``cancel_flow`` and
``list_flow_runs`` of every processor (blocking, asyncio, in-memory), their checks and typed errors here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from core import checks, tracing
from core.constants import FLOW_RUN_STATUSES
from core.errors import InvalidArgument, InvalidPayload
from core.flows.run import FlowRun, StartRequest
from core.flows.template import Flow
from core.operations import Operations
from core.payloads import encode_payload
from core.plans import Plan


def start_request(flow: Flow, run_input: object, dedupe_key: str | None, default_attempts: int,
                  max_payload_bytes: int | None) -> StartRequest:
    """A checked ``start_flow`` call (typed errors before anything is written)."""
    if not isinstance(flow, Flow):
        raise InvalidArgument(f"flow must be a core.flows.Flow, got {type(flow).__name__}")
    flow.check_runnable()
    if not isinstance(run_input, dict):
        raise InvalidPayload(0, f"a run's input must be a dict, got {type(run_input).__name__}")
    text = encode_payload(0, run_input, max_payload_bytes)
    key = checks.optional_text("dedupe_key", dedupe_key, max_length=checks.MAX_KEY)
    return StartRequest(flow.name, flow.version, flow.definition_hash(), flow.stored(default_attempts),
                        run_input, text, key, flow.records(run_input, default_attempts))


def start_flow(self: Operations, flow: Flow, input: dict[str, Any], *, dedupe_key: str | None = None,
               conn: Any = None) -> Plan[FlowRun]:
    """Start a run of ``flow`` with ``input`` (a dict: each step's ``record.payload``); returns its
    :class:`FlowRun` (``id``, ``ids`` by step).

    The run and all its records are written in one transaction (with ``conn``, the application's: they commit
    with it, as ``add_records(conn=...)``). Its first steps are claimable at once; every other step waits for
    its parents, released by their completion. ``dedupe_key``: while a run of this flow with that key is
    running, the call returns it (``deduplicated``) instead of starting another. A template whose definition
    differs from the one stored for its name and version raises ``FlowDefinitionChanged``.

    With OpenTelemetry (extra ``[otel]``): a ``send {queue}`` PRODUCER span (the queue of the flow's first
    step), and the trace context inside it stored on the run and each of its records (the ones a ``for_each``
    makes and its ``on_failure`` record included), which the worker's ``process`` spans link to.
    """
    req = start_request(flow, input, dedupe_key, self.settings.max_attempts, self.settings.max_payload_bytes)
    app = None if conn is None else (yield from self._application_connection(conn))
    send = tracing.sending(str(req.steps[0]["queue"]), len(req.steps))  # None without opentelemetry
    if send is None:
        started: FlowRun = yield from self.store.start_flow(req, app)
        return started
    with send:  # the send span, ended when the start ends (with its error, if any)
        started = yield from self.store.start_flow(replace(req, trace=send.context), app)
        send.started(started)
    return started


def _run_id(run_id: object) -> int:
    return checks.record_id(run_id, "run_id")


def flow_status(self: Operations, run_id: int) -> Plan[dict[str, Any] | None]:
    """A run: ``status`` (``running``, ``completed``, ``failed``, ``cancelled``), ``steps`` (each step's records
    with ``status``, ``attempts``, ``last_error``, ``result``; a ``for_each`` step's in element order),
    ``failed_step`` and ``error`` when it failed, ``input``, times. None when there is no such run."""
    checked = _run_id(run_id)
    status: dict[str, Any] | None = yield from self.store.flow_status(checked)
    return status


def cancel_flow(self: Operations, run_id: int) -> Plan[str | None]:
    """Cancel what of a run has not finished (records waiting or pending at once, processing ones flagged:
    their outcome becomes cancelled); the run ends ``cancelled`` and its on_failure step does not run. Returns
    the run's status after (None: no such run)."""
    checked = _run_id(run_id)
    status: str | None = yield from self.store.cancel_flow(checked)
    return status


def list_flow_runs(self: Operations, *, flow: str | None = None, status: str | None = None,
                   limit: int = 100) -> Plan[list[dict[str, Any]]]:
    """The latest runs, newest first (of ``flow``, in ``status`` when given)."""
    name = checks.optional_text("flow", flow, max_length=200)
    if status is not None and status not in FLOW_RUN_STATUSES:
        raise InvalidArgument(f"status must be one of {', '.join(FLOW_RUN_STATUSES)}, got {status!r}")
    n = checks.positive_int("limit", limit, maximum=10_000)
    runs: list[dict[str, Any]] = yield from self.store.list_flow_runs(name, status, n)
    return runs
