"""Flow runs for the dashboard's tests, made through the public API and worked by ``run()``: one completed
(a diamond and a for_each of three), one failed at its charge step (with a script in its error, result and
input), and one running (its first step pending, the others waiting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.flows import Flow, FlowRun
from tests.web.seed import XSS

shop = Flow("shop", version=1)


def validate(record: Any) -> list[Any]:
    return list(record.payload.get("items", []))


def charge(record: Any) -> dict[str, Any]:
    if record.payload.get("fail"):
        raise ValueError(f"card declined {XSS}")
    return {"charged": 10, "note": XSS}


def reserve(record: Any) -> str:
    return "reserved"


def ship(record: Any) -> str:
    return "shipped"


def label(record: Any) -> str:
    return f"label for {record.payload}"


def pack(record: Any) -> int:
    return len(record.parents["label"])


def refund(record: Any) -> str:
    return "refunded"


# Registered without decorators (their type is the template's Any): the steps stay typed functions.
shop.step()(validate)
shop.step(after=[validate], max_attempts=1)(charge)
shop.step(after=[validate])(reserve)
shop.step(after=[charge, reserve])(ship)
shop.step(for_each=validate)(label)
shop.step(after=[label])(pack)
shop.on_failure(refund)


@dataclass
class Runs:
    done: FlowRun
    failed: FlowRun
    running: FlowRun


def seed_runs(p: Any) -> Runs:
    """The three runs; ``running`` is started after the others were worked, so nothing works it."""
    done = p.start_flow(shop, {"items": ["book", "pen", "ink"]})
    failed = p.start_flow(shop, {"items": ["mug"], "fail": True, "html": XSS})
    p.run(shop, stop_when_empty=True, handle_signals=False)
    running = p.start_flow(shop, {"items": ["cup", "lid"]})
    return Runs(done, failed, running)


def run_status(p: Any, run_id: int) -> str:
    found = p.flow_status(run_id)
    assert found is not None, f"no flow run {run_id}"
    return str(found["status"])


def record_ids(p: Any, run: FlowRun) -> set[int]:
    """Every record of a run that ``flow_status`` lists, and its first records (a for_each step's placeholder
    included, which flow_status leaves out until it fans out)."""
    status = p.flow_status(run.id)
    return {int(r["id"]) for rs in status["steps"].values() for r in rs} | set(run.ids.values())
