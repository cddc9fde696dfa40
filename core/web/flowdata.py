"""What the dashboard reads of flows, whatever the backend: pages of runs (a keyset walk, window by window within
a time budget, merged over shards) and a run with its steps (each step's records counted by state, the first
of them and its failed or processing ones shown, its parents from the run's stored definition).

A source implements :class:`FlowReads` (core/web/pgsource.py through core/web/pgflows.py over PostgreSQL,
core/web/memsource.py through the processor's public ``list_flow_runs`` and ``flow_status`` in memory).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from core.web.filters import RunFilter

RUN_WINDOW = 10_000         # runs one statement reads at most along its index when a status filters them
RUN_CAP = 20_000            # records of a run counted at most on its page (more: counted as "at least")
PER_STEP = 20               # records shown per step: its first ones, and as many failed or processing ones
RESULT_SHOWN = 2000         # characters of a step's result (pretty-printed) shown on a run's page
ERROR_SHOWN = 1000          # characters of a step record's last error shown there (the record's page has it all)
FAILED_CAP = 10_000         # finished runs of the last hour read at most for the overview's failed count
RUNS_BUDGET = 0.04          # seconds a flows page may walk windows for
UNFINISHED = ("waiting", "pending", "processing")
# The state a step shows: the first of these among its records' (all completed: completed).
STEP_STATES = ("failed", "processing", "pending", "waiting", "cancelled", "completed")
RUN_COLUMNS = ("id", "flow", "version", "status", "failed_step", "error", "created_at", "finished_at")

Position = tuple[Any, ...]  # a run's place in a walk: (id,), or (created_at, id) within one flow


class FlowsUnavailable(Exception):
    """The processor cannot list flow runs (a store without flows): the flows pages say so."""


def position_of(run: dict[str, Any], by_flow: bool) -> Position:
    return (run["created_at"], run["id"]) if by_flow else (run["id"],)


def shown(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "…"


def pretty(value: Any, limit: int = RESULT_SHOWN) -> str:
    """A JSON value as the run's page shows it: indented like jsonb_pretty, cut to ``limit`` characters."""
    return shown(json.dumps(value, indent=4, ensure_ascii=False, sort_keys=True, default=str), limit) or ""


@dataclass
class RunsPage:
    """One page of runs, newest first; ``next``: the position the next page starts below (None: the end);
    ``searched``: the page is short because the time budget ran out there."""

    rows: list[dict[str, Any]]
    next: Position | None
    searched: bool = False


@dataclass
class StepView:
    """A step of a run: its parents (``after``, and ``each`` for a for_each step's source), its records counted
    by state, the records shown, and whether it is the run's on_failure step."""

    name: str
    after: list[str] = field(default_factory=list)
    each: str | None = None
    on_failure: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    placeholder: bool = False  # a for_each step whose source has not completed: its elements are not known

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def state(self) -> str:
        if self.total == 0:
            return "not run" if self.on_failure else "none"
        for s in STEP_STATES:
            if self.counts.get(s):
                return s
        return "none"  # pragma: no cover - every record has one of the states

    @property
    def parents(self) -> list[str]:
        return [*([self.each] if self.each else []), *self.after]

    def summary(self) -> str:
        """The step's records in a few words: "completed", "3 of 5 completed", "not fanned out yet"."""
        if self.placeholder:
            return "elements not known yet"
        if self.total == 0:
            return self.state
        if self.total == 1:
            (status,) = [s for s, n in self.counts.items() if n]
            return status
        done = self.counts.get("completed", 0)
        noun = "elements" if self.each else "records"
        if done == self.total:
            return f"{self.total:,} {noun} completed"
        return f"{done:,} of {self.total:,} {noun} completed"


@dataclass
class RunDetail:
    """A run (its row: ``input`` pretty-printed, None when payloads are hidden), its steps in the order of its
    definition (the on_failure step last), and whether its records were counted only up to :data:`RUN_CAP`."""

    run: dict[str, Any]
    steps: list[StepView]
    capped: bool = False

    @property
    def unfinished(self) -> int:
        return sum(s.counts.get(status, 0) for s in self.steps for status in UNFINISHED)

    @property
    def total(self) -> int:
        return sum(s.total for s in self.steps)


def build_steps(definition: dict[str, Any] | None, counts: list[tuple[str, str, int, bool]],
                records: list[dict[str, Any]]) -> list[StepView]:
    """The steps of a run: those of its ``definition`` (stored per flow and version) in its order, then its
    on_failure step, then any step its records name that the definition does not (none: a run keeps its
    version's definition); ``counts`` are (step, status, records, whether the step's placeholder is among
    them); ``records``, the ones shown, each with its ``step``."""
    steps: dict[str, StepView] = {}
    for s in (definition or {}).get("steps") or []:
        name = str(s.get("name"))
        steps[name] = StepView(name, [str(a) for a in s.get("after") or []],
                               None if s.get("each") is None else str(s["each"]))
    failure = (definition or {}).get("on_failure")
    if failure:
        steps[str(failure.get("name"))] = StepView(str(failure.get("name")), on_failure=True)
    for step, status, n, placeholder in counts:
        view = steps.setdefault(str(step), StepView(str(step)))
        view.counts[status] = view.counts.get(status, 0) + int(n)
        view.placeholder = view.placeholder or bool(placeholder and status == "waiting")
    for r in records:
        steps.setdefault(str(r["step"]), StepView(str(r["step"]))).records.append(r)
    for view in steps.values():
        view.records.sort(key=lambda r: (r.get("index") if r.get("index") is not None else -1, r["id"]))
        if view.placeholder and view.total > 1:
            view.placeholder = False  # counted with its fanned-out elements: not a lone placeholder
    return list(steps.values())


def pick_records(rows: list[dict[str, Any]], limit: int = PER_STEP) -> list[dict[str, Any]]:
    """The records a run's page shows of one step (``rows`` in id order): its first ``limit``, and up to
    ``limit`` failed or processing ones after them (what an operator looks for in a large fan-out)."""
    first = rows[:limit]
    seen = {r["id"] for r in first}
    hot = [r for r in rows if r["status"] in ("failed", "processing") and r["id"] not in seen][:limit]
    return first + hot


class FlowReads(ABC):
    """The flow reads of a source (see the module docstring)."""

    @abstractmethod
    def runs_window(self, f: RunFilter, position: Position | None, limit: int
                    ) -> list[tuple[list[dict[str, Any]], Position | None]]:
        """Per database: up to ``limit`` runs matching ``f`` below ``position`` (newest first: by id, or by
        (created_at, id) when ``f`` names a flow), read within a window of about :data:`RUN_WINDOW` runs;
        and the position of the window's last run read (None: no run is left below the window)."""

    @abstractmethod
    def flow_run(self, run_id: int, payloads: bool) -> RunDetail | None:
        """The run ``run_id`` with its steps (None: no such run); results and input only when ``payloads``."""

    @abstractmethod
    def failed_runs(self) -> tuple[int, bool] | None:
        """Runs failed in the last hour and whether that is a lower bound (the read stopped at its cap);
        None where the processor has no flows."""

    @abstractmethod
    def flow_names(self) -> list[str]:
        """The flows that have run (for the filter's suggestions)."""

    def runs(self, f: RunFilter, cursor: Position | None, limit: int, budget: float | None = None) -> RunsPage:
        """A page of runs below ``cursor``. Each database reads its own window; what all of them covered is
        the runs at or above the highest of their window ends (a database that filled its share covered down
        to its last run): runs below it are read again by the next window, not shown now."""
        by_flow = f.flow is not None
        deadline = time.monotonic() + (RUNS_BUDGET if budget is None else budget)
        rows: list[dict[str, Any]] = []
        position = cursor
        while True:
            want = limit + 1 - len(rows)
            parts = self.runs_window(f, position, want)
            ends: list[Position] = []
            for got, end in parts:
                if len(got) >= want:
                    ends.append(position_of(got[-1], by_flow))
                elif end is not None:
                    ends.append(end)
            cutoff = max(ends, default=None)
            merged = sorted((r for got, _ in parts for r in got), key=lambda r: position_of(r, by_flow),
                            reverse=True)
            rows.extend(r for r in merged if cutoff is None or position_of(r, by_flow) >= cutoff)
            if len(rows) > limit:
                return RunsPage(rows[:limit], position_of(rows[limit - 1], by_flow))
            if cutoff is None:
                return RunsPage(rows, None)
            position = cutoff
            if time.monotonic() > deadline:
                return RunsPage(rows, cutoff, searched=True)
