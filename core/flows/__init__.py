"""Flow templates: records that go through steps (chains, fan-out, fan-in), each step's records released by
their parents' fenced completion, in the same transaction (core/sql/ddl/0010_flows.sql).

``Flow`` defines a template (:mod:`core.flows.template`); ``processor.start_flow`` starts a run, whose
``FlowRun`` it returns; ``processor.run(flow)`` works its steps (:mod:`core.flows.dispatch`).
"""

from __future__ import annotations

from core.flows.run import FlowRun
from core.flows.template import Flow, Step

__all__ = ["Flow", "FlowRun", "Step"]
