"""The public entry point: :class:`DistributedProcessor`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from core import __version__
from core.constants import STATUSES
from core.dsn import KEEPALIVE_KWARGS, redact, resolve_dsn
from core.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidPayload,
    PoolExhausted,
    QueueFull,
    SchemaNotMigrated,
)
from core.instance import ProcessFacts, new_instance_id
from core.metrics import Metrics
from core.queries import Queries
from core.record import Record, format_error
from core.retry import RetryPolicy
from core.worker import Handler, RunSummary, Worker

log = logging.getLogger("core.processor")

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
MAX_BATCH = 10_000
ERROR_TEXT_LIMIT = 2000


class AddResult(list[int]):
    """The ids of an ``add_records`` call in input order; ``deduplicated`` lists the input indexes whose
    dedupe key was already held (their id is the existing record's)."""

    deduplicated: list[int]

    def __init__(self, ids: Iterable[int] = (), deduplicated: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.deduplicated = list(deduplicated)


def channel_for(schema: str, queue: str) -> str:
    """The NOTIFY channel of a queue (an identifier of at most 63 bytes)."""
    name = f"dproc:{schema}:{queue}"
    if len(name.encode()) > 63:
        name = "dproc:" + hashlib.sha1(f"{schema}:{queue}".encode()).hexdigest()
    return name


def glob_to_like(pattern: str) -> str:
    """Translate a glob (``*``, ``?``) into a LIKE pattern, escaping LIKE's own wildcards."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _loads(data: str | bytes) -> Any:
    # json.loads on bytes first sniffs the encoding; PostgreSQL always sends UTF-8, so decode first. This is
    # per record on the claim path, where it shows.
    return _json_decode(data if isinstance(data, str) else bytes(data).decode())


_json_decode = json.JSONDecoder().decode


# One encoder for every payload: json.dumps with options builds a new encoder per call.
_json_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _check_payloads(payloads: Sequence[Any]) -> None:
    for i, payload in enumerate(payloads):
        if not isinstance(payload, dict):
            raise InvalidPayload(i, f"expected a dict, got {type(payload).__name__}")


def _encode_payload(i: int, payload: dict[str, Any]) -> str:
    try:
        text = _json_encode(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(i, f"not JSON-serialisable ({exc})") from None
    if "\\u0000" in text:
        raise InvalidPayload(i, "contains a NUL character, which PostgreSQL JSONB cannot store")
    return text


# How far apart (in ids) two records of a key must be for the later one to be inserted claimable rather than
# blocked. A blocked record costs one more write when its key's head moves on (the unblock), which is most of
# what per-key ordering costs. Records of one batch share their priority and run_at, so claims reach them in
# id order; a record of an earlier batch counts when claims reach it first too (key_heads). By the time a
# claim reaches a record this far behind the previous one of its key, that one has been claimed and, unless
# its handler is slower than this many records, finished. If not, the claim rejects the record (it is never
# started out of order) and reads it again on its next statement, as it reads any key head's successor
# while the head runs. A failure that makes the key wait blocks its later records again (fail statement).
KEY_GAP = 1000


def inserted_blocked(
    keys: Sequence[str | None], prior: Mapping[str, int | None], first_id: int = 0, gap: int = KEY_GAP
) -> list[bool]:
    """Which records of a batch are inserted blocked (``key_blocked``): a keyed record with an earlier pending
    record of its key, unless that one is claimable, reached by claims first, and ``gap`` or more ids earlier.

    ``prior``: the keys that already have pending records, each with the id of its latest one when a new
    record may follow it claimable, else None. ``first_id``: a lower bound of the batch's first id (the
    later ones follow it in order).
    """
    blocked = [False] * len(keys)
    stuck = {k for k, last_id in prior.items() if last_id is None}  # every further record of these waits
    last = {k: last_id for k, last_id in prior.items() if last_id is not None}
    for i, k in enumerate(keys):
        if k is None:
            continue
        rid = first_id + i
        if k in stuck or (k in last and rid - last[k] < gap):
            blocked[i] = True
            stuck.add(k)
        last[k] = rid
    return blocked


# Records per COPY write: large enough to amortise the call, small enough to overlap with the server.
COPY_CHUNK = 1000
# Keys the maintenance sweep looks at per cleanup (a loose index scan: ~15 ms per 1,000 keys at 1M pending).
SWEEP_KEYS = 1000


# Sort key of the fenced statements' id arrays: id, then claimed_at (fields 0 and 7 of the named tuple;
# faster than attrgetter). For an id offered twice (an old claim and its re-claim) width_bucket picks the
# last, so the latest claim, the only one whose token can still be on the row, comes last.
_record_order = operator.itemgetter(0, 7)


def _token_text(tokens: list[Any]) -> dict[Any, str]:
    # A claim's records share its token: format each distinct one once, not once per record.
    return {t: str(t) for t in set(tokens)}


def _configure_connection(conn: Conn) -> None:
    set_json_loads(_loads, conn)


def _copy_text(value: str) -> str:
    """Escape a value for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _positive_int(name: str, value: object, *, allow_zero: bool = False, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if value < low:
        raise InvalidArgument(f"{name} must be >= {low}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{name} must be <= {maximum}, got {value}")
    return value


class DistributedProcessor:
    """Claim, process and complete records of a shared PostgreSQL table from any number of processes.

    Thread-safe: one instance may be shared by many threads. The constructor never connects; the first
    operation opens the pool, and an unreachable database raises :class:`core.errors.DatabaseUnavailable`
    after ``connect_timeout`` seconds.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        instance_id: str | None = None,
        queue: str = "default",
        batch_size: int = 100,
        lease_seconds: float = 30.0,
        max_attempts: int = 5,
        retry: RetryPolicy | None = None,
        schema: str = "public",
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        statement_timeout: float | None = 30.0,
        key_concurrency: int = 1,
        block_on_failure: bool = False,
        copy_threshold: int = 2000,
        cleanup_batch: int = 1000,
        dead_after: float | None = None,
        heartbeat_interval: float | None = None,
        cleanup_interval: float | None = None,
        notify: bool = True,
        application_name: str = "distributed-processor",
        instance_retention: float = 86400.0,
    ) -> None:
        self.dsn = resolve_dsn(dsn)
        if not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(f"schema must be a plain identifier, got {schema!r}")
        if not isinstance(queue, str) or not queue or len(queue) > 200:
            raise ConfigurationError("queue must be a non-empty string of at most 200 characters")
        try:
            self.batch_size = _positive_int("batch_size", batch_size, maximum=MAX_BATCH)
            self.max_attempts = _positive_int("max_attempts", max_attempts)
            self.pool_min = _positive_int("pool_min", pool_min, allow_zero=True)
            self.pool_max = _positive_int("pool_max", pool_max)
            self.key_concurrency = _positive_int("key_concurrency", key_concurrency)
            self.copy_threshold = _positive_int("copy_threshold", copy_threshold)
            self.cleanup_batch = _positive_int("cleanup_batch", cleanup_batch)
        except InvalidArgument as exc:
            raise ConfigurationError(str(exc)) from None
        if self.pool_min > self.pool_max:
            raise ConfigurationError("pool_min must not exceed pool_max")
        if not lease_seconds or lease_seconds <= 0:
            raise ConfigurationError("lease_seconds must be > 0")
        if connect_timeout <= 0:
            raise ConfigurationError("connect_timeout must be > 0")
        self.instance_id = instance_id or new_instance_id()
        self.queue = queue
        self.lease_seconds = float(lease_seconds)
        self.retry = retry or RetryPolicy()
        self.schema = schema
        self.connect_timeout = float(connect_timeout)
        self.statement_timeout = statement_timeout
        self.block_on_failure = bool(block_on_failure)
        # Heartbeats at most every lease/3 so two can be missed before a lease runs out.
        self.heartbeat_interval = float(heartbeat_interval or min(10.0, self.lease_seconds / 3))
        if self.heartbeat_interval > self.lease_seconds / 3 + 1e-9:
            raise ConfigurationError("heartbeat_interval must be at most lease_seconds / 3")
        self.dead_after = float(dead_after or max(self.lease_seconds, 3 * self.heartbeat_interval))
        self.cleanup_interval = float(cleanup_interval or max(1.0, self.lease_seconds / 2))
        self.notify = notify
        self.instance_retention = float(instance_retention)
        self.application_name = application_name
        self.q = Queries(schema)
        self.facts = ProcessFacts()
        self.metrics = Metrics(self.instance_id)
        self.worker: Worker | None = None
        self._sequence: str | None = None  # the id sequence, looked up on the first COPY
        self._sweep_after = ""  # where the next maintenance sweep of blocked keys starts ('' = first key)
        self._pool: ConnectionPool[Conn] | None = None
        self._pool_lock = threading.Lock()
        # Pooled connections currently set to generic plans (see connection()).
        self._generic: weakref.WeakSet[Conn] = weakref.WeakSet()
        self._closed = False

    # ------------------------------------------------------------------ connections

    def _connection_kwargs(self) -> dict[str, Any]:
        options = []
        if self.statement_timeout:
            options.append(f"-c statement_timeout={int(self.statement_timeout * 1000)}")
        # Keep idle-in-transaction sessions from holding row locks forever if a client wedges.
        options.append("-c idle_in_transaction_session_timeout=60000")
        # UTC sessions: psycopg then builds datetimes with the fixed timezone.utc, several times cheaper to
        # decode than a ZoneInfo (it shows in the claim's per-row cost).
        options.append("-c TimeZone=UTC")
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
            "application_name": self.application_name[:63],
            "options": " ".join(options),
            **KEEPALIVE_KWARGS,
        }
        return kwargs

    def _ensure_pool(self) -> ConnectionPool[Conn]:
        if self._closed:
            raise DatabaseUnavailable("processor is closed")
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=self.pool_min,
                    max_size=self.pool_max,
                    kwargs=self._connection_kwargs(),
                    open=False,
                    timeout=self.connect_timeout,
                    name=f"dp-{self.instance_id}",
                    reconnect_timeout=max(60.0, self.connect_timeout),
                    max_idle=300.0,
                    configure=_configure_connection,
                )
                self._pool.open(wait=False)
            return self._pool

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        pool = self._pool
        if isinstance(exc, PoolTimeout) and pool is not None:
            stats = pool.get_stats()
            if stats.get("pool_size", 0) >= self.pool_max and stats.get("pool_available", 0) == 0:
                return PoolExhausted(
                    f"all {self.pool_max} pooled connections stayed busy for {self.connect_timeout:g}s "
                    f"(requests waiting: {stats.get('requests_waiting', 0)})"
                )
        error = DatabaseUnavailable(f"database {redact(self.dsn)} unavailable: {str(exc).strip()}")
        # A pool timeout already waited the whole connect timeout: retrying would only multiply the wait.
        error.retryable = not isinstance(exc, PoolTimeout)
        return error

    @contextmanager
    def connection(self, timeout: float | None = None, *, internal: bool = False) -> Iterator[Conn]:
        """Borrow a pooled connection (autocommit). Connection failures become ``DatabaseUnavailable``.

        ``internal`` is for the processor's own statements: they run with generic plans (see below); a
        connection handed to other code runs with the server's default plan cache mode.
        """
        pool = self._ensure_pool()
        try:
            with pool.connection(timeout=timeout or self.connect_timeout) as conn:
                if internal != (conn in self._generic):
                    self._set_plan_mode(conn, generic=internal)
                yield conn
        except PoolTimeout as exc:
            raise self._unavailable(exc) from None
        except pg_errors.UndefinedTable as exc:
            raise SchemaNotMigrated(
                f"tables missing in schema {self.schema!r} ({exc.diag.message_primary}); run `dproc migrate`"
            ) from None
        except psycopg.OperationalError as exc:
            if isinstance(exc, pg_errors.QueryCanceled):
                raise
            raise self._unavailable(exc) from None

    def _set_plan_mode(self, conn: Conn, *, generic: bool, local: bool = False) -> None:
        # Every statement of ours is written so that its generic plan walks the same indexes as a custom one
        # (tests/integration/test_explain.py holds them to it). PostgreSQL would otherwise plan the claim
        # afresh on every call, because its custom plans look cheaper: about 1 ms of planning per batch,
        # more than the statement's whole execution at batch 100. JIT goes off with it: a generic plan's
        # cost estimate can pass jit_above_cost, and compiling takes hundreds of milliseconds per call.
        conn.execute(self.q.set_plan_mode if generic else self.q.reset_plan_mode, {"local": local})
        if local:
            return
        if generic:
            self._generic.add(conn)
        else:
            self._generic.discard(conn)

    def _with_retry(self, op: Callable[[Conn], T], *, attempts: int = 3) -> T:
        """Run an idempotent operation, retrying on a broken connection with a short backoff."""
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                with self.connection(internal=True) as conn:
                    return op(conn)
            except DatabaseUnavailable as exc:
                if attempt == attempts or not exc.retryable:
                    raise
                time.sleep(delay)
                delay *= 4
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the pool. Idempotent."""
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)

    def __enter__(self) -> DistributedProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _target(self) -> dict[str, Any]:
        """Where the database is, without credentials: safe for public health output."""
        info = conninfo_to_dict(self.dsn)
        return {"host": info.get("host") or "(default)", "port": info.get("port") or "5432",
                "dbname": info.get("dbname") or info.get("user") or ""}

    def __repr__(self) -> str:
        return (
            f"DistributedProcessor(dsn={redact(self.dsn)!r}, instance_id={self.instance_id!r}, "
            f"queue={self.queue!r}, schema={self.schema!r})"
        )

    # ------------------------------------------------------------------ schema

    def migrate(self) -> None:
        """Bring the database schema to the latest migration (idempotent, safe from many instances)."""
        from core.migrate import upgrade

        upgrade(self.dsn, self.schema, connect_timeout=self.connect_timeout)

    # ------------------------------------------------------------------ producing

    @staticmethod
    def _serialise(payloads: Sequence[Any]) -> list[str]:
        _check_payloads(payloads)
        return [_encode_payload(i, p) for i, p in enumerate(payloads)]

    @staticmethod
    def _per_record(name: str, value: str | Sequence[str | None] | None, n: int) -> list[str | None]:
        if value is None:
            return [None] * n
        if isinstance(value, str):
            if not value:
                raise InvalidArgument(f"{name} must not be empty")
            return [value] * n
        values = list(value)
        if len(values) != n:
            raise InvalidArgument(f"{name} has {len(values)} entries for {n} payloads")
        for i, v in enumerate(values):
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidArgument(f"{name}[{i}] must be a non-empty string or None")
        return values

    def add_records(
        self,
        payloads: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        max_attempts: int | None = None,
        ordering_key: str | Sequence[str | None] | None = None,
        dedupe_key: str | Sequence[str | None] | None = None,
        dedupe_while: str = "pending",
    ) -> AddResult:
        """Insert a batch atomically and return the ids in input order.

        One statement (or one COPY above ``copy_threshold`` records) for the whole batch. Invalid input raises
        before anything is written; ``QueueFull`` rolls the whole batch back. Records whose ``dedupe_key`` is
        already held in the queue are not inserted: their index is in ``result.deduplicated`` and their id is
        the existing record's.
        """
        items = list(payloads)
        _check_payloads(items)
        n = len(items)
        queue = self.queue if queue is None else queue
        if not isinstance(queue, str) or not queue or len(queue) > 200:
            raise InvalidArgument("queue must be a non-empty string of at most 200 characters")
        if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
            raise InvalidArgument(f"priority must be a 32-bit integer, got {priority!r}")
        attempts_cap = _positive_int("max_attempts", self.max_attempts if max_attempts is None else max_attempts)
        if run_at is not None and delay is not None:
            raise InvalidArgument("give run_at or delay, not both")
        if delay is not None:
            if delay < 0:
                raise InvalidArgument("delay must be >= 0")
            run_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
            raise InvalidArgument("run_at must be a timezone-aware datetime")
        if dedupe_while not in ("pending", "active"):
            raise InvalidArgument(f"dedupe_while must be 'pending' or 'active', got {dedupe_while!r}")
        if isinstance(dedupe_key, str) and n > 1:
            raise InvalidArgument("a single dedupe_key string is only allowed for a one-record batch; pass a list")
        keys = self._per_record("ordering_key", ordering_key, n)
        dedupes = self._per_record("dedupe_key", dedupe_key, n)
        if n == 0:
            return AddResult()
        has_dedupe = any(d is not None for d in dedupes)
        use_copy = n >= self.copy_threshold and not has_dedupe
        # COPY encodes as it streams (the server parses one chunk while the next is encoded); an invalid
        # payload then aborts the COPY and rolls the transaction back, so nothing is written either way.
        texts = [] if use_copy else [_encode_payload(i, p) for i, p in enumerate(items)]
        key_set = sorted({k for k in keys if k is not None})

        def op(conn: Conn) -> AddResult:
            with conn.transaction():
                blocked = [False] * n
                if has_dedupe:
                    conn.execute(self.q.lock_dedupe_keys, {"queue": queue, "keys": dedupes})
                if key_set:
                    conn.execute(self.q.lock_ordering_keys, {"keys": key_set})
                    # A record behind an earlier pending one of its key is inserted blocked: claims skip it
                    # until the key's head moves on (the claim statement's unblock), unless the batch spreads
                    # the key's records out (see KEY_GAP).
                    heads = conn.execute(self.q.key_heads, {
                        "keys": key_set, "queue": queue, "priority": priority, "run_at": run_at}).fetchall()
                    prior = {k: (last_id if follows else None) for k, has, last_id, follows, _ in heads if has}
                    blocked = inserted_blocked(keys, prior, int(heads[0][4] or 0) + 1)
                limit_row = conn.execute(self.q.lock_queue_limit, {"queue": queue}).fetchone()
                if use_copy:
                    result = self._insert_copy(conn, queue, items, priority, run_at, attempts_cap, keys, blocked)
                else:
                    result = self._insert_statement(
                        conn, queue, texts, priority, run_at, attempts_cap, keys, dedupes, dedupe_while, blocked
                    )
                inserted = n - len(result.deduplicated)
                if limit_row is not None and inserted:
                    limit = int(limit_row[0])
                    depth_row = conn.execute(
                        self.q.pending_depth, {"queue": queue, "cap": limit + inserted + 1}
                    ).fetchone()
                    depth_after = int(depth_row[0]) if depth_row else 0
                    if depth_after > limit:
                        raise QueueFull(queue, limit, depth_after - inserted, inserted)
                if self.notify and inserted:
                    conn.execute(self.q.notify, {"channel": channel_for(self.schema, queue), "queue": queue})
            return result

        # A broken connection is not retried (during COMMIT it is unknown whether the batch landed); a
        # deadlock or serialization failure rolled everything back, so that is retried.
        for attempt in range(3):
            try:
                with self.connection(internal=True) as conn:
                    return op(conn)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == 2:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_statement(
        self,
        conn: Conn,
        queue: str,
        texts: list[str],
        priority: int,
        run_at: datetime | None,
        max_attempts: int,
        keys: list[str | None],
        dedupes: list[str | None],
        dedupe_while: str,
        blocked: list[bool],
    ) -> AddResult:
        rows = conn.execute(
            self.q.insert_records,
            {
                "queue": queue,
                "payloads": texts,
                "priority": priority,
                "run_at": run_at,
                "max_attempts": max_attempts,
                "keys": keys,
                "dedupes": dedupes,
                "dedupe_while": dedupe_while,
                "blocked": blocked,
            },
        ).fetchall()
        n = len(texts)
        if len(rows) == n:
            # Ids are assigned in input order (INSERT ... SELECT ... ORDER BY ordinality).
            return AddResult(sorted(int(r[0]) for r in rows))
        # Some inputs were deduplicated: rebuild the input order from the dedupe keys.
        new_by_key: dict[str, int] = {}
        keyless_ids = iter(sorted(int(r[0]) for r in rows if r[1] is None))
        for rid, dkey in rows:
            if dkey is not None:
                new_by_key[dkey] = int(rid)
        missing = {d for d in dedupes if d is not None and d not in new_by_key}
        existing: dict[str, int] = {}
        if missing:
            for dkey, rid in conn.execute(
                self.q.existing_dedupe, {"queue": queue, "dedupes": sorted(missing)}
            ).fetchall():
                existing[dkey] = int(rid)
        ids: list[int] = []
        deduplicated: list[int] = []
        seen: set[str] = set()
        for i, dkey in enumerate(dedupes):
            if dkey is None:
                ids.append(next(keyless_ids))
            elif dkey in new_by_key and dkey not in seen:
                seen.add(dkey)
                ids.append(new_by_key[dkey])
            else:
                deduplicated.append(i)
                ids.append(new_by_key.get(dkey) or existing.get(dkey, 0))
        return AddResult(ids, deduplicated)

    def _insert_copy(
        self,
        conn: Conn,
        queue: str,
        items: list[dict[str, Any]],
        priority: int,
        run_at: datetime | None,
        max_attempts: int,
        keys: list[str | None],
        blocked: list[bool],
    ) -> AddResult:
        n = len(items)
        if self._sequence is None:
            row = conn.execute(self.q.records_sequence, {"table": self.q.records_table}).fetchone()
            self._sequence = str(row[0]) if row else None
        # Binary: the ids arrive as integers, no text to parse per id.
        ids: list[int] = [r[0] for r in conn.execute(
            self.q.allocate_ids, {"seq": self._sequence, "n": n}, binary=True).fetchall()]
        # Rows are formatted here as COPY text, a chunk per write: much cheaper than a write_row per record,
        # and the server parses one chunk while the next is encoded. JSON from the encoder has no raw control
        # characters, so only backslashes need escaping. run_at left out takes the column default, now().
        constant = "\t".join(("", _copy_text(queue), str(priority), str(max_attempts), ""))
        if run_at is not None:
            constant = f"{constant}{run_at.isoformat()}\t"
        stmt = self.q.copy_records if run_at is None else self.q.copy_records_at
        null = "\\N\tf"
        key_texts = [null if k is None else _copy_text(k) + ("\tt" if b else "\tf")
                     for k, b in zip(keys, blocked, strict=True)]
        with conn.cursor().copy(stmt) as copy:
            for start in range(0, n, COPY_CHUNK):
                lines = []
                for i in range(start, min(n, start + COPY_CHUNK)):
                    text = _encode_payload(i, items[i]).replace("\\", "\\\\")  # COPY text doubles a backslash
                    lines.append(f"{ids[i]}{constant}{key_texts[i]}\t{text}\n")
                copy.write("".join(lines))
        return AddResult(ids)

    # ------------------------------------------------------------------ claiming

    def _queues(self, queues: Sequence[str] | str | None) -> list[str]:
        if queues is None:
            return [self.queue]
        if isinstance(queues, str):
            queues = [queues]
        out = list(dict.fromkeys(queues))
        if not out or any(not isinstance(q, str) or not q for q in out):
            raise InvalidArgument("queues must be a non-empty list of non-empty strings")
        return out

    def claim_records(self, batch_size: int | None = None, *, queues: Sequence[str] | None = None) -> list[Record]:
        """Claim up to ``batch_size`` due records in one round trip (priority DESC, run_at, id).

        Each claimed record is ``processing`` under a fresh lease token; per-key ordering and concurrency
        limits are applied in the same statement.
        """
        return self.complete_and_claim((), batch_size, queues=queues)[0]

    def complete_and_claim(
        self,
        done: Iterable[Record],
        batch_size: int | None = None,
        *,
        queues: Sequence[str] | None = None,
        unblock: Iterable[str] = (),
        defer_unblock: bool = False,
    ) -> tuple[list[Record], int]:
        """Complete ``done`` (fenced, like :meth:`mark_completed`) and claim the next batch in one statement.

        Returns (claimed records, how many of ``done`` were completed). The worker loop uses this so that a
        batch costs one round trip and one commit. The next record of each claimed record's ordering key is
        made claimable by a later statement (it must see inserts committed meanwhile): at once here, or, with
        ``defer_unblock``, by the caller passing those keys as ``unblock`` to its next statement.
        """
        size = self.batch_size if batch_size is None else _positive_int("batch_size", batch_size, maximum=MAX_BATCH)
        queue_list = self._queues(queues)
        records = list(done)
        keys = sorted(set(unblock))
        claimed, completed = self._with_retry(
            lambda conn: self._complete_and_claim_on(conn, records, size, queue_list, keys)
        )
        if not defer_unblock:
            claimed_keys = {r.ordering_key for r in claimed if r.ordering_key is not None}
            if claimed_keys:
                self._followups(claimed_keys)
        return claimed, completed

    def _any_due(self, queues: list[str]) -> bool:
        """Whether any record of ``queues`` is pending and due (claimable or held back by its key)."""
        row = self._with_retry(lambda conn: conn.execute(self.q.any_due, {"queues": queues}).fetchone())
        return bool(row and row[0])

    def _followups(self, keys: set[str]) -> None:
        """Make each key's earliest pending record claimable (after a claim or a cancel), through the claim
        statement with nothing to claim. Best effort: the maintenance sweep repairs a miss."""
        ordered = sorted(keys)
        try:
            self._with_retry(lambda conn: self._complete_and_claim_on(conn, [], 0, [], ordered))
        except DatabaseUnavailable as exc:
            log.warning("could not unblock key heads; the sweep will", extra={"error": str(exc)})

    def _complete_and_claim_on(
        self, conn: Conn, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str] = ()
    ) -> tuple[list[Record], int]:
        done_ids, done_tokens = self._fence(done)
        token = uuid.uuid4()
        # Queues to wake if a keyed record completes (pg_notify runs only then).
        nqueues = sorted({r.queue for r in done if r.ordering_key is not None}) if self.notify else []
        params = {
            "unblock_keys": list(unblock),
            "channels": [channel_for(self.schema, q) for q in nqueues],
            "nqueues": nqueues,
            # Array literals built here: psycopg would dump each element in Python (a UUID dumper call per
            # token); one join is much cheaper on this per-batch path.
            "done_ids": "{" + ",".join(map(str, done_ids)) + "}",
            "done_tokens": "{" + ",".join(map(_token_text(done_tokens).__getitem__, done_tokens)) + "}",
            "queues": queues,
            "token": token,
            "batch": size,
            "instance_id": self.instance_id,
            "lease_seconds": self.lease_seconds,
            "default_key_concurrency": self.key_concurrency,
            "default_block_on_failure": self.block_on_failure,
        }
        # Binary results: timestamps, UUIDs and integers decode several times faster than from text.
        rows = conn.execute(self.q.claim, params, binary=True).fetchall()
        completed = int(rows[0][-1]) if rows else 0
        if not rows or rows[0][0] is None:
            return [], completed
        new, head = tuple.__new__, (token,)
        return [new(Record, r[:6] + head + r[6:13]) for r in rows], completed

    # ------------------------------------------------------------------ completing

    @staticmethod
    def _sorted(records: Iterable[Record]) -> list[Record]:
        """``records`` type-checked and sorted by id: the fenced statements find each row's own token (and
        delay) in the arrays by a binary search (width_bucket) over the ids."""
        batch = list(records)
        for r in batch:
            if not isinstance(r, Record):
                raise InvalidArgument(f"expected Record objects, got {type(r).__name__}")
        batch.sort(key=_record_order)
        return batch

    @classmethod
    def _fence(cls, records: Iterable[Record]) -> tuple[list[int], list[Any]]:
        """The (ids, tokens) arrays of a fenced statement, in id order."""
        batch = cls._sorted(records)
        return [r.id for r in batch], [r.lease_token for r in batch]

    def mark_completed(self, records: Iterable[Record], *, unblock: Iterable[str] = ()) -> int:
        """Complete records still held under their claim's lease token; returns how many were updated.

        A record whose lease was lost (recovered and possibly re-claimed elsewhere) is left untouched and not
        counted. A record flagged by ``cancel()`` ends ``cancelled`` instead.
        """
        batch = list(records)
        self._fence(batch)  # type check before any I/O
        if not batch:
            return 0
        keys = list(unblock)
        updated = self._with_retry(lambda conn: self.complete_on(conn, batch, keys))
        if updated < len(batch):
            log.warning(
                "lost leases on completion",
                extra={"instance_id": self.instance_id, "lost": len(batch) - updated, "batch": len(batch)},
            )
        return updated

    def complete_on(self, conn: Conn, records: Sequence[Record], unblock: Iterable[str] = ()) -> int:
        """Fenced completion of ``records`` on ``conn`` (inside the caller's transaction, if any)."""
        return self._complete_and_claim_on(conn, records, 0, [], sorted(set(unblock)))[1]

    def mark_failed(
        self, records: Iterable[Record], error: BaseException | str, *, retry: bool = True
    ) -> int:
        """Record a failure for records still held; returns how many were updated.

        With ``retry`` and the error retryable under the policy, a record with attempts left returns to
        ``pending`` after its backoff; otherwise it ends ``failed``. The error lands in ``last_error``.
        """
        batch = list(records)
        if not batch:
            return 0
        retryable = bool(retry) and self.retry.should_retry(error if isinstance(error, BaseException) else None)
        params = self._fail_params(batch, error, retryable)
        return self._with_retry(lambda conn: conn.execute(self.q.fail, params).rowcount)

    def _fail_params(self, records: Iterable[Record], error: BaseException | str, retryable: bool) -> dict[str, Any]:
        """Parameters of the fail statement: the arrays in id order, each record with its own backoff."""
        batch = self._sorted(records)
        return {
            "ids": [r.id for r in batch],
            "tokens": [r.lease_token for r in batch],
            "delays": [self.retry.delay_for(r.attempts) for r in batch],
            "retry": retryable,
            "error": format_error(error, ERROR_TEXT_LIMIT),
            "default_block_on_failure": self.block_on_failure,
        }

    def release_records(self, records: Iterable[Record], reason: str = "released by its instance") -> int:
        """Hand held records back to ``pending`` at once, the attempt not charged (graceful shutdown)."""
        ids, tokens = self._fence(records)
        if not ids:
            return 0
        params = {"ids": ids, "tokens": tokens, "reason": reason}
        return self._with_retry(lambda conn: conn.execute(self.q.release, params).rowcount)

    def extend_leases(self, records: Iterable[Record]) -> tuple[set[int], set[int]]:
        """Push the leases of held records; returns (ids still held, ids whose cancel was requested)."""
        return self.heartbeat(records, registered=False)

    def heartbeat(self, records: Iterable[Record], *, registered: bool = True) -> tuple[set[int], set[int]]:
        """Beat the instance's registry row and extend held leases in one round trip.

        Returns (ids still held, ids whose cancel was requested).
        """
        ids, tokens = self._fence(records)
        params = {
            "ids": ids,
            "tokens": tokens,
            "lease_seconds": self.lease_seconds,
            "instance_id": self.instance_id,
            "registered": registered,
        }
        rows = self._with_retry(lambda conn: conn.execute(self.q.heartbeat, params).fetchall())
        return {int(r[0]) for r in rows}, {int(r[0]) for r in rows if r[1]}

    # ------------------------------------------------------------------ registry

    def register_instance(self, metadata: dict[str, Any] | None = None) -> None:
        """Add (or revive) this instance in ``processor_instances`` as ``running``."""
        facts = self.facts.snapshot()
        params = {
            "instance_id": self.instance_id,
            "hostname": facts["hostname"],
            "pid": facts["pid"],
            "version": __version__,
            "metadata": json.dumps(metadata or {}),
        }
        self._with_retry(lambda conn: conn.execute(self.q.register_instance, params))

    def set_instance_status(self, status: str) -> None:
        params = {"instance_id": self.instance_id, "status": status}
        self._with_retry(lambda conn: conn.execute(self.q.set_instance_status, params))

    def deregister_instance(self) -> None:
        """Mark this instance ``stopped`` (clean shutdown)."""
        self.set_instance_status("stopped")

    # ------------------------------------------------------------------ worker loop

    def run(
        self,
        handler: Handler,
        *,
        concurrency: int = 10,
        queues: Sequence[str] | None = None,
        stop_when_empty: bool = False,
        stop_event: threading.Event | None = None,
        transactional: bool = False,
        handler_timeout: float | None = None,
        poll_interval: float = 1.0,
        listen: bool = True,
        handle_signals: bool = True,
        grace_seconds: float = 30.0,
        prefetch: int | None = None,
        register: bool = True,
        metadata: dict[str, Any] | None = None,
        claimers: int = 2,
    ) -> RunSummary:
        """Claim and process records until stopped; returns a :class:`RunSummary`.

        ``handler(record)`` runs on a pool of ``concurrency`` threads (a coroutine function is awaited on an
        event-loop thread). Success completes the record, an exception fails it through the retry policy.
        With ``transactional=True`` the handler is called as ``handler(record, conn)`` inside a transaction that
        also writes the completion, so its own database writes and the completion commit together.
        Called from the main thread it handles SIGTERM/SIGINT (unless ``handle_signals=False``): the first
        signal drains for ``grace_seconds``, a second aborts the grace. ``stop_event`` or :meth:`stop` stop it
        from elsewhere; ``stop_when_empty`` returns once nothing is due or held.
        """
        _positive_int("concurrency", concurrency, maximum=1000)
        if poll_interval <= 0:
            raise InvalidArgument("poll_interval must be > 0")
        if handler_timeout is not None and handler_timeout <= 0:
            raise InvalidArgument("handler_timeout must be > 0")
        if not callable(handler):
            raise InvalidArgument("handler must be callable")
        worker = Worker(
            self,
            handler,
            concurrency=concurrency,
            queues=self._queues(queues),
            stop_when_empty=stop_when_empty,
            stop_event=stop_event,
            transactional=transactional,
            handler_timeout=handler_timeout,
            poll_interval=poll_interval,
            listen=listen,
            handle_signals=handle_signals,
            grace_seconds=grace_seconds,
            prefetch=prefetch,
            register=register,
            metadata=metadata,
            claimers=claimers,
        )
        self.worker = worker
        summary = worker.run()
        log.info("run finished", extra={"instance_id": self.instance_id, **summary.as_dict()})
        return summary

    def stop(self, grace_seconds: float | None = None) -> None:
        """Ask a running :meth:`run` to drain: no new claims, in-flight records get ``grace_seconds``."""
        if self.worker is not None:
            self.worker.stop(grace_seconds)

    # ------------------------------------------------------------------ maintenance

    def cleanup_orphaned_records(self) -> int:
        """Recover records whose lease expired or whose instance is dead; returns how many were recovered.

        Runs in bounded batches with SKIP LOCKED and a status guard, so every instance may run it at once and
        it never touches a row completed or re-claimed in between. Records with attempts left go back to
        ``pending`` (claimable at once), the others to ``failed``.
        """

        def op(conn: Conn) -> int:
            dead = conn.execute(self.q.mark_dead_instances, {"dead_after": self.dead_after}).fetchall()
            conn.execute(self.q.prune_instances, {"retention": self.instance_retention})
            if dead:
                log.warning("instances declared dead", extra={"instances": [r[0] for r in dead]})
            row = conn.execute(self.q.unblock_sweep, {"after": self._sweep_after, "keys": SWEEP_KEYS}).fetchone()
            if row is not None:
                self._sweep_after = "" if row[0] is None else str(row[0])
                if row[1]:
                    log.info("sweep made key heads claimable", extra={"keys": int(row[1])})
            total = 0
            while True:
                rows = conn.execute(self.q.recover_orphans, {"batch": self.cleanup_batch}).fetchall()
                total += len(rows)
                # A keyed record recovered to failed or cancelled may have been its claimer's last: nobody else
                # would make its key's next record claimable.
                ended.update(str(r[2]) for r in rows if r[2] is not None and r[1] in ("failed", "cancelled"))
                if len(rows) < self.cleanup_batch:
                    break
            return total

        ended: set[str] = set()
        recovered = self._with_retry(op)
        if ended:
            self._followups(ended)
        if recovered:
            log.info("recovered orphaned records", extra={"recovered": recovered})
        return recovered

    def cancel(self, ids: Iterable[int]) -> dict[int, str]:
        """Cancel records: pending (and failed) ones at once; processing ones are flagged, the handler can see it
        (``core.worker.current_record_cancelled()``) and their outcome becomes ``cancelled``.

        Returns ``{id: status_after}`` for the records it touched; completed and cancelled ones are left alone.
        """
        id_list = [_positive_int("id", i) for i in ids]
        if not id_list:
            return {}
        rows = self._with_retry(lambda conn: conn.execute(self.q.cancel, {"ids": id_list}).fetchall())
        keys = {str(r[2]) for r in rows if r[2] is not None and r[1] == "cancelled"}
        if keys:
            self._followups(keys)
        return {int(r[0]): str(r[1]) for r in rows}

    def retry_failed(
        self,
        ids: Iterable[int] | None = None,
        *,
        queue: str | None = None,
        error_pattern: str | None = None,
        batch: int = 1000,
    ) -> int:
        """Move failed records back to ``pending`` with a fresh attempt budget; returns how many moved."""
        id_list = None if ids is None else [_positive_int("id", i) for i in ids]
        if error_pattern is not None:
            try:
                re.compile(error_pattern)
            except re.error as exc:
                raise InvalidArgument(f"error_pattern is not a valid regular expression: {exc}") from None
        size = _positive_int("batch", batch)
        params = {"ids": id_list, "queue": queue, "pattern": error_pattern, "batch": size}
        total = 0
        while True:
            n = self._with_retry(lambda conn: conn.execute(self.q.retry_failed, params).rowcount)
            total += n
            if n < size or id_list is not None:
                return total

    def purge(self, older_than: float | timedelta, *, batch: int = 5000, max_batches: int | None = None) -> int:
        """Delete finished records older than ``older_than`` in bounded, ordered batches; returns the count."""
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
        if seconds < 0:
            raise InvalidArgument("older_than must be >= 0")
        size = _positive_int("batch", batch)
        total, rounds = 0, 0
        while max_batches is None or rounds < max_batches:
            n = self._with_retry(
                lambda conn: conn.execute(self.q.purge, {"older_than": seconds, "batch": size}).rowcount
            )
            total += n
            rounds += 1
            if n < size:
                break
        return total

    # ------------------------------------------------------------------ admission settings

    def set_key_concurrency(self, key_or_pattern: str, n: int | None, *, block_on_failure: bool = False) -> None:
        """Limit how many records of matching ordering keys may be processing at once (``None`` removes it).

        ``key_or_pattern`` is an exact key or a glob (``*``, ``?``); an exact key wins over patterns, a longer
        pattern over a shorter one. Stored in the database: every instance obeys it from its next claim.
        """
        if not isinstance(key_or_pattern, str) or not key_or_pattern:
            raise InvalidArgument("key_or_pattern must be a non-empty string")
        is_exact = not any(c in key_or_pattern for c in "*?")
        if n is None:
            self._with_retry(
                lambda conn: conn.execute(self.q.delete_key_concurrency, {"pattern": key_or_pattern})
            )
        else:
            params = {
                "pattern": key_or_pattern,
                "like_pattern": glob_to_like(key_or_pattern),
                "is_exact": is_exact,
                "n": _positive_int("n", n),
                "block_on_failure": bool(block_on_failure),
            }
            self._with_retry(lambda conn: conn.execute(self.q.set_key_concurrency, params))
        if is_exact:
            # A key stopped by a failure under block_on_failure had its later records blocked: if it no longer
            # blocks, the next one may go now (a no-op otherwise: the claim still checks the setting). For a
            # pattern, the maintenance sweep gets to each matching key in its turn.
            self._followups({key_or_pattern})

    def set_queue_limit(self, queue: str, n: int | None) -> None:
        """Cap the number of pending records of ``queue`` (``None`` removes the cap); enforced on insert."""
        if not isinstance(queue, str) or not queue:
            raise InvalidArgument("queue must be a non-empty string")
        if n is None:
            self._with_retry(lambda conn: conn.execute(self.q.delete_queue_limit, {"queue": queue}))
            return
        params = {"queue": queue, "n": _positive_int("n", n, allow_zero=True)}
        self._with_retry(lambda conn: conn.execute(self.q.set_queue_limit, params))

    # ------------------------------------------------------------------ observing

    def get_queue_status(self, queue: str | None = None, *, statuses: Sequence[str] | None = None) -> dict[str, Any]:
        """Counts per status per queue, and the age of the oldest pending record.

        Pending and processing are counted through their partial indexes; finished counts come from the
        trigger-maintained ``queue_stats`` table, so the call stays cheap with millions of finished rows.
        """
        wanted = list(STATUSES) if statuses is None else list(statuses)
        unknown = [s for s in wanted if s not in STATUSES]
        if unknown:
            raise InvalidArgument(f"unknown status filter {unknown}; valid statuses are {list(STATUSES)}")

        def op(conn: Conn) -> dict[str, Any]:
            active = conn.execute(self.q.queue_status_active, {"queue": queue}).fetchall()
            finished = conn.execute(self.q.queue_status_finished, {"queue": queue}).fetchall()
            return self._status_dict(active, finished, wanted)

        return self._with_retry(op)

    @staticmethod
    def _status_dict(active: list[Any], finished: list[Any], wanted: list[str]) -> dict[str, Any]:
        queues: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return queues.setdefault(
                name, {**{s: 0 for s in wanted}, "due": 0, "oldest_pending_age_seconds": None}
            )

        for name, status, n, age, due in active:
            e = entry(name)
            if status in wanted:
                e[status] = int(n)
            if status == "pending":
                e["due"] = int(due)
                e["oldest_pending_age_seconds"] = float(age) if age is not None else None
        for name, status, n in finished:
            if status in wanted and int(n):
                entry(name)[status] = int(n)
        totals = {s: sum(q[s] for q in queues.values()) for s in wanted}
        ages = [q["oldest_pending_age_seconds"] for q in queues.values() if q["oldest_pending_age_seconds"]]
        return {
            "queues": queues,
            "totals": totals,
            "oldest_pending_age_seconds": max(ages) if ages else None,
        }

    def list_instances(self, *, include_stopped: bool = False) -> list[dict[str, Any]]:
        """Registered instances with their heartbeat and how many records each holds."""
        cols = (
            "instance_id", "hostname", "pid", "version", "started_at", "last_heartbeat_at", "stopped_at",
            "status", "metadata", "processing",
        )
        rows = self._with_retry(
            lambda conn: conn.execute(self.q.list_instances, {"include_stopped": include_stopped}).fetchall()
        )
        return [dict(zip(cols, row, strict=False)) for row in rows]

    def health_check(
        self,
        *,
        timeout: float = 5.0,
        latency_degraded_ms: float = 250.0,
        pending_age_degraded_s: float | None = None,
    ) -> dict[str, Any]:
        """A health report that never raises: ``status`` is ``healthy``, ``degraded`` or ``unhealthy``.

        Unreachable database, missing schema: unhealthy (with the reason). Slow round trip, callers waiting
        for pool connections, or (optionally) a pending backlog older than ``pending_age_degraded_s``:
        degraded.
        """
        report: dict[str, Any] = {
            "status": "unhealthy",
            "instance": {"instance_id": self.instance_id, **self.facts.snapshot()},
            "database": {"reachable": False, **self._target(), "schema": self.schema},
            "reasons": [],
            "checked_at": datetime.now(timezone.utc).isoformat(),
        }
        reasons: list[str] = report["reasons"]
        deadline = time.monotonic() + timeout
        try:
            pool = self._ensure_pool()
            report["pool"] = pool.get_stats()
            with self.connection(timeout=timeout, internal=True) as conn:
                remaining = max(0.1, deadline - time.monotonic())
                started = time.perf_counter()
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, true)", (str(int(remaining * 1000)),)
                    )
                    facts = conn.execute(self.q.server_facts, {"table": self.q.records_table}).fetchone()
                latency_ms = (time.perf_counter() - started) * 1000
                assert facts is not None
                report["database"].update(
                    reachable=True, latency_ms=round(latency_ms, 3), server_version=facts[0], migrated=facts[1]
                )
                if not facts[1]:
                    reasons.append(f"schema {self.schema!r} is not migrated")
                    return report
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        (str(int(max(0.1, deadline - time.monotonic()) * 1000)),),
                    )
                    active = conn.execute(self.q.queue_status_active, {"queue": None}).fetchall()
                    finished = conn.execute(self.q.queue_status_finished, {"queue": None}).fetchall()
                report["queues"] = self._status_dict(active, finished, list(STATUSES))
            if latency_ms > latency_degraded_ms:
                reasons.append(f"database round trip {latency_ms:.0f} ms > {latency_degraded_ms:g} ms")
            if report["pool"].get("requests_waiting", 0) > 0:
                reasons.append("callers are waiting for pool connections")
            age = report["queues"]["oldest_pending_age_seconds"]
            if pending_age_degraded_s is not None and age is not None and age > pending_age_degraded_s:
                reasons.append(f"oldest pending record is {age:.0f}s old")
            report["status"] = "degraded" if reasons else "healthy"
        except Exception as exc:  # a health probe reports, it never raises
            reasons.append(f"{type(exc).__name__}: {redact(str(exc)).strip()}")
            report["status"] = "unhealthy"
        return report

