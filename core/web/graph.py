"""A run's steps as a graph, laid out here and drawn as an inline SVG by templates/flow.html (no script, no
graph library): layers by depth (a step one layer right of its deepest parent), left to right; within a layer
steps ordered by the mean place of their parents (fewer crossings), else in their definition's order; each
edge a curve from a parent's right side to a child's left side, dashed for a for_each step's source. The
on_failure step stands apart in a last column (it has no edge: it runs once when the run fails)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.web.flowdata import StepView

NODE_W, NODE_H = 184, 58
GAP_X, GAP_Y = 64, 20
PAD = 10
NAME_CHARS = 24     # characters of a step's name drawn in its box (the whole name in its tooltip)
LINE_CHARS = 28


def cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def depths(steps: Sequence[StepView]) -> dict[str, int]:
    """Each step's layer: 0 for a step without parents, else one more than its deepest parent's (parents the
    run does not have are ignored; a cycle, which templates refuse, would not loop)."""
    known = {s.name: s for s in steps if not s.on_failure}
    out: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in out:
            return out[name]
        parents = [p for p in known[name].parents if p in known and p not in seen]
        d = 0 if not parents else 1 + max(depth(p, seen | {name}) for p in parents)
        out[name] = d
        return d

    for name in known:
        depth(name, frozenset())
    return out


def layout(steps: Sequence[StepView], failed_step: str | None = None) -> dict[str, Any]:
    """Boxes and curves of the graph of ``steps`` (their ``parents`` give the edges), in SVG units."""
    layer_of = depths(steps)
    order = {s.name: i for i, s in enumerate(steps)}
    n_layers = max(layer_of.values(), default=-1) + 1
    layers: list[list[StepView]] = [[] for _ in range(n_layers)]
    for s in steps:
        if s.name in layer_of:
            layers[layer_of[s.name]].append(s)
    row: dict[str, float] = {}
    for members in layers:
        def place(s: StepView) -> tuple[float, int]:
            ps = [row[p] for p in s.parents if p in row]
            return (sum(ps) / len(ps) if ps else -1.0, order[s.name])

        members.sort(key=place)
        for i, s in enumerate(members):
            row[s.name] = float(i)
    apart = [s for s in steps if s.on_failure]
    columns = layers + ([apart] if apart else [])
    tallest = max((len(c) for c in columns), default=0)
    height = PAD * 2 + max(tallest, 1) * NODE_H + max(tallest - 1, 0) * GAP_Y
    width = PAD * 2 + max(len(columns), 1) * NODE_W + max(len(columns) - 1, 0) * GAP_X
    nodes: list[dict[str, Any]] = []
    at: dict[str, tuple[float, float]] = {}
    for c, members in enumerate(columns):
        span = len(members) * NODE_H + max(len(members) - 1, 0) * GAP_Y
        top = (height - span) / 2
        for i, s in enumerate(members):
            x, y = PAD + c * (NODE_W + GAP_X), top + i * (NODE_H + GAP_Y)
            at[s.name] = (x, y)
            nodes.append(node(s, x, y, s.name == failed_step, order[s.name] + 1))
    edges = []
    for s in steps:
        if s.name not in at or s.on_failure:
            continue
        x2, y2 = at[s.name]
        for p in s.parents:
            if p not in at:
                continue
            x1, y1 = at[p]
            sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2 - 2, y2 + NODE_H / 2
            bend = max(GAP_X / 2, (ex - sx) / 3)
            edges.append({"from": p, "to": s.name, "each": p == s.each,
                          "d": f"M{sx:.1f},{sy:.1f} C{sx + bend:.1f},{sy:.1f} {ex - bend:.1f},{ey:.1f} "
                               f"{ex:.1f},{ey:.1f}"})
    return {"width": round(width), "height": round(height), "nodes": nodes, "edges": edges}


def node(s: StepView, x: float, y: float, failed: bool, anchor: int) -> dict[str, Any]:
    """A step's box: its place, its state (the class that colours it), its name and a line about its
    records; the tooltip says it all; ``anchor``: the step's place on the page (its section's link)."""
    kind = "on failure" if s.on_failure else ("for each of " + s.each if s.each else "")
    counts = ", ".join(f"{n:,} {status}" for status, n in sorted(s.counts.items()) if n)
    title = " · ".join(p for p in (s.name, kind, counts or s.state) if p)
    line = s.summary()
    if s.total > 1 and s.state not in ("completed", "waiting"):
        line = f"{s.counts.get(s.state, 0):,} {s.state} · {line}"
    return {"name": s.name, "label": cut(s.name, NAME_CHARS), "kind": cut(kind, LINE_CHARS),
            "line": cut(line, LINE_CHARS), "state": s.state.replace(" ", "-"), "failed": failed,
            "x": round(x, 1), "y": round(y, 1), "w": NODE_W, "h": NODE_H, "title": title, "anchor": anchor}
