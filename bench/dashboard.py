"""The dashboard suite: every page's server time beside 10 M finished and 1 M pending records.

    python -m bench --only dashboard             # 10,000,000 finished + 1,000,000 pending (the fill takes minutes)
    python -m bench --only dashboard --quick     # 200,000 + 20,000

The fill writes the rows with INSERT ... SELECT generate_series (the statement-level trigger keeps
``queue_stats`` right), spreads the finished ones over days (about 36,000 in the last hour, more than the
chart reads), sets failed records with errors, ordering and dedupe keys, claims a few records so that some
are processing under a live instance, and runs VACUUM ANALYZE as autovacuum would have. Each page (and each
filter of the records page) is then requested through the ASGI app in this process: the figure is the median
time from the request's start to the last byte of its response, the app's whole handling.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import psycopg

QUEUES = ("default", "emails", "reports")
REPEAT = 7
TARGET_MS = 100.0


def fill(dsn: str, *, finished: int, pending: int) -> None:
    """Replace the records of ``dsn`` with ``finished`` finished and ``pending`` pending ones."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE processing_queue, queue_stats, processor_instances, claim_floor_events")
        chunk = 1_000_000
        for start in range(0, finished, chunk):
            # finished_at grows with the id, 100 ms apart, the newest now; 1 in 5,000 failed with an error,
            # 1 in 7,000 cancelled; a key on 1 in 50, a dedupe key on 1 in 100.
            conn.execute(
                "INSERT INTO processing_queue (queue, payload, status, attempts, max_attempts, ordering_key,"
                " dedupe_key, last_error, run_at, created_at, updated_at, finished_at)"
                " SELECT (ARRAY['default','emails','reports'])[1 + g %% 3],"
                "  jsonb_build_object('n', g, 'to', 'user' || g || '@example.com'),"
                "  CASE WHEN g %% 5000 = 0 THEN 'failed' WHEN g %% 7000 = 0 THEN 'cancelled' ELSE 'completed' END,"
                "  CASE WHEN g %% 5000 = 0 THEN 5 ELSE 1 END, 5,"
                "  CASE WHEN g %% 50 = 0 THEN 'customer-' || (g %% 20000) END,"
                "  CASE WHEN g %% 100 = 0 THEN 'order-' || g END,"
                "  CASE WHEN g %% 5000 = 0 THEN 'TimeoutError: upstream did not answer within 30 s (call '"
                "   || g || ')' END,"
                "  t - interval '2 seconds', t - interval '2 seconds', t, t"
                " FROM (SELECT g, now() - (%(n)s - g) * interval '100 milliseconds' AS t"
                "       FROM generate_series(%(lo)s, %(hi)s) g) s",
                {"n": finished, "lo": start + 1, "hi": min(finished, start + chunk)})
        # Pending: the newest ids, keyless but for 1 in 1,000 (each the only record of its key: its head).
        conn.execute(
            "INSERT INTO processing_queue (queue, payload, ordering_key, dedupe_key, dedupe_while, dedupe_held,"
            " run_at, created_at, updated_at)"
            " SELECT (ARRAY['default','emails','reports'])[1 + g %% 3], jsonb_build_object('n', g),"
            "  CASE WHEN g %% 1000 = 0 THEN 'pending-key-' || g END,"
            "  CASE WHEN g %% 500 = 0 THEN 'pending-dedupe-' || g END,"
            "  CASE WHEN g %% 500 = 0 THEN 'pending' END, g %% 500 = 0,"
            "  now() - (%(n)s - g) * interval '1 millisecond', now() - (%(n)s - g) * interval '1 millisecond',"
            "  now()"
            " FROM generate_series(1, %(n)s) g", {"n": pending})
        conn.execute("VACUUM ANALYZE processing_queue")
        conn.execute("ANALYZE queue_stats")


async def _request(app: Any, path: str, query: str) -> tuple[float, int]:
    """One GET through the ASGI app; (milliseconds to the response's last byte, status)."""
    status = 0
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    started = time.perf_counter()
    await app(scope, receive, send)
    await done.wait()
    return (time.perf_counter() - started) * 1000, status


def cases(record_id: int, failed_id: int, key: str) -> list[tuple[str, str, str]]:
    """(case name, path, query): every page, and each filter of the records page."""
    return [
        ("overview", "/", ""),
        ("queues", "/queues", ""),
        ("instances", "/instances", ""),
        ("records, no filter", "/records", ""),
        ("records, second page", "/records", f"after={record_id}"),
        ("records, state=pending", "/records", "state=pending"),
        ("records, state=processing", "/records", "state=processing"),
        ("records, state=failed (1 in 5,000)", "/records", "state=failed"),
        ("records, state=completed, queue=emails", "/records", "state=completed&queue=emails"),
        ("records, ordering key, state=failed", "/records", f"key={key}&state=failed"),
        ("records, ordering key", "/records", f"key={key}"),
        ("records, dedupe key", "/records", "dedupe=order-9999900"),
        ("records, error text", "/records", "error=upstream"),
        ("record page (failed, keyed)", f"/records/{failed_id}", ""),
        ("record page (pending)", f"/records/{record_id}", ""),
    ]


async def measure(app: Any, pages: list[tuple[str, str, str]]) -> list[tuple[str, float, list[float], int]]:
    out = []
    for name, path, query in pages:
        await _request(app, path, query)  # warm: plans, pools, templates
        runs = []
        status = 0
        for _ in range(REPEAT):
            ms, status = await _request(app, path, query)
            runs.append(ms)
        out.append((name, statistics.median(runs), runs, status))
    return out


def run(bench: Any, row: Any) -> None:
    """The suite: fill ``bench``'s database, measure every page, add a row per case (``row``: bench's Row)."""
    from core import DistributedProcessor
    from core.web import dashboard

    finished, pending = (200_000, 20_000) if bench.quick else (10_000_000, 1_000_000)
    print(f"dashboard: every page's server time beside {finished:,} finished and {pending:,} pending records")
    t0 = time.perf_counter()
    fill(bench.dsn, finished=finished, pending=pending)
    fill_s = time.perf_counter() - t0
    bench.settle()
    with DistributedProcessor(bench.dsn, instance_id="bench-dashboard") as p:
        p.register_instance({"role": "bench"})
        held = p.claim_records(50, queues=list(QUEUES))  # some processing, held by a live instance
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            top = conn.execute("SELECT max(id) FROM processing_queue").fetchone()[0]  # type: ignore[index]
            failed = conn.execute("SELECT max(id) FROM processing_queue WHERE status = 'failed'"
                                  " AND ordering_key IS NOT NULL").fetchone()[0]  # type: ignore[index]
            key = conn.execute("SELECT ordering_key FROM processing_queue WHERE id = %s",
                               (failed,)).fetchone()[0]  # type: ignore[index]
        app = dashboard(p)
        results = asyncio.run(measure(app, cases(top - 60, failed, key)))
        p.release_records(held)
    for name, median, runs, status in results:
        bench.add(row("dashboard", name, median, "ms", target=f"< {TARGET_MS:g} ms",
                      met=median < TARGET_MS and status == 200,
                      extra={"runs": [round(r, 2) for r in runs], "status": status, "finished": finished,
                             "pending": pending, "fill_seconds": round(fill_s, 1)}))
