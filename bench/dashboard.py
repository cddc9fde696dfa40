"""The dashboard suite: every page's server time beside 10 M finished and 1 M pending records.

    python -m bench --only dashboard             # 10,000,000 finished + 1,000,000 pending (the fill takes minutes)
    python -m bench --only dashboard --quick     # 200,000 + 20,000

Beside them, flows (:func:`fill_flows`): 1,000,000 runs (20,000 quick) of two flows (an import one in ten), one
in 500 failed, one in 700 cancelled (one import in 700), the newest hundred running; the records of the latest
2,000 runs; and one running run with a for_each of 10,000 elements (2,000 quick) partly failed and pending.

The fill writes the rows with INSERT ... SELECT generate_series (the statement-level trigger keeps
``queue_stats`` right), spreads the finished ones over days (about 36,000 in the last hour, more than the
chart reads), sets failed records with errors, ordering and dedupe keys, claims a few records so that some
are processing under a live instance, and runs VACUUM ANALYZE as autovacuum would have. Each page (and each
filter of the records page) is then requested through the ASGI app in this process: the figure is the median
time from the request's start to the last byte of its response, the app's whole handling.
"""

from __future__ import annotations

import asyncio
import json
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
        conn.execute("TRUNCATE processing_queue, queue_stats, processor_instances, claim_floor_events, flow_runs,"
                     " flow_edges, flow_records")
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


def flows() -> tuple[Any, Any]:
    """The two templates the fill's runs are of: an order (a diamond and a for_each) and an import."""
    from core.flows import Flow

    order, imports = Flow("order", version=1), Flow("import", version=1)
    order.step(name="validate")(lambda r: [])
    order.step(name="charge", after=["validate"])(lambda r: None)
    order.step(name="reserve", after=["validate"])(lambda r: None)
    order.step(name="ship", after=["charge", "reserve"])(lambda r: None)
    order.step(name="label", for_each="validate")(lambda r: None)
    order.step(name="pack", after=["label"])(lambda r: None)
    order.on_failure(name="refund")(lambda r: None)
    imports.step(name="fetch")(lambda r: [])
    imports.step(name="parse", for_each="fetch")(lambda r: None)
    imports.step(name="store", after=["parse"])(lambda r: None)
    return order, imports


def fill_flows(dsn: str, *, runs: int, elements: int) -> dict[str, int]:
    """``runs`` flow runs beside the records ``fill`` wrote (ids from the records' sequence, as start_flow
    takes them), the records of the latest 2,000, and a running run of ``elements`` for_each elements; the
    ids the cases read (the big run, a failed run with its records, the second page's cursor)."""
    order, imports = flows()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE flow_runs, flow_edges, flow_templates, flow_records")
        for f in (order, imports):
            conn.execute("INSERT INTO flow_templates (name, version, def_hash, definition) VALUES (%s, 1, %s, %s)",
                         (f.name, f.definition_hash(), json.dumps(f.stored(5))))
        # One a second up to now, nine in ten orders; a run finishes 3 s after it starts.
        conn.execute(
            "INSERT INTO flow_runs (id, flow, version, status, input, failed_step, error, created_at, updated_at,"
            " finished_at)"
            " SELECT nextval(pg_get_serial_sequence('processing_queue', 'id')),"
            "  CASE WHEN g %% 10 = 3 THEN 'import' ELSE 'order' END, 1, s,"
            "  jsonb_build_object('order', g, 'items', jsonb_build_array('book', 'pen')),"
            "  CASE WHEN s = 'failed' THEN 'charge' END,"
            "  CASE WHEN s = 'failed' THEN 'ValueError: card declined (order ' || g || ')' END, t, t,"
            "  CASE WHEN s <> 'running' THEN t + interval '3 seconds' END"
            " FROM (SELECT g, now() - (%(n)s - g) * interval '1 second' AS t,"
            "        CASE WHEN g > %(n)s - 100 THEN 'running' WHEN g %% 500 = 0 THEN 'failed'"
            "             WHEN g %% 700 = 0 OR g %% 7000 = 3 THEN 'cancelled' ELSE 'completed' END AS s"
            "       FROM generate_series(1, %(n)s) g) x ORDER BY g", {"n": runs})
        # The latest 2,000 runs' records: a step per record, as the run's status leaves them.
        conn.execute(
            "INSERT INTO processing_queue (queue, payload, status, attempts, max_attempts, flow_run_id, step,"
            " flow_index, waiting_on, result, last_error, run_at, created_at, updated_at, finished_at)"
            " SELECT fr.flow, fr.input, st.status, CASE WHEN st.status IN ('pending', 'waiting') THEN 0 ELSE 1 END,"
            "  5, fr.id, st.step, CASE WHEN st.step = 'label' THEN 0 END,"
            "  CASE WHEN st.status = 'waiting' THEN 1 END,"
            "  CASE WHEN st.status = 'completed' THEN jsonb_build_object('step', st.step, 'ok', true) END,"
            "  CASE WHEN st.status = 'failed' THEN fr.error END, fr.created_at, fr.created_at, fr.updated_at,"
            "  CASE WHEN st.status IN ('completed', 'failed', 'cancelled') THEN fr.finished_at END"
            " FROM (SELECT * FROM flow_runs WHERE flow = 'order' ORDER BY id DESC LIMIT 2000) fr"
            " CROSS JOIN LATERAL (SELECT x.step, CASE"
            "   WHEN fr.status = 'running' THEN CASE WHEN x.step = 'validate' THEN 'pending' ELSE 'waiting' END"
            "   WHEN fr.status = 'failed' AND x.step = 'charge' THEN 'failed'"
            "   WHEN fr.status = 'failed' AND x.step IN ('ship') THEN 'cancelled'"
            "   WHEN fr.status = 'cancelled' AND x.step <> 'validate' THEN 'cancelled'"
            "   ELSE 'completed' END AS status"
            "   FROM unnest(ARRAY['validate', 'charge', 'reserve', 'ship', 'label', 'pack']) x(step)) st"
            " ORDER BY fr.id, st.step")
        failed = conn.execute("SELECT max(flow_run_id) FROM processing_queue WHERE status = 'failed'"
                              " AND flow_run_id IS NOT NULL").fetchone()[0]  # type: ignore[index]
        # The big run: validate, charge, reserve done, ship pending, `elements` labels (1 in 100 failed, the
        # last tenth pending), pack waiting for them.
        big = conn.execute(
            "INSERT INTO flow_runs (id, flow, version, status, input, created_at, updated_at)"
            " VALUES (nextval(pg_get_serial_sequence('processing_queue', 'id')), 'order', 1, 'running',"
            " '{\"order\": \"big\"}', now() - interval '10 minutes', now()) RETURNING id").fetchone()[0]  # type: ignore[index]
        conn.execute(
            "INSERT INTO processing_queue (queue, payload, status, attempts, max_attempts, flow_run_id, step,"
            " flow_index, waiting_on, result, last_error, run_at, created_at, updated_at, finished_at)"
            " SELECT 'order', to_jsonb(e), s, CASE WHEN s = 'pending' THEN 0 ELSE 1 END, 1, %(run)s, step, i,"
            "  CASE WHEN s = 'waiting' THEN %(left)s END,"
            "  CASE WHEN s = 'completed' THEN jsonb_build_object('label', 'label ' || e) END,"
            "  CASE WHEN s = 'failed' THEN 'PrinterError: label ' || e || ' jammed' END, now(), now(), now(),"
            "  CASE WHEN s IN ('completed', 'failed') THEN now() END"
            " FROM (SELECT 0 AS k, 'validate' AS step, NULL::int AS i, 0 AS e, 'completed' AS s"
            "       UNION ALL SELECT 1, 'charge', NULL, 0, 'completed' UNION ALL SELECT 2, 'reserve', NULL, 0,"
            "       'completed' UNION ALL SELECT 3, 'ship', NULL, 0, 'pending'"
            "       UNION ALL SELECT 5, 'pack', NULL, 0, 'waiting'"
            "       UNION ALL SELECT 4, 'label', e, e, CASE WHEN e %% 100 = 7 THEN 'failed'"
            "        WHEN e >= %(n)s * 9 / 10 THEN 'pending' ELSE 'completed' END"
            "        FROM generate_series(0, %(n)s - 1) e) x"
            " ORDER BY k, i", {"run": big, "n": elements, "left": elements - elements * 9 // 10})
        # Each run's list of records, as start_flow and the expansion write it (migration 0019).
        conn.execute("INSERT INTO flow_records (flow_run_id, record_id)"
                     " SELECT flow_run_id, id FROM processing_queue WHERE flow_run_id IS NOT NULL")
        second = conn.execute("SELECT id FROM flow_runs ORDER BY id DESC OFFSET 49 LIMIT 1").fetchone()[0]  # type: ignore[index]
        conn.execute("VACUUM ANALYZE flow_runs, flow_records")
        conn.execute("VACUUM ANALYZE processing_queue")
        conn.execute("ANALYZE flow_templates")
    return {"big": int(big), "failed": int(failed), "second": int(second)}


def flow_cases(ids: dict[str, int], at: int) -> list[tuple[str, str, str]]:
    """(case name, path, query): the flows pages, the records of a run, and the waiting records."""
    return [
        ("flows, no filter", "/flows", ""),
        ("flows, second page", "/flows", f"after={ids['second']}"),
        ("flows, flow=order", "/flows", "flow=order"),
        ("flows, flow=order, second page", "/flows", f"flow=order&after={ids['second']}&at={at}"),
        ("flows, status=failed (1 in 500)", "/flows", "status=failed"),
        ("flows, status=running", "/flows", "status=running"),
        ("flows, flow=import, status=cancelled", "/flows", "flow=import&status=cancelled"),
        ("flow run page (for_each of many)", f"/flows/{ids['big']}", ""),
        ("flow run page (failed)", f"/flows/{ids['failed']}", ""),
        ("records, flow run (for_each of many)", "/records", f"run={ids['big']}"),
        ("records, state=waiting", "/records", "state=waiting"),
    ]


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
    from core.web.source import micros

    finished, pending = (200_000, 20_000) if bench.quick else (10_000_000, 1_000_000)
    runs, elements = (20_000, 2_000) if bench.quick else (1_000_000, 10_000)
    print(f"dashboard: every page's server time beside {finished:,} finished and {pending:,} pending records, "
          f"{runs:,} flow runs")
    t0 = time.perf_counter()
    fill(bench.dsn, finished=finished, pending=pending)
    flow_ids = fill_flows(bench.dsn, runs=runs, elements=elements)
    fill_s = time.perf_counter() - t0
    bench.settle()
    with DistributedProcessor(bench.dsn, instance_id="bench-dashboard") as p:
        p.register_instance({"role": "bench"})
        held = p.claim_records(50, queues=list(QUEUES))  # some processing, held by a live instance
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            top = conn.execute("SELECT max(id) FROM processing_queue"  # the newest record outside flows
                               " WHERE flow_run_id IS NULL").fetchone()[0]  # type: ignore[index]
            failed = conn.execute("SELECT max(id) FROM processing_queue WHERE status = 'failed'"
                                  " AND ordering_key IS NOT NULL").fetchone()[0]  # type: ignore[index]
            key = conn.execute("SELECT ordering_key FROM processing_queue WHERE id = %s",
                               (failed,)).fetchone()[0]  # type: ignore[index]
            at = conn.execute("SELECT created_at FROM flow_runs WHERE id = %s",
                              (flow_ids["second"],)).fetchone()[0]  # type: ignore[index]
        app = dashboard(p)
        results = asyncio.run(measure(app, cases(top - 60, failed, key) + flow_cases(flow_ids, micros(at))))
        p.release_records(held)
    for name, median, times, status in results:
        bench.add(row("dashboard", name, median, "ms", target=f"< {TARGET_MS:g} ms",
                      met=median < TARGET_MS and status == 200,
                      extra={"runs": [round(r, 2) for r in times], "status": status, "finished": finished,
                             "pending": pending, "flow_runs": runs, "elements": elements,
                             "fill_seconds": round(fill_s, 1)}))
