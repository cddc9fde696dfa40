"""What starting a run takes and gives: :class:`StartRequest` (checked by core/flows/operations.py) and
:class:`FlowRun` (what ``start_flow`` returns). Plain data, importable from anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FlowRun:
    """A run started by ``start_flow``: its ``id``, and its records' ids by step (a ``for_each`` step's first
    record; its others are made when its source completes). ``deduplicated``: a running run of the flow held
    the dedupe key, and this is that run."""

    id: int
    flow: str
    version: int
    ids: dict[str, int] = field(default_factory=dict)
    deduplicated: bool = False
    shard: int = 0


@dataclass(frozen=True)
class StartRequest:
    """A checked ``start_flow`` call: what ``dp_start_flow`` takes."""

    flow: str
    version: int
    hash: str
    definition: dict[str, Any]
    input: dict[str, Any]
    input_text: str
    dedupe_key: str | None
    steps: list[dict[str, Any]]
    # The W3C trace context of the start (core/tracing.py), stored on the run and each of its records.
    trace: str | None = None
