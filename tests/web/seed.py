"""Records for the dashboard's tests, made through the public API (the states a real run leaves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

XSS = "<script>alert(1)</script>"


@dataclass
class Seeded:
    pending: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    reports: list[int] = field(default_factory=list)
    xss: int = 0


def failed(p: Any, payloads: list[dict[str, Any]], error: str, *, queue: str = "emails", **kw: Any) -> list[int]:
    """Records added, claimed and failed for good (no retry left) with ``error``."""
    ids = list(p.add_records(payloads, queue=queue, max_attempts=1, **kw))
    held = [r for r in p.claim_records(len(ids) + 10, queues=[queue]) if r.id in ids]
    assert sorted(r.id for r in held) == sorted(ids)
    p.mark_failed(held, error, retry=False)
    return ids


def completed(p: Any, n: int, *, queue: str = "emails") -> list[int]:
    ids = list(p.add_records([{"done": i} for i in range(n)], queue=queue))
    held = [r for r in p.claim_records(n + 10, queues=[queue]) if r.id in ids]
    p.mark_completed(held)
    return ids


def seed(p: Any) -> Seeded:
    """Queue "emails": 3 completed, 2 failed (one holding a script in its payload, key and error), 4 pending
    (two with dedupe keys); queue "reports": 2 pending keyed records."""
    s = Seeded()
    s.completed = completed(p, 3)
    s.xss = failed(p, [{"html": XSS, "n": 1}], f"ValueError: bad input {XSS}", ordering_key=XSS,
                   dedupe_key="order-xss")[0]
    s.failed = [s.xss, *failed(p, [{"to": "a@example.com"}], "TimeoutError: upstream did not answer in 30 s")]
    s.pending = list(p.add_records([{"to": f"user{i}@example.com"} for i in range(4)], queue="emails",
                                   dedupe_key=["order-1", "order-2", None, None]))
    s.reports = list(p.add_records([{"report": i} for i in range(2)], queue="reports", ordering_key="customer-7"))
    return s
