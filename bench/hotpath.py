"""Suite ``hotpath`` (``python -m bench --only hotpath``): where a record's server cost goes (issue 27, item 1).

What is measured, at 80-byte and 1 KB payloads (JSON text of exactly that size), W=2 processes, batch 100:

* ``ours``: ``DistributedProcessor.run()`` draining with a no-op handler (as the drain suite's workers: 2
  claimers, 10 handler threads, heartbeats and recovery on), records inserted by ``add_records`` in batches of
  10,000;
* ``bare``: the two-statement loop of issue 27 over a bare table ``bare (id bigserial PRIMARY KEY, status text,
  payload jsonb, created_at timestamptz)`` with one partial index on pending: ``UPDATE ... SET status =
  'processing' WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING id, payload``, then
  ``UPDATE ... SET status = 'done' WHERE id = ANY(...)``, each committed. The primary key is there because the
  completion finds its rows by id (without it, every completion is a sequential scan).

Every measurement gets a database of its own (``dp_hotpath_<pid>_<n>_<variant>``, cloned from a migrated
template or created empty for the bare table), filled, ``VACUUM ANALYZE``d, then a ``CHECKPOINT`` (so each run
pays the same full-page images); every database this suite creates is dropped at the end, also on failure or
SIGTERM. Pairs alternate (ours, bare, ours, bare, ...), and figures are medians; a ratio is taken within one run.

Per record, for each run:

* records/s (records drained / time from the start signal to the last worker's end);
* WAL bytes: ``pg_current_wal_lsn()`` at the start signal and when the last worker has drained (the whole
  server's WAL); ``pg_walinspect`` then attributes each WAL record of that range to a relation of the database
  (or to the commit of a transaction that wrote there) and gives the breakdown by resource manager, record type
  and relation, with full-page images apart (a temporary physical replication slot, gone with its session,
  keeps the range from being recycled until it is read). The figure reported is the LSN difference times the share of
  the range's record bytes attributed to the run (1.0 when nothing else wrote; the raw difference is kept too),
  the median of the runs in which no checkpoint began (another session's CHECKPOINT makes every page touched
  after it write a second full-page image; such runs are flagged and kept in the JSON);
* index tuple insertions per index: the btree leaf insertions (INSERT_LEAF, INSERT_POST and level-0 splits) of
  that WAL range, per index; and ``n_tup_upd`` / ``n_tup_hot_upd`` / ``n_tup_ins`` / ``n_tup_del`` of every
  table (``pg_stat_user_tables``), ``idx_scan`` per index;
* server CPU: user + system time of the database's backends (``/proc/<pid>/stat``, read every 20 ms from the
  start signal: see BackendCpu), and apart, the walwriter, checkpointer and background writer of the whole
  server; the workers' own CPU (client side);
* the machine's other load: busy CPU of the whole machine minus the workers, the backends and the background
  processes, per second of the run (2 cores: 2.0 is everything).

The pairs run on the server every suite uses (DATABASE_URL, else 127.0.0.1:5432). A private cluster of the
machine's PostgreSQL binaries (fsync, full-page writes and synchronous commit on, 128 MB of shared buffers,
autovacuum off, as that server; ``pg_stat_statements`` preloaded) is started on a free port, and stopped and
removed at the end. It runs the same pairs again where nothing else writes (no other session's checkpoint in a
run), one drain of each side with ``auto_explain`` sampling 5 % of the statements with their actual times per
plan node (the per-statement breakdown), and the experiments.

The measured code is the committed one (``git archive`` of ``DP_HOTPATH_REF``, default HEAD, into a temporary
folder; ``DP_HOTPATH_REF=worktree`` runs the working tree): the migration, the fill and the workers run there,
so edits in progress in the checkout are not measured.

Experiments (on scratch databases of the private cluster, the DDL applied to a copy of our schema made by the
migrations):

* (a) ``fillfactor`` 90 / 80 / 70 on processing_queue, real ``run()``;
* (b) the statement-level stats triggers dropped, real ``run()``;
* (c) the payload in a table of its own written once (the claim row keeps ``'{}'``), (d) finished records
  deleted, or moved to a history table, by the completing statement, and their combinations: a trimmed copy of
  our claim statement (the completion of the previous batch and the claim of the next in one statement, fenced
  by id and lease token, the same columns set and returned; no floors, rates, pause or per-key checks), defined
  below, against the same trimmed statement over the unchanged schema.

``python -m bench --only hotpath`` (full: 100,000 records, 5 pairs, 3 private-cluster pairs, 3 experiment
rounds at both sizes: about 50 minutes on 2 cores), ``--quick`` (5,000 records, 1 pair, the breakdown, 1 round
at 80 B: about a minute). ``DP_HOTPATH_EXPERIMENTS=0`` skips the experiments, ``DP_HOTPATH_STATEMENTS=0`` the
breakdown; ``DP_HOTPATH_N`` / ``DP_HOTPATH_PAIRS`` / ``DP_HOTPATH_SCRATCH_PAIRS`` / ``DP_HOTPATH_ROUNDS``
override the sizes, ``DP_HOTPATH_WORKERS`` the processes per side (2). docs/hot-path.md reads the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
SIZES = (80, 1024)
BATCH = 100
WORKERS = int(os.environ.get("DP_HOTPATH_WORKERS", "2"))  # processes per side (issue 27 asks W=2 and W=4)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------------------------- statements

BARE_DDL = (
    "CREATE TABLE bare (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'pending', payload jsonb NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX bare_pending ON bare (id) WHERE status = 'pending'",
)
BARE_CLAIM = ("UPDATE bare SET status = 'processing' WHERE id IN ("
              "SELECT id FROM bare WHERE status = 'pending' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
              " RETURNING id, payload")
BARE_COMPLETE = "UPDATE bare SET status = 'done' WHERE id = ANY(%s)"

FILLFACTOR_80 = "ALTER TABLE processing_queue SET (fillfactor = 80)"
DROP_TRIGGERS = tuple(f"DROP TRIGGER dp_track_finished_{op} ON processing_queue" for op in ("update", "delete",
                                                                                          "insert"))
PAYLOAD_DDL = ("CREATE TABLE processing_payload (id bigint PRIMARY KEY, payload jsonb NOT NULL)",)
# Finished records with retention's index (finished_at) and lookup by id.
HISTORY_DDL = (
    "CREATE TABLE processing_history (LIKE processing_queue INCLUDING DEFAULTS)",
    "ALTER TABLE processing_history ADD PRIMARY KEY (id)",
    "CREATE INDEX ix_processing_history_finished ON processing_history (finished_at)",
)
# The same with retention's index a BRIN (an insert-only table in finished_at order: one summary per 128 pages).
HISTORY_BRIN_DDL = (*HISTORY_DDL[:2],
                    "CREATE INDEX ix_processing_history_finished ON processing_history USING brin (finished_at)")
COLUMNS = ("id, queue, payload, status, priority, run_at, attempts, max_attempts, claimed_by, claimed_at, "
           "lease_expires_at, lease_token, last_error, ordering_key, dedupe_key, dedupe_while, dedupe_held, "
           "cancel_requested, key_blocked, created_at, updated_at, finished_at, flow_run_id, step, flow_index, "
           "waiting_on")

# The fence of core/sql/claims.sql: ids sorted, each row's own token found by width_bucket.
FENCE = """d.id = ANY(%(done_ids)s::bigint[])
       AND d.lease_token = (%(done_tokens)s::uuid[])[width_bucket(d.id, %(done_ids)s::bigint[])]
       AND d.status = 'processing'"""
# The claim's flow settlement (since e1d3725) has this shape: an aggregate over the finished flow steps, calling
# dp_flow_settle only when there is one. The records here are not flow steps, so the function is never called;
# it is left out (its signature changes with the flows work) and the aggregate kept. The run committed in
# bench/results/hotpath-2026-12-06.json called it as e1d3725 did (its statements are in the JSON).
SETTLED = """settled AS (
    SELECT count(*) FILTER (WHERE s.status = 'completed') + count(*) FILTER (WHERE s.status = 'cancelled') AS n
      FROM {source} s
     WHERE s.flow_run_id IS NOT NULL
    HAVING count(*) > 0)"""
COUNTED = """counted AS (
    INSERT INTO queue_stats AS s (queue, status, slot, count)
    SELECT queue, status, pg_backend_pid() %% 16, count(*) FROM {source} GROUP BY queue, status ORDER BY 1, 2
    ON CONFLICT (queue, status, slot) DO UPDATE SET count = s.count + EXCLUDED.count)"""
DONE = {
    # As core/sql/claims.sql's claim: the row stays, updated to its final state (the stats trigger counts it).
    "update": f"""done AS (
    UPDATE processing_queue d
       SET status = CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END,
           finished_at = now(), updated_at = now(), lease_expires_at = NULL, dedupe_held = false
     WHERE {FENCE}
    RETURNING d.id, d.queue, d.ordering_key, d.status, d.flow_run_id),
{SETTLED.format(source="done")}""",
    # Deleted; the finished count kept by the statement itself (the stats trigger counts finished rows only).
    "delete": f"""done AS (
    DELETE FROM processing_queue d
     WHERE {FENCE}
    RETURNING d.id, d.queue, d.ordering_key, CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END
              AS status, d.flow_run_id),
{SETTLED.format(source="done")},
{COUNTED.format(source="done")}""",
    # Moved to processing_history in its final state (one insert there), counted by the statement.
    "history": f"""done AS (
    DELETE FROM processing_queue d
     WHERE {FENCE}
    RETURNING d.*),
moved AS (
    INSERT INTO processing_history ({COLUMNS})
    SELECT id, queue, payload, CASE WHEN cancel_requested THEN 'cancelled' ELSE 'completed' END, priority, run_at,
           attempts, max_attempts, claimed_by, claimed_at, NULL, lease_token, last_error, ordering_key, dedupe_key,
           dedupe_while, false, cancel_requested, key_blocked, created_at, now(), now(), flow_run_id, step,
           flow_index, waiting_on
      FROM done
    RETURNING id, queue, ordering_key, status, flow_run_id),
{SETTLED.format(source="moved")},
{COUNTED.format(source="moved")}""",
}
CLAIM = """picked AS (
    SELECT r.id FROM processing_queue r
     WHERE r.queue = 'default' AND r.status = 'pending' AND NOT r.key_blocked AND r.run_at <= now()
     ORDER BY - r.priority::bigint, r.run_at, r.id
     LIMIT %(batch)s
       FOR UPDATE OF r SKIP LOCKED),
claimed AS (
    UPDATE processing_queue t
       SET status = 'processing', claimed_by = %(instance_id)s, claimed_at = clock_timestamp(),
           lease_expires_at = clock_timestamp() + 30 * interval '1 second', lease_token = %(token)s::uuid,
           attempts = t.attempts + 1, dedupe_held = t.dedupe_held AND t.dedupe_while = 'active', updated_at = now()
     WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id, t.queue, t.payload, t.priority, t.attempts, t.max_attempts, t.claimed_at, t.lease_expires_at,
              t.run_at, t.created_at, t.ordering_key, t.dedupe_key, t.cancel_requested, t.flow_run_id, t.step,
              CASE WHEN t.flow_run_id IS NOT NULL THEN NULL::jsonb END AS parents)"""
COMPLETED = "(SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM settled) AS completed"
SELECT_INLINE = f"""SELECT claimed.*, {COMPLETED}
  FROM (SELECT 1) AS one LEFT JOIN claimed ON true"""
# The payload from its own table (written once at insert, never updated).
SELECT_SPLIT = f"""SELECT claimed.*, p.payload AS body, {COMPLETED}
  FROM (SELECT 1) AS one LEFT JOIN claimed ON true LEFT JOIN processing_payload p ON p.id = claimed.id"""


def trimmed(done: str, split: bool) -> str:
    return f"WITH {DONE[done]},\n{CLAIM}\n{SELECT_SPLIT if split else SELECT_INLINE}"


TRIMMED = {
    "update": trimmed("update", False),
    "split": trimmed("update", True),
    "delete": trimmed("delete", False),
    "history": trimmed("history", False),
    "split_delete": trimmed("delete", True),
    "split_history": trimmed("history", True),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    worker: str  # ours | bare | trim
    trim: str = ""
    fill: str = "ours"  # ours | split | bare
    ddl: tuple[str, ...] = ()
    reference: str = ""  # the variant it changes one thing of


OURS = Variant("ours", "run(), schema unchanged", "ours")
BARE = Variant("bare", "bare loop", "bare", fill="bare", ddl=BARE_DDL)
EXPERIMENTS = (
    OURS,
    BARE,
    *(Variant(f"ff{f}", f"(a) run(), fillfactor {f}", "ours",
              ddl=(f"ALTER TABLE processing_queue SET (fillfactor = {f})",), reference="ours") for f in (90, 80, 70)),
    Variant("notrigger", "(b) run(), stats triggers dropped", "ours", ddl=DROP_TRIGGERS, reference="ours"),
    Variant("trim", "trimmed claim, schema unchanged", "trim", "update"),
    Variant("trim_split", "(c) trimmed claim, payload in its own table", "trim", "split", fill="split",
            ddl=PAYLOAD_DDL, reference="trim"),
    Variant("trim_delete", "(d) trimmed claim, finished deleted", "trim", "delete", reference="trim"),
    Variant("trim_history", "(d) trimmed claim, finished moved to history", "trim", "history", ddl=HISTORY_DDL,
            reference="trim"),
    Variant("trim_split_delete", "(c+d+b) payload apart, finished deleted, no triggers", "trim", "split_delete",
            fill="split", ddl=PAYLOAD_DDL + DROP_TRIGGERS, reference="trim"),
    Variant("trim_split_history", "(c+d+b) payload apart, finished moved to history, no triggers", "trim",
            "split_history", fill="split", ddl=PAYLOAD_DDL + HISTORY_DDL + DROP_TRIGGERS, reference="trim"),
    Variant("trim_split_history_brin", "(c+d+b) as above, history's finished_at index a BRIN", "trim",
            "split_history", fill="split", ddl=PAYLOAD_DDL + HISTORY_BRIN_DDL + DROP_TRIGGERS, reference="trim"),
    Variant("trim_split_history_brin_ff80", "(a+b+c+d) as above, fillfactor 80", "trim", "split_history",
            fill="split", ddl=(*PAYLOAD_DDL, *HISTORY_BRIN_DDL, *DROP_TRIGGERS, FILLFACTOR_80), reference="trim"),
    Variant("trim_split_delete_ff80", "(a+b+c+d) payload apart, finished deleted, no triggers, fillfactor 80",
            "trim", "split_delete", fill="split", ddl=(*PAYLOAD_DDL, *DROP_TRIGGERS, FILLFACTOR_80), reference="trim"),
)


def payload_text(n: int, size: int) -> str:
    """A JSON object of exactly ``size`` bytes of text, different for every ``n``."""
    head = json.dumps({"n": n, "kind": "bench", "pad": ""}, separators=(",", ":"))
    return head[:-2] + "x" * max(0, size - len(head)) + '"}'


# ---------------------------------------------------------------------------------------------- subprocesses
# Run in the exported code's folder (its core, its migrations): ``python -m bench.hotpath <command> ...``.


def _cmd_migrate(dsn: str) -> None:
    from core.migrate import upgrade

    upgrade(dsn)


def _cmd_fill(dsn: str, n: int, size: int, shape: str) -> None:
    if shape == "bare":
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor().copy(
                "COPY bare (payload) FROM STDIN") as copy:
            for g in range(1, n + 1):
                copy.write_row((payload_text(g, size),))
        return
    from core import DistributedProcessor

    with DistributedProcessor(dsn) as p, psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, n, 10_000):
            part = range(start + 1, min(n, start + 10_000) + 1)
            if shape == "split":
                ids = p.add_records([{} for _ in part])
                with conn.cursor().copy("COPY processing_payload (id, payload) FROM STDIN") as copy:
                    for rid, g in zip(ids, part, strict=True):
                        copy.write_row((rid, payload_text(g, size)))
            else:
                p.add_records([json.loads(payload_text(g, size)) for g in part])


def _drained(done: int, cpu0: float) -> None:
    print("drained " + json.dumps({"done": done, "end": time.time(), "cpu": time.process_time() - cpu0,
                                   "rss": psutil.Process().memory_info().rss}), flush=True)


def _cmd_worker(mode: str, dsn: str, batch: int, trim: str) -> None:
    if mode == "ours":
        from core import DistributedProcessor

        # As bench/workers.py's ``ours``: defaults (recovery and heartbeats on), 2 claimers, 10 handler threads.
        with DistributedProcessor(dsn, batch_size=batch) as p:
            p.get_queue_status()  # connected before the start signal
            print("ready", flush=True)
            sys.stdin.readline()
            cpu0 = time.process_time()
            summary = p.run(lambda record: None, stop_when_empty=True, poll_interval=0.2, handle_signals=False,
                            claimers=2, concurrency=10)
            _drained(summary.processed, cpu0)
            sys.stdin.readline()  # connections stay open until the server's CPU has been read
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        if mode == "trim":  # our processor's session settings
            conn.execute("SELECT set_config('plan_cache_mode', 'force_generic_plan', false),"
                         " set_config('jit', 'off', false), set_config('enable_seqscan', 'off', false)")
        print("ready", flush=True)
        sys.stdin.readline()
        cpu0 = time.process_time()
        done = 0
        if mode == "bare":
            while True:
                rows = conn.execute(BARE_CLAIM, (batch,)).fetchall()
                if not rows:
                    break
                conn.execute(BARE_COMPLETE, ([r[0] for r in rows],))
                done += len(rows)
        else:
            statement, instance = TRIMMED[trim], f"hotpath-{os.getpid()}"
            held: list[int] = []
            token = uuid.uuid4()
            while True:  # each statement completes the previous batch (fenced) and claims the next
                new = uuid.uuid4()
                rows = conn.execute(statement, {"done_ids": held, "done_tokens": [token] * len(held),
                                                "batch": batch, "instance_id": instance, "token": new}).fetchall()
                done += int(rows[0][-1])  # the completions the fence let through
                held = sorted(r[0] for r in rows if r[0] is not None)
                token = new
                if not held:
                    break
        _drained(done, cpu0)
        sys.stdin.readline()


# ---------------------------------------------------------------------------------------------- the code measured


def export_code(ref: str) -> tuple[Path, str]:
    """The code to measure: ``git archive`` of ``ref`` (core, migrations and this file) in a temporary folder
    (read-only for the repository), or the working tree itself."""
    if ref == "worktree":
        return ROOT, "working tree"
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(tempfile.mkdtemp(prefix=f"dp-hotpath-{sha[:12]}-"))
    archive = subprocess.run(["git", "archive", sha, "core", "migrations"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    (path / "bench").mkdir()
    (path / "bench" / "__init__.py").write_text("")
    shutil.copy(Path(__file__), path / "bench" / "hotpath.py")
    return path, sha


# ---------------------------------------------------------------------------------------------- server CPU


def _ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


class BackendCpu:
    """User + system CPU of one database's backends over a run, read from /proc (the server is local): the
    backends are found in pg_stat_activity every 60 ms and their counters read every 20 ms, so a backend that
    exits (run() closes its connections when it returns) loses at most its last 20 ms."""

    def __init__(self, meta_dsn: str, dbname: str) -> None:
        self.conn = psycopg.connect(meta_dsn, autocommit=True)
        self.dbname = dbname
        self.base: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.gone: set[int] = set()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _discover(self, at_start: bool = False) -> None:
        for (pid,) in self.conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.dbname,)):
            if pid not in self.last:
                t = _ticks(pid)
                if t is not None:
                    self.base[pid] = t if at_start else 0  # a backend started after the signal: all of it
                    self.last[pid] = t

    def _read(self) -> None:
        for pid in list(self.last):
            if pid in self.gone:
                continue
            t = _ticks(pid)
            if t is None:
                self.gone.add(pid)
            else:
                self.last[pid] = t

    def start(self) -> None:
        self._discover(at_start=True)
        self.thread.start()

    def _loop(self) -> None:
        i = 0
        while not self.stop_event.wait(0.02):
            i += 1
            self._read()
            if i % 3 == 0:
                with contextlib.suppress(psycopg.Error):
                    self._discover()

    def stop(self) -> float:
        self.stop_event.set()
        self.thread.join(5)
        self._read()
        self._discover()
        self.conn.close()
        return sum(self.last[p] - self.base[p] for p in self.last) / CLK_TCK


def _background_ticks(conn: psycopg.Connection[Any]) -> int:
    pids = [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')")]
    return sum(_ticks(p) or 0 for p in pids)


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


# ---------------------------------------------------------------------------------------------- WAL

WAL_QUERY = r"""
WITH r AS (
    SELECT xid::text::bigint AS xid, resource_manager AS rm, record_type AS rt, record_length AS len,
           fpi_length AS fpi,
           substring(block_ref FROM 'rel \d+/(\d+)/\d+')::bigint AS db,
           substring(block_ref FROM 'rel \d+/\d+/(\d+)')::bigint AS fn,
           coalesce(substring(block_ref FROM 'rel \d+/\d+/\d+ fork (\w+)'), 'main') AS fork,
           CASE WHEN resource_manager = 'Btree' AND record_type LIKE 'SPLIT%%'
                THEN substring(description FROM 'level:? (\d+)')::int END AS level
      FROM pg_get_wal_records_info(%(a)s, %(b)s)
), ours AS (
    SELECT DISTINCT xid FROM r WHERE db = %(db)s AND xid <> 0
)
SELECT CASE WHEN r.db = %(db)s THEN 'db'
            WHEN r.db IS NULL AND r.xid IN (SELECT xid FROM ours) THEN 'xact'
            ELSE 'other' END AS scope,
       rm, rt, CASE WHEN r.db = %(db)s THEN fn END, CASE WHEN r.db = %(db)s THEN fork END, level,
       count(*), sum(len), sum(fpi)
  FROM r
 GROUP BY 1, 2, 3, 4, 5, 6
"""


def wal_breakdown(meta_dsn: str, dsn: str, a: str, b: str, dboid: int, n: int) -> dict[str, Any]:
    """The WAL records of [a, b) attributed to the database ``dboid``: per record of the drain, by resource
    manager, record type and relation (full-page images apart), and the btree leaf insertions per index."""
    with psycopg.connect(meta_dsn, autocommit=True) as conn:
        conn.execute("SET work_mem = '64MB'")
        deadline = time.monotonic() + 10
        # pg_walinspect reads only flushed WAL: the end of the range may still be in the WAL buffers.
        while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (b,)).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        rows = conn.execute(WAL_QUERY, {"a": a, "b": b, "db": dboid}).fetchall()
    fns = sorted({r[3] for r in rows if r[3] is not None})
    names: dict[int, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for fn in fns:
            rel = conn.execute("SELECT pg_filenode_relation(0, %s::oid)::regclass::text", (fn,)).fetchone()
            names[fn] = str(rel[0]) if rel and rel[0] else f"filenode {fn}"
    total = sum(r[7] for r in rows)
    checkpoints = sum(r[6] for r in rows if r[1] == "XLOG" and r[2].startswith("CHECKPOINT"))
    attributed = sum(r[7] for r in rows if r[0] != "other")
    items: dict[tuple[str, str, str], list[float]] = {}
    inserts: dict[str, float] = {}
    for scope, rm, rt, fn, fork, level, count, length, fpi in rows:
        if scope == "other":
            continue
        rel = (names.get(fn, "?") + ("" if fork == "main" else f" ({fork})")) if fn is not None else "-"
        key = (rm, rt, rel)
        acc = items.setdefault(key, [0, 0, 0])
        acc[0] += count
        acc[1] += length
        acc[2] += fpi
        is_leaf_insert = rt.startswith(("INSERT_LEAF", "INSERT_POST")) or (rt.startswith("SPLIT") and level == 0)
        if rm == "Btree" and fork == "main" and is_leaf_insert:
            inserts[rel] = inserts.get(rel, 0) + count / n
    breakdown = sorted(({"rm": k[0], "type": k[1], "relation": k[2], "count": v[0] / n, "bytes": v[1] / n,
                         "fpi_bytes": v[2] / n} for k, v in items.items()), key=lambda x: -x["bytes"])
    return {"attributed_share": attributed / total if total else None, "checkpoint_records": checkpoints,
            "attributed_bytes": attributed / n,
            "fpi_bytes": sum(v[2] for v in items.values()) / n,
            "records": sum(v[0] for v in items.values()) / n,
            "index_leaf_inserts": {k: round(v, 3) for k, v in sorted(inserts.items())},
            "breakdown": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()}
                          for x in breakdown if x["bytes"] >= 0.05 or x["count"] >= 0.01]}


# ---------------------------------------------------------------------------------------------- statistics

TABLE_STATS = ("SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables")
INDEX_STATS = ("SELECT indexrelname, idx_scan, idx_tup_read, idx_tup_fetch FROM pg_stat_user_indexes")
PGSS = """
SELECT queryid, toplevel, plans, left(regexp_replace(query, '\\s+', ' ', 'g'), 220), calls, rows, total_exec_time,
       total_plan_time, wal_bytes, wal_records, wal_fpi, shared_blks_hit, shared_blks_read, shared_blks_dirtied
  FROM pg_stat_statements WHERE dbid = %s
"""


def _stats(dsn: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = {r[0]: tuple(r[1:]) for r in conn.execute(TABLE_STATS)}
        indexes = {r[0]: tuple(r[1:]) for r in conn.execute(INDEX_STATS)}
    return tables, indexes


def _diff(after: dict[str, tuple[int, ...]], before: dict[str, tuple[int, ...]], names: tuple[str, ...],
          n: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for rel, values in after.items():
        old = before.get(rel, (0,) * len(values))
        d = {name: round(((v or 0) - (o or 0)) / n, 4) for name, v, o in zip(names, values, old, strict=True)}
        if any(d.values()):
            out[rel] = d
    return out


# ---------------------------------------------------------------------------------------------- plans

# A sample of the statements, each with its actual time per plan node (and the triggers' time).
AUTO_EXPLAIN = {
    "session_preload_libraries": "auto_explain", "auto_explain.log_min_duration": "0",
    "auto_explain.sample_rate": "0.05", "auto_explain.log_analyze": "on", "auto_explain.log_buffers": "on",
    "auto_explain.log_wal": "on", "auto_explain.log_timing": "on", "auto_explain.log_triggers": "on",
    "auto_explain.log_format": "json",
}


def _kind(query: str) -> str:
    q = " ".join(query.split())
    for prefix, kind in (("WITH done AS", "claim (with the previous batch's completion)"),
                         ("WITH beat AS", "heartbeat"),
                         ("UPDATE bare SET status = 'processing'", "bare claim"),
                         ("UPDATE bare SET status = 'done'", "bare completion")):
        if q.startswith(prefix):
            return kind
    return q[:80]


def _ctes(node: dict[str, Any], out: dict[str, float]) -> None:
    """The inclusive time (ms, all loops) of each CTE's plan, by the CTE's name."""
    name = node.get("Subplan Name", "")
    if name.startswith("CTE "):
        out[name[4:]] = node.get("Actual Total Time", 0.0) * (node.get("Actual Loops", 1) or 1)
    for child in node.get("Plans", []):
        _ctes(child, out)


def _walk(node: dict[str, Any], context: str, acc: dict[str, list[float]], ctes: dict[str, float]) -> None:
    """Exclusive actual time (ms, all loops) of each node, labelled by type, relation or index, and the CTE or
    subplan it belongs to. A CTE runs inside the scans that read it, and its plan is listed apart: those scans
    are charged their time less the CTE's (up to its total). An InitPlan evaluated by a node other than the one
    it is listed under stays counted in both: read these as approximate, the CTE totals as exact."""
    context = node.get("Subplan Name", context)
    loops = node.get("Actual Loops", 1) or 1
    total = node.get("Actual Total Time", 0.0) * loops
    children = node.get("Plans", [])
    inner = sum(c.get("Actual Total Time", 0.0) * (c.get("Actual Loops", 1) or 1) for c in children)
    if node.get("Node Type") == "CTE Scan" and node.get("CTE Name") in ctes:
        taken = min(ctes[node["CTE Name"]], max(0.0, total - inner))
        ctes[node["CTE Name"]] -= taken
        inner += taken
    label = node.get("Node Type", "?")
    if node.get("CTE Name"):
        label += f" of {node['CTE Name']}"
    if node.get("Relation Name"):
        label += f" on {node['Relation Name']}"
    if node.get("Index Name"):
        label += f" using {node['Index Name']}"
    if node.get("Function Name"):
        label += f" {node['Function Name']}()"
    if context:
        label = f"[{context}] {label}"
    slot = acc.setdefault(label, [0.0, 0.0])
    slot[0] += max(0.0, total - inner)
    slot[1] += node.get("Actual Rows", 0) * loops
    for child in children:
        _walk(child, context, acc, ctes)


def explained(log: str) -> dict[str, Any]:
    """auto_explain's JSON plans in a stretch of the server log, by statement kind: how many were sampled, their
    median duration, and where the time went (exclusive time per node, the triggers apart), per statement."""
    plans: list[tuple[float, dict[str, Any]]] = []
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if "duration: " not in line or not line.rstrip().endswith("plan:"):
            continue
        body = []
        while i < len(lines) and lines[i].startswith("\t"):
            body.append(lines[i][1:])
            i += 1
        try:
            duration = float(line.split("duration: ", 1)[1].split(" ms", 1)[0])
            plans.append((duration, json.loads("\n".join(body))))
        except (ValueError, IndexError):
            continue
    kinds: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for duration, plan in plans:
        kinds.setdefault(_kind(plan.get("Query Text", "")), []).append((duration, plan))
    out: dict[str, Any] = {}
    for kind, items in kinds.items():
        acc: dict[str, list[float]] = {}
        triggers: dict[str, float] = {}
        cte_totals: dict[str, float] = {}
        for _, plan in items:
            ctes: dict[str, float] = {}
            _ctes(plan.get("Plan", {}), ctes)
            for name, t in ctes.items():
                cte_totals[name] = cte_totals.get(name, 0.0) + t
            _walk(plan.get("Plan", {}), "", acc, ctes)
            for trig in plan.get("Triggers", []):
                name = trig.get("Trigger Name", "?")
                triggers[name] = triggers.get(name, 0.0) + trig.get("Time", 0.0)
        k = len(items)
        total = sum(d for d, _ in items)
        items.sort(key=lambda x: x[0])
        out[kind] = {
            "sampled": k, "median_ms": items[k // 2][0], "mean_ms": total / k,
            "triggers_ms": {t: v / k for t, v in triggers.items()},
            # Inclusive: a CTE's time with whatever it ran of the CTEs it reads (claimed runs picked).
            "cte_ms": {c: round(v / k, 4) for c, v in sorted(cte_totals.items(), key=lambda x: -x[1])},
            "nodes": [{"node": label, "ms": round(v[0] / k, 4), "share": round(v[0] / total, 4) if total else None,
                       "rows": round(v[1] / k, 1)}
                      for label, v in sorted(acc.items(), key=lambda x: -x[1][0]) if v[0] / k >= 0.001][:25],
            "median_plan": items[k // 2][1],
        }
    return out


# ---------------------------------------------------------------------------------------------- a server


class Server:
    """A PostgreSQL server the suite creates its databases on (and drops them from)."""

    def __init__(self, admin_dsn: str, code: Path, tag: str, *, statements: bool = False,
                 log: Path | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.log = log  # the server's log file (a scratch cluster's): auto_explain's plans are read there
        self.code = code
        self.prefix = f"dp_hotpath_{os.getpid()}_{tag}"
        self.created: list[str] = []
        self.seq = 0
        self.statements = statements
        self.meta = self.create("meta")
        self.meta_dsn = self.dsn(self.meta)
        with psycopg.connect(self.meta_dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            if statements:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            self.settings = dict(conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync',"
                " 'full_page_writes', 'shared_buffers', 'autovacuum', 'wal_compression', 'max_wal_size',"
                " 'checkpoint_timeout', 'wal_level', 'shared_preload_libraries')").fetchall())
        self.template = self.create("tmpl")
        self.python(["migrate", self.dsn(self.template)])

    def dsn(self, name: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=name)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def create(self, label: str, template: str | None = None) -> str:
        self.seq += 1
        name = f"{self.prefix}_{self.seq}_{label}"[:63]
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                q = sql.SQL("{} TEMPLATE {}").format(q, sql.Identifier(template))
            self.created.append(name)
            conn.execute(q)
        return name

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        for name in list(reversed(self.created)):
            try:
                self.drop(name)
            except psycopg.Error as exc:
                print(f"  hotpath: could not drop {name}: {exc}", flush=True)

    def python(self, args: list[str]) -> None:
        subprocess.run([sys.executable, "-m", "bench.hotpath", *args], cwd=self.code, check=True, timeout=1800)

    def checkpoint(self) -> None:
        with self.admin() as conn:
            conn.execute("CHECKPOINT")

    def wait_idle(self, name: str, timeout: float = 30) -> None:
        """Until no backend is connected to ``name`` (their statistics are flushed when they exit)."""
        deadline = time.monotonic() + timeout
        with self.admin() as conn:
            while time.monotonic() < deadline:
                (busy,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                       (name,)).fetchone()  # type: ignore[misc]
                if not busy:
                    return
                time.sleep(0.05)

    # ------------------------------------------------------------------ one measurement

    def measure(self, variant: Variant, size: int, n: int, *, explain: bool = False) -> dict[str, Any]:
        """One drain of ``n`` records of ``size`` bytes in a database of its own (dropped after). ``explain``:
        auto_explain samples the drain's statements with their actual times per plan node (scratch cluster)."""
        name = self.create(variant.name, None if variant.worker == "bare" else self.template)
        try:
            return self._measure(name, variant, size, n, explain)
        finally:
            self.drop(name)

    def _lsn(self) -> str:
        with self.admin() as conn:
            return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]

    def _wal_since(self, lsn: str) -> int:
        with self.admin() as conn:
            return int(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn,)).fetchone()[0])  # type: ignore[index]

    def _measure(self, name: str, variant: Variant, size: int, n: int, explain: bool) -> dict[str, Any]:
        dsn = self.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in variant.ddl:
                conn.execute(statement)
            dboid = int(conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
                        .fetchone()[0])  # type: ignore[index]
        fill_lsn = self._lsn()
        t0 = time.perf_counter()
        self.python(["fill", dsn, str(n), str(size), variant.fill])
        fill_s = time.perf_counter() - t0
        fill_wal = self._wal_since(fill_lsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        if explain:  # the workers' sessions (opened after this) load auto_explain
            with self.admin() as conn:
                for key, value in AUTO_EXPLAIN.items():
                    conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(*key.split(".")), sql.Literal(value)))
        self.wait_idle(name)
        self.checkpoint()
        procs = [subprocess.Popen([sys.executable, "-m", "bench.hotpath", "worker", variant.worker, dsn, str(BATCH),
                                   variant.trim or "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=self.code) for _ in range(WORKERS)]
        try:
            return self._drain(procs, name, dsn, dboid, variant, size, n,
                               {"fill_seconds": fill_s, "fill_wal_bytes_per_record": fill_wal / n}, explain)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)

    def _drain(self, procs: list[subprocess.Popen[str]], name: str, dsn: str, dboid: int, variant: Variant,
               size: int, n: int, fill: dict[str, float], explain: bool) -> dict[str, Any]:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"hotpath worker failed to start: {line!r}")
        tables0, indexes0 = _stats(dsn)
        log_at = self.log.stat().st_size if explain and self.log else 0
        if self.statements:
            with psycopg.connect(self.meta_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
        cpu = BackendCpu(self.meta_dsn, name)
        # The run's WAL is kept until it has been read: a temporary physical slot (dropped with this session,
        # whatever happens) stops checkpoints, other sessions' included, from recycling its segments.
        holder = psycopg.connect(self.admin_dsn, autocommit=True)
        try:
            holder.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (f"{self.prefix}_wal",))
            return self._run_workers(procs, cpu, name, dsn, dboid, variant, size, n, fill, explain, log_at,
                                     tables0, indexes0)
        finally:
            holder.close()

    def _run_workers(self, procs: list[subprocess.Popen[str]], cpu: BackendCpu, name: str, dsn: str, dboid: int,
                     variant: Variant, size: int, n: int, fill: dict[str, float], explain: bool, log_at: int,
                     tables0: dict[str, tuple[int, ...]],
                     indexes0: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        with self.admin() as conn:
            lsn0 = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
            wal0 = conn.execute("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal").fetchone()
            bg0 = _background_ticks(conn)
            load = os.getloadavg()
            busy0 = _busy_cpu()
            cpu.start()
            started = time.time()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline()
                while line and not line.startswith("drained "):
                    line = p.stdout.readline()
                if not line:
                    raise RuntimeError("hotpath worker ended before it drained")
                outs.append(json.loads(line.split(" ", 1)[1]))
            lsn1 = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
            server_cpu = cpu.stop()
            # A checkpoint begun during the run (another session's CHECKPOINT, a CREATE DATABASE of the
            # file-copy kind) makes every page touched after it write a full-page image once more.
            redo_in_run = bool(conn.execute("SELECT redo_lsn > %s::pg_lsn FROM pg_control_checkpoint()",
                                            (lsn0,)).fetchone()[0])  # type: ignore[index]
            bg = (_background_ticks(conn) - bg0) / CLK_TCK
            busy = _busy_cpu() - busy0
            wal_lsn = int(conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (lsn1, lsn0)).fetchone()[0])  # type: ignore[index]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("exit\n")
            p.stdin.flush()
        for p in procs:
            p.communicate(timeout=120)
        self.wait_idle(name)
        tables1, indexes1 = _stats(dsn)
        plans = None
        if explain and self.log:
            with open(self.log, encoding="utf-8", errors="replace") as fh:
                fh.seek(log_at)
                plans = explained(fh.read())
        with self.admin() as conn:
            wal1 = conn.execute("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal").fetchone()
        done = sum(o["done"] for o in outs)
        elapsed = max(o["end"] for o in outs) - started
        client_cpu = sum(o["cpu"] for o in outs)
        per = max(done, 1)
        result: dict[str, Any] = {
            "variant": variant.name, "size": size, "records": done, "rate": done / elapsed, "elapsed": elapsed,
            "wal_bytes_per_record": wal_lsn / per,
            "pg_stat_wal_per_record": {k: float(b - a) / per for k, a, b in zip(("records", "fpi", "bytes"), wal0 or (),
                                                                            wal1 or (), strict=True)},
            "server_cpu_us_per_record": server_cpu / per * 1e6,
            "background_cpu_us_per_record": bg / per * 1e6,
            "client_cpu_us_per_record": client_cpu / per * 1e6,
            "other_load_cpus": max(0.0, busy - server_cpu - bg - client_cpu) / elapsed,
            "loadavg_at_start": load,
            "tables_per_record": _diff(tables1, tables0, ("ins", "upd", "hot_upd", "del"), per),
            "index_scans_per_record": {k: v["scan"] for k, v in _diff(indexes1, indexes0, ("scan", "read", "fetch"),
                                                                        per).items() if v["scan"]},
            **fill,
        }
        try:
            result["wal"] = wal_breakdown(self.meta_dsn, dsn, lsn0, lsn1, dboid, per)
        except psycopg.Error as exc:
            result["wal"] = {"error": str(exc).strip()}
        # The server's WAL of the run, less the share of its records that other work on the server wrote.
        result["wal_lsn_bytes_per_record"] = wal_lsn / per
        if result["wal"].get("attributed_share"):
            result["wal_bytes_per_record"] = wal_lsn / per * result["wal"]["attributed_share"]
            result["wal_without_fpi_bytes_per_record"] = result["wal"]["attributed_bytes"] - result["wal"]["fpi_bytes"]
        result["checkpoint_during_run"] = redo_in_run or bool(result["wal"].get("checkpoint_records"))
        if plans is not None:
            result["plans"] = plans
        if self.statements:
            with psycopg.connect(self.meta_dsn, autocommit=True) as conn:
                rows = conn.execute(PGSS, (dboid,)).fetchall()
            result["statements"] = sorted((
                {"toplevel": top, "query": q, "calls_per_record": calls / per, "rows_per_record": nrows / per,
                 "exec_us_per_record": exec_ms * 1000 / per, "plan_us_per_record": plan_ms * 1000 / per,
                 "mean_exec_ms": exec_ms / max(calls, 1), "plans_per_record": nplans / per,
                 "wal_bytes_per_record": float(wb) / per,
                 "wal_records_per_record": wr / per, "wal_fpi_per_record": wf / per,
                 "blks_hit_per_record": hit / per, "blks_read_per_record": rd / per,
                 "blks_dirtied_per_record": dirt / per}
                for _qid, top, nplans, q, calls, nrows, exec_ms, plan_ms, wb, wr, wf, hit, rd, dirt in rows
                if exec_ms * 1000 / per >= 0.05 or float(wb) / per >= 0.5), key=lambda s: -s["exec_us_per_record"])
        return result


# ---------------------------------------------------------------------------------------------- scratch cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScratchCluster:
    """A cluster of the machine's binaries with pg_stat_statements preloaded, on a free port; removed by close()."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bindir = bins[-1].parent
        self.home = Path(tempfile.mkdtemp(prefix="dp-hotpath-pg-"))
        self.data = self.home / "data"
        self.port = _free_port()
        self.started = False
        os.chmod(self.home, 0o755)
        self._own(self.home)

    @staticmethod
    def _own(path: Path) -> None:
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120, cwd=self.home)

    def start(self) -> ScratchCluster:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.home}'", "shared_buffers": "128MB", "fsync": "on",
                "full_page_writes": "on", "synchronous_commit": "on", "autovacuum": "off", "max_wal_size": "1GB",
                "shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "all",
                "pg_stat_statements.track_planning": "on", "max_connections": "100"}
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log),
                  "start")
        self.started = True
        return self

    def dsn(self) -> str:
        return make_conninfo(host="127.0.0.1", port=str(self.port), dbname="postgres", user="postgres")

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def close(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.SubprocessError):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the suite


def _median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(vals)) if vals else float("nan")


def _wal_median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r["wal"][key] for r in runs if key in r.get("wal", {})]
    return float(statistics.median(vals)) if vals else float("nan")


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose rate is the median's (its breakdown stands for the side)."""
    return sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rep = _median_run(runs)
    # WAL figures from the runs no checkpoint began in (when there is one): another session's checkpoint in the
    # middle of a run charges it a second full-page image of every page it touches after that.
    clean = [r for r in runs if not r.get("checkpoint_during_run")]
    used = f"{len(clean)} of {len(runs)} (runs without a checkpoint begun during them)" if clean else \
        f"all {len(runs)} (a checkpoint began during every one)"
    clean = clean or runs
    return {
        "rate": _median(runs, "rate"), "wal_bytes_per_record": _median(clean, "wal_bytes_per_record"),
        "wal_runs": used,
        "wal_bytes_per_record_all_runs": _median(runs, "wal_bytes_per_record"),
        "wal_lsn_bytes_per_record": _median(clean, "wal_lsn_bytes_per_record"),
        "wal_without_fpi_bytes_per_record": _median(clean, "wal_without_fpi_bytes_per_record"),
        "wal_fpi_bytes_per_record": _wal_median(clean, "fpi_bytes"),
        "wal_attributed_share": _wal_median(runs, "attributed_share"),
        "server_cpu_us_per_record": _median(runs, "server_cpu_us_per_record"),
        "client_cpu_us_per_record": _median(runs, "client_cpu_us_per_record"),
        "background_cpu_us_per_record": _median(runs, "background_cpu_us_per_record"),
        "other_load_cpus": _median(runs, "other_load_cpus"),
        "index_leaf_inserts_per_record": rep.get("wal", {}).get("index_leaf_inserts"),
        "tables_per_record": rep.get("tables_per_record"),
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def run(bench: Any) -> None:
    from bench.runner import Row

    quick = bench.quick
    n = int(os.environ.get("DP_HOTPATH_N", 5_000 if quick else 100_000))
    pairs = int(os.environ.get("DP_HOTPATH_PAIRS", 1 if quick else 5))
    scratch_pairs = int(os.environ.get("DP_HOTPATH_SCRATCH_PAIRS", 0 if quick else 3))
    rounds = int(os.environ.get("DP_HOTPATH_ROUNDS", 1 if quick else 3))
    experiments = os.environ.get("DP_HOTPATH_EXPERIMENTS", "1") != "0"
    statements = os.environ.get("DP_HOTPATH_STATEMENTS", "1") != "0"
    code, sha = export_code(os.environ.get("DP_HOTPATH_REF", "HEAD"))
    idle0 = _busy_cpu()
    time.sleep(2)
    idle_load = (_busy_cpu() - idle0) / 2
    conditions: dict[str, Any] = {
        "code": sha, "records": n, "pairs": pairs, "private_cluster_pairs": scratch_pairs,
        "experiment_rounds": rounds, "workers": WORKERS, "batch": BATCH, "cpus": psutil.cpu_count(),
        "machine_busy_cpus_before": idle_load, "loadavg_before": os.getloadavg()}
    print(f"hotpath: {n:,} records per run, W={WORKERS}, batch {BATCH}, payloads {SIZES} bytes, code {sha};"
          f" machine busy {idle_load:.2f} CPUs before the start", flush=True)
    # SIGTERM ends the suite as Ctrl-C does: the finally blocks stop the workers, the scratch cluster, and drop
    # every database created (a background run ignores SIGINT).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    main = Server(bench.admin_dsn, code, "m")
    cluster: ScratchCluster | None = None
    scratch: Server | None = None
    try:
        conditions["server"] = {"version": main.version, **main.settings}
        # 1. the measurement on the server every suite uses: alternating pairs, ours then bare
        _pairs(bench, Row, main, "", pairs, n)
        if statements or experiments or scratch_pairs:
            try:
                cluster = ScratchCluster().start()
                scratch = Server(cluster.dsn(), code, "s", statements=True, log=cluster.log)
                conditions["private_cluster"] = {"version": scratch.version, **scratch.settings}
            except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
                print(f"  hotpath: no scratch cluster: {exc}", flush=True)
                bench.add(Row("hotpath", "scratch cluster unavailable", 0.0, "", extra={"error": str(exc)}))
        if scratch is not None:
            # 2. the same pairs where nothing else writes (no other session's checkpoint in a run)
            if scratch_pairs:
                _pairs(bench, Row, scratch, " (private cluster)", scratch_pairs, n)
            # 3. statements: pg_stat_statements and auto_explain's sampled plans
            if statements:
                _breakdown(bench, Row, scratch, n)
            # 4. experiments
            if experiments and (code / "core" / "sql" / "ddl" / "0018_payload_apart.sql").exists():
                # The experiments change the schema as it was before migration 0018 (payloads on the rows);
                # from 0018 on, the payloads are apart already, and experiment (c) is the code itself.
                print("  hotpath: experiments skipped: they measure the schema before migration 0018"
                      " (DP_HOTPATH_REF=<a commit before it>)", flush=True)
            elif experiments:
                _experiments(bench, Row, scratch, n, rounds, (80,) if quick else SIZES)
    finally:
        if scratch is not None:
            scratch.close()
        if cluster is not None:
            cluster.close()
        main.close()
        if code != ROOT:
            shutil.rmtree(code, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    conditions["loadavg_after"] = os.getloadavg()
    bench.add(Row("hotpath", "conditions", 0.0, "", extra=conditions))


def _line(size: int, label: str, r: dict[str, Any]) -> None:
    print(f"  {_stamp()} {size:>5} B {label:<28} {r['rate']:>9,.0f} rec/s {r['wal_bytes_per_record']:>7,.0f} WAL B/rec"
          f" ({r.get('wal_without_fpi_bytes_per_record', float('nan')):>5,.0f} without FPI)"
          f" {r['server_cpu_us_per_record']:>6,.1f} us server CPU/rec, other load {r['other_load_cpus']:.2f} CPUs"
          f"{'  (checkpoint begun during the run)' if r['checkpoint_during_run'] else ''}", flush=True)


def _pairs(bench: Any, row: Any, server: Server, where: str, pairs: int, n: int) -> None:
    for size in SIZES:
        ours_runs: list[dict[str, Any]] = []
        bare_runs: list[dict[str, Any]] = []
        for i in range(pairs):
            for variant, runs in ((OURS, ours_runs), (BARE, bare_runs)):
                r = server.measure(variant, size, n)
                runs.append(r)
                _line(size, f"pair {i + 1} {variant.name}{where}", r)
        o, b = _summary(ours_runs), _summary(bare_runs)
        extra = {"ours": o, "bare": b, "ours_runs": ours_runs, "bare_runs": bare_runs}
        bench.add(row("hotpath", f"{size} B: run() W={WORKERS} vs bare loop{where}", o["rate"], "rec/s", b["rate"],
                      f"bare loop W={WORKERS}, same run", target=">= 0.85x", met=o["rate"] / b["rate"] >= 0.85,
                      extra=extra))
        bench.add(row("hotpath", f"{size} B: WAL bytes/record, run(){where}", o["wal_bytes_per_record"], "B",
                      b["wal_bytes_per_record"], "bare loop", target="<= 800 B" if size == 80 else "",
                      met=(o["wal_bytes_per_record"] <= 800) if size == 80 else None,
                      extra={"ours_runs_used": o["wal_runs"], "bare_runs_used": b["wal_runs"],
                             "without_fpi": [o["wal_without_fpi_bytes_per_record"],
                                             b["wal_without_fpi_bytes_per_record"]]}))
        bench.add(row("hotpath", f"{size} B: server CPU us/record, run(){where}", o["server_cpu_us_per_record"], "us",
                      b["server_cpu_us_per_record"], "bare loop"))


def _breakdown(bench: Any, row: Any, server: Server, n: int) -> None:
    for size in SIZES:
        for variant in (OURS, BARE):
            r = server.measure(variant, size, n, explain=True)
            _line(size, f"{variant.name} (statements)", r)
            total = sum(s["exec_us_per_record"] for s in r.get("statements", []) if s["toplevel"])
            bench.add(row("hotpath", f"{size} B: {variant.name}: statement time us/record (pg_stat_statements,"
                          " auto_explain on 5 %)", total, "us", extra={"run": r}))


def _experiments(bench: Any, row: Any, server: Server, n: int, rounds: int, sizes: tuple[int, ...]) -> None:
    for size in sizes:
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in EXPERIMENTS}
        for i in range(rounds):
            order = EXPERIMENTS[i % len(EXPERIMENTS):] + EXPERIMENTS[:i % len(EXPERIMENTS)]
            for variant in order:
                r = server.measure(variant, size, n)
                runs[variant.name].append(r)
                _line(size, f"round {i + 1} {variant.name}", r)
        summaries = {name: _summary(rs) for name, rs in runs.items()}
        bare = summaries["bare"]
        for variant in EXPERIMENTS:
            s = summaries[variant.name]
            ref = summaries.get(variant.reference)
            extra = {"summary": s, "runs": [{k: v for k, v in r.items() if k != "statements"}
                                            for r in runs[variant.name]],
                     "reference": variant.reference,
                     "rate_vs_reference": s["rate"] / ref["rate"] if ref else None,
                     "wal_vs_reference": s["wal_bytes_per_record"] - ref["wal_bytes_per_record"] if ref else None,
                     "ddl": list(variant.ddl), "statement": TRIMMED.get(variant.trim)}
            bench.add(row("hotpath", f"experiment {size} B: {variant.label}", s["rate"], "rec/s", bare["rate"],
                          "bare loop, same rounds", extra=extra))


# ---------------------------------------------------------------------------------------------- entry points


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "migrate":
        _cmd_migrate(argv[1])
    elif command == "fill":
        _cmd_fill(argv[1], int(argv[2]), int(argv[3]), argv[4])
    elif command == "worker":
        _cmd_worker(argv[1], argv[2], int(argv[3]), argv[4])
    else:
        raise SystemExit(f"unknown command {command!r} (the suite runs as: python -m bench --only hotpath)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
