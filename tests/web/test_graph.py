"""A run's graph as the run page draws it, its steps' states, and the keyset walk of the runs page merged over
several databases (pure logic: no database)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from core.web.filters import RunFilter
from core.web.flowdata import FlowReads, Position, RunDetail, StepView, build_steps, pick_records, position_of
from core.web.graph import NODE_W, depths, layout

DEFINITION = {"steps": [
    {"name": "validate", "after": [], "each": None},
    {"name": "charge", "after": ["validate"], "each": None},
    {"name": "reserve", "after": ["validate"], "each": None},
    {"name": "ship", "after": ["charge", "reserve"], "each": None},
    {"name": "label", "after": [], "each": "validate"},
    {"name": "pack", "after": ["label"], "each": None},
    {"name": "audit", "after": ["validate", "ship"], "each": None},
], "on_failure": {"name": "refund"}}


def test_layers_follow_the_deepest_parent_and_edges_join_the_boxes() -> None:
    steps = build_steps(DEFINITION, [], [])
    assert [s.name for s in steps] == ["validate", "charge", "reserve", "ship", "label", "pack", "audit", "refund"]
    assert depths(steps) == {"validate": 0, "charge": 1, "reserve": 1, "label": 1, "ship": 2, "pack": 2,
                             "audit": 3}
    g = layout(steps, failed_step="charge")
    at = {n["name"]: n for n in g["nodes"]}
    xs = sorted({n["x"] for n in g["nodes"]})
    assert len(xs) == 5  # four layers and the on_failure step apart
    assert at["refund"]["x"] == xs[-1] and at["refund"]["kind"] == "on failure"
    assert at["charge"]["failed"] and not at["ship"]["failed"]
    assert at["label"]["kind"] == "for each of validate"
    pairs = {(e["from"], e["to"]): e for e in g["edges"]}
    assert set(pairs) == {("validate", "charge"), ("validate", "reserve"), ("charge", "ship"), ("reserve", "ship"),
                          ("validate", "label"), ("label", "pack"), ("validate", "audit"), ("ship", "audit")}
    assert [k for k, e in pairs.items() if e["each"]] == [("validate", "label")]
    start = pairs[("charge", "ship")]["d"].split()[0]
    assert start == f"M{at['charge']['x'] + NODE_W:.1f},{at['charge']['y'] + at['charge']['h'] / 2:.1f}"
    assert g["width"] >= max(n["x"] + n["w"] for n in g["nodes"]) and g["height"] >= max(
        n["y"] + n["h"] for n in g["nodes"])
    anchors = {n["name"]: n["anchor"] for n in g["nodes"]}
    assert anchors == {s.name: i + 1 for i, s in enumerate(steps)}  # each box links to its step's section
    ys = [n["y"] for n in g["nodes"] if n["x"] == at["charge"]["x"]]
    assert len(ys) == len(set(ys)) == 3  # no two boxes of a layer overlap


def test_a_graph_without_a_definition_draws_the_steps_it_knows() -> None:
    steps = build_steps(None, [("b", "completed", 1, False), ("a", "failed", 1, False)], [])
    g = layout(steps)
    assert [n["name"] for n in g["nodes"]] == ["b", "a"] and g["edges"] == []
    assert layout([])["nodes"] == []


@pytest.mark.parametrize(("counts", "state", "summary"), [
    ({"completed": 3}, "completed", "3 elements completed"),
    ({"completed": 2, "failed": 1}, "failed", "2 of 3 elements completed"),
    ({"processing": 1, "pending": 4}, "processing", "0 of 5 elements completed"),
    ({"waiting": 1}, "waiting", "waiting"),
    ({"cancelled": 1, "completed": 1}, "cancelled", "1 of 2 elements completed"),
    ({}, "none", "none"),
])
def test_a_step_state_is_its_most_urgent_records(counts: dict[str, int], state: str, summary: str) -> None:
    step = StepView("label", each="validate", counts=counts)
    assert step.state == state and step.summary() == summary


def test_placeholders_on_failure_steps_and_the_records_shown() -> None:
    steps = {s.name: s for s in build_steps(DEFINITION, [("label", "waiting", 1, True)], [])}
    assert steps["label"].placeholder and steps["label"].summary() == "elements not known yet"
    assert steps["refund"].on_failure and steps["refund"].state == "not run"
    fanned = {s.name: s for s in build_steps(DEFINITION, [("label", "waiting", 2, True)], [])}
    assert not fanned["label"].placeholder
    rows = [{"id": i, "status": "failed" if i % 7 == 0 else "completed"} for i in range(1, 101)]
    shown = pick_records(rows, limit=5)
    assert [r["id"] for r in shown] == [1, 2, 3, 4, 5, 7, 14, 21, 28, 35]
    detail = RunDetail({"status": "running"}, build_steps(DEFINITION, [("charge", "pending", 2, False),
                                                                       ("ship", "waiting", 1, False),
                                                                       ("validate", "completed", 1, False)], []))
    assert detail.unfinished == 3 and detail.total == 4


# ---------------------------------------------------------------------- the keyset walk over databases

T0 = datetime(2026, 12, 6, tzinfo=timezone.utc)


class FakeShards(FlowReads):
    """Runs on several databases; each reads windows of ``window`` runs below a position, as pgflows does."""

    def __init__(self, parts: list[list[dict[str, Any]]], window: int) -> None:
        self.parts = parts
        self.window = window
        self.reads = 0

    def runs_window(self, f: RunFilter, position: Position | None, limit: int
                    ) -> list[tuple[list[dict[str, Any]], Position | None]]:
        by_flow = f.flow is not None
        out = []
        for part in self.parts:
            self.reads += 1
            rows = sorted((r for r in part if f.flow is None or r["flow"] == f.flow),
                          key=lambda r: position_of(r, by_flow), reverse=True)
            rows = [r for r in rows if position is None or position_of(r, by_flow) < position]
            end = position_of(rows[self.window - 1], by_flow) if f.status and len(rows) >= self.window else None
            window = rows if end is None else [r for r in rows if position_of(r, by_flow) >= end]
            out.append(([r for r in window if f.status is None or r["status"] == f.status][:limit], end))
        return out

    def flow_run(self, run_id: int, payloads: bool) -> RunDetail | None:
        return None

    def failed_runs(self) -> tuple[int, bool] | None:
        return None

    def flow_names(self) -> list[str]:
        return []


@pytest.mark.parametrize("f", [RunFilter(), RunFilter(flow="a"), RunFilter(status="failed"),
                               RunFilter(flow="b", status="failed")])
def test_the_walk_pages_through_every_matching_run_once_in_order(f: RunFilter) -> None:
    rnd = random.Random(7)
    runs = [{"id": i, "flow": rnd.choice("ab"), "status": "failed" if rnd.random() < 0.2 else "completed",
             "created_at": T0 + timedelta(seconds=rnd.randrange(50))} for i in range(1, 301)]
    parts: list[list[dict[str, Any]]] = [[], [], []]
    for r in runs:
        parts[rnd.randrange(3)].append(r)
    source = FakeShards(parts, window=7)
    by_flow = f.flow is not None
    expected = sorted((r for r in runs if (f.flow is None or r["flow"] == f.flow)
                       and (f.status is None or r["status"] == f.status)),
                      key=lambda r: position_of(r, by_flow), reverse=True)
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        page = source.runs(f, cursor, 9, budget=60)
        assert len(page.rows) <= 9 and not page.searched
        seen += page.rows
        if page.next is None:
            break
        cursor = page.next
    assert [r["id"] for r in seen] == [r["id"] for r in expected]


def test_the_walk_stops_at_its_budget_with_where_it_got_to() -> None:
    runs = [{"id": i, "flow": "a", "status": "completed", "created_at": T0} for i in range(1, 101)]
    source = FakeShards([runs], window=10)
    page = source.runs(RunFilter(status="failed"), None, 5, budget=-1)
    assert page.rows == [] and page.searched and page.next == (91,)
    assert source.runs(RunFilter(status="failed"), None, 5, budget=60).next is None
