"""Bad input gets a typed error naming the argument, on every public method of the blocking, the asyncio and
the in-memory processor (and the CLI), and nothing is written.

``TABLE`` names, for every public method, each bad value tried and the error it gets; a property test
(hypothesis) drives the same arguments with generated bad values.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import AsyncDistributedProcessor, DistributedProcessor, InvalidArgument, InvalidPayload
from core.flows import Flow
from core.record import Record
from core.testing import InMemoryProcessor
from tests.support import run_cli

NUL, SURROGATE, NAN, INF = "a\x00b", "a\ud800b", float("nan"), float("inf")
NAIVE = datetime(2026, 1, 1)
NOW = datetime.now(timezone.utc)
ASYNC = {"add_records", "get_queue_status", "health_check", "list_instances", "cancel", "retry_failed", "purge",
         "set_key_concurrency", "set_queue_limit", "pause", "resume", "set_queue_rate", "set_key_rate", "schedule",
         "unschedule", "start_flow", "flow_status", "cancel_flow", "list_flow_runs"}
# Public methods without arguments to get wrong.
NO_ARGUMENTS = {"cleanup_orphaned_records", "deregister_instance", "horizon", "ready", "close", "migrate",
                "next_due", "paused_queues", "rates", "list_schedules", "fire_due_schedules"}


@dataclass(frozen=True)
class Case:
    method: str
    argument: str
    bad: str  # the bad value, in words
    call: Callable[[Any], Any]
    error: type[Exception] = InvalidArgument
    backends: tuple[str, ...] = ("blocking", "async", "memory")


FLOW = Flow("bad_input_flow")


@FLOW.step()
def only(record: Record) -> None:
    return None


def _rec() -> Record:
    now = datetime.now(timezone.utc)
    return Record(1, "default", {}, 0, 1, 5, __import__("uuid").uuid4(), now, now, now, now)


def _c(method: str, argument: str, bad: str, call: Callable[[Any], Any], error: type[Exception] = InvalidArgument,
       backends: tuple[str, ...] | None = None) -> Case:
    if backends is None:
        backends = ("blocking", "async", "memory") if method in ASYNC else ("blocking", "memory")
    return Case(method, argument, bad, call, error, backends)


TABLE: list[Case] = [
    _c("add_records", "payloads", "a dict, not a list", lambda p: p.add_records({"a": 1}), InvalidArgument),
    _c("add_records", "payloads", "a list, not a dict", lambda p: p.add_records([[1]]), InvalidPayload),
    _c("add_records", "payloads", "NaN", lambda p: p.add_records([{"a": NAN}]), InvalidPayload),
    _c("add_records", "payloads", "a NUL", lambda p: p.add_records([{"a": NUL}]), InvalidPayload),
    _c("add_records", "payloads", "a lone surrogate", lambda p: p.add_records([{SURROGATE: 1}]), InvalidPayload),
    _c("add_records", "queue", "a NUL", lambda p: p.add_records([{}], queue=NUL)),
    _c("add_records", "queue", "empty", lambda p: p.add_records([{}], queue="")),
    _c("add_records", "queue", "201 characters", lambda p: p.add_records([{}], queue="q" * 201)),
    _c("add_records", "queue", "an int", lambda p: p.add_records([{}], queue=7)),
    _c("add_records", "priority", "2**31", lambda p: p.add_records([{}], priority=2**31)),
    _c("add_records", "priority", "a float", lambda p: p.add_records([{}], priority=1.5)),
    _c("add_records", "run_at", "naive", lambda p: p.add_records([{}], run_at=NAIVE)),
    _c("add_records", "delay", "NaN", lambda p: p.add_records([{}], delay=NAN)),
    _c("add_records", "delay", "infinite", lambda p: p.add_records([{}], delay=INF)),
    _c("add_records", "delay", "negative", lambda p: p.add_records([{}], delay=-1)),
    _c("add_records", "delay", "1e300", lambda p: p.add_records([{}], delay=1e300)),
    _c("add_records", "max_attempts", "2**31", lambda p: p.add_records([{}], max_attempts=2**31)),
    _c("add_records", "max_attempts", "0", lambda p: p.add_records([{}], max_attempts=0)),
    _c("add_records", "ordering_key", "a NUL", lambda p: p.add_records([{}], ordering_key=NUL)),
    _c("add_records", "ordering_key", "a lone surrogate", lambda p: p.add_records([{}], ordering_key=[SURROGATE])),
    _c("add_records", "ordering_key", "513 characters", lambda p: p.add_records([{}], ordering_key="k" * 513)),
    _c("add_records", "ordering_key", "an int", lambda p: p.add_records([{}], ordering_key=[5])),
    _c("add_records", "dedupe_key", "a NUL", lambda p: p.add_records([{}], dedupe_key=[NUL])),
    _c("add_records", "dedupe_key", "empty", lambda p: p.add_records([{}], dedupe_key="")),
    _c("add_records", "dedupe_while", "unknown", lambda p: p.add_records([{}], dedupe_while="always")),
    _c("add_records", "conn", "a string", lambda p: p.add_records([{}], conn="postgresql://x"),
       backends=("blocking", "async")),
    _c("claim_records", "batch_size", "10,001", lambda p: p.claim_records(10_001)),
    _c("claim_records", "batch_size", "0", lambda p: p.claim_records(0)),
    _c("claim_records", "queues", "a NUL", lambda p: p.claim_records(queues=[NUL])),
    _c("claim_records", "queues", "empty list", lambda p: p.claim_records(queues=[])),
    _c("complete_and_claim", "done", "not records", lambda p: p.complete_and_claim([1])),
    _c("complete_and_claim", "unblock", "a NUL", lambda p: p.complete_and_claim([], unblock=[NUL])),
    _c("complete_and_claim", "defer_unblock", "a string", lambda p: p.complete_and_claim([], defer_unblock="no")),
    _c("mark_completed", "records", "a Record, not a list", lambda p: p.mark_completed(_rec())),
    _c("mark_completed", "unblock", "a string", lambda p: p.mark_completed([], unblock="key")),
    _c("mark_failed", "error", "an int", lambda p: p.mark_failed([], 42)),
    _c("mark_failed", "retry", "None", lambda p: p.mark_failed([], "x", retry=None)),
    _c("release_records", "reason", "a NUL", lambda p: p.release_records([], NUL)),
    _c("extend_leases", "records", "ints", lambda p: p.extend_leases([1, 2])),
    _c("heartbeat", "registered", "a string", lambda p: p.heartbeat([], registered="yes")),
    _c("register_instance", "metadata", "not JSON", lambda p: p.register_instance({"a": object()})),
    _c("register_instance", "metadata", "a list", lambda p: p.register_instance([1])),
    _c("set_instance_status", "status", "unknown", lambda p: p.set_instance_status("asleep")),
    _c("run", "handler", "None", lambda p: p.run(None)),
    _c("run", "concurrency", "0", lambda p: p.run(print, concurrency=0)),
    _c("run", "poll_interval", "NaN", lambda p: p.run(print, poll_interval=NAN)),
    _c("run", "handler_timeout", "infinite", lambda p: p.run(print, handler_timeout=INF)),
    _c("run", "grace_seconds", "negative", lambda p: p.run(print, grace_seconds=-1)),
    _c("run", "prefetch", "negative", lambda p: p.run(print, prefetch=-1)),
    _c("run", "claimers", "0", lambda p: p.run(print, claimers=0)),
    _c("run", "trace_parent", "unknown", lambda p: p.run(print, trace_parent="sibling")),
    _c("run", "queues", "a NUL", lambda p: p.run(print, queues=[NUL])),
    _c("run", "stop_when_empty", "a string", lambda p: p.run(print, stop_when_empty="yes")),
    _c("run", "stop_event", "a bool", lambda p: p.run(print, stop_event=True)),
    _c("run", "metadata", "not JSON", lambda p: p.run(print, metadata={"x": {1, 2}})),
    _c("stop", "grace_seconds", "NaN", lambda p: p.stop(NAN)),
    _c("cancel", "ids", "2**63", lambda p: p.cancel([2**63])),
    _c("cancel", "ids", "a string", lambda p: p.cancel(["1"])),
    _c("cancel", "ids", "an int, not a list", lambda p: p.cancel(5)),
    _c("retry_failed", "ids", "0", lambda p: p.retry_failed([0])),
    _c("retry_failed", "queue", "a NUL", lambda p: p.retry_failed(queue=NUL)),
    _c("retry_failed", "error_pattern", "a NUL", lambda p: p.retry_failed(error_pattern=NUL)),
    _c("retry_failed", "error_pattern", "not a regex", lambda p: p.retry_failed(error_pattern="((")),
    _c("retry_failed", "batch", "2**31", lambda p: p.retry_failed(batch=2**31)),
    _c("purge", "older_than", "NaN", lambda p: p.purge(NAN)),
    _c("purge", "older_than", "infinite", lambda p: p.purge(INF)),
    _c("purge", "older_than", "negative", lambda p: p.purge(timedelta(seconds=-5))),
    _c("purge", "older_than", "a string", lambda p: p.purge("7d")),
    _c("purge", "batch", "0", lambda p: p.purge(1, batch=0)),
    _c("purge", "max_batches", "0", lambda p: p.purge(1, max_batches=0)),
    _c("set_key_concurrency", "key_or_pattern", "a NUL", lambda p: p.set_key_concurrency(NUL, 1)),
    _c("set_key_concurrency", "key_or_pattern", "empty", lambda p: p.set_key_concurrency("", 1)),
    _c("set_key_concurrency", "n", "2**31", lambda p: p.set_key_concurrency("k", 2**31)),
    _c("set_key_concurrency", "n", "0", lambda p: p.set_key_concurrency("k", 0)),
    _c("set_key_concurrency", "block_on_failure", "a string",
       lambda p: p.set_key_concurrency("k", 1, block_on_failure="yes")),
    _c("set_queue_limit", "queue", "a NUL", lambda p: p.set_queue_limit(NUL, 1)),
    _c("set_queue_limit", "n", "2**31", lambda p: p.set_queue_limit("q", 2**31)),
    _c("set_queue_limit", "n", "negative", lambda p: p.set_queue_limit("q", -1)),
    _c("get_queue_status", "queue", "a NUL", lambda p: p.get_queue_status(NUL)),
    _c("get_queue_status", "statuses", "unknown", lambda p: p.get_queue_status(statuses=["done"])),
    _c("get_queue_status", "statuses", "a string", lambda p: p.get_queue_status(statuses="pending")),
    _c("get_queue_status", "statuses", "a NUL", lambda p: p.get_queue_status(statuses=[NUL])),
    _c("list_instances", "include_stopped", "a string", lambda p: p.list_instances(include_stopped="all")),
    _c("health_check", "timeout", "0", lambda p: p.health_check(timeout=0)),
    _c("health_check", "timeout", "NaN", lambda p: p.health_check(timeout=NAN)),
    _c("health_check", "latency_degraded_ms", "negative", lambda p: p.health_check(latency_degraded_ms=-1)),
    _c("health_check", "pending_age_degraded_s", "infinite",
       lambda p: p.health_check(pending_age_degraded_s=INF)),
    _c("pause", "queue", "a NUL", lambda p: p.pause(NUL)),
    _c("pause", "until", "naive", lambda p: p.pause("q", until=NAIVE)),
    _c("pause", "until", "NaN seconds", lambda p: p.pause("q", until=NAN)),
    _c("pause", "reason", "a NUL", lambda p: p.pause("q", reason=NUL)),
    _c("resume", "queue", "empty", lambda p: p.resume("")),
    _c("set_queue_rate", "queue", "a NUL", lambda p: p.set_queue_rate(NUL, 1, 1)),
    _c("set_queue_rate", "n", "0", lambda p: p.set_queue_rate("q", 0, 1)),
    _c("set_queue_rate", "per", "infinite", lambda p: p.set_queue_rate("q", 1, INF)),
    _c("set_queue_rate", "per", "0", lambda p: p.set_queue_rate("q", 1, 0)),
    _c("set_key_rate", "key_or_pattern", "a lone surrogate", lambda p: p.set_key_rate(SURROGATE, 1, 1)),
    _c("set_key_rate", "n", "2**31", lambda p: p.set_key_rate("k", 2**31, 1)),
    _c("set_key_rate", "per", "negative", lambda p: p.set_key_rate("k", 1, -1)),
    _c("schedule", "name", "a NUL", lambda p: p.schedule(NUL, every=60)),
    _c("schedule", "cron", "not cron", lambda p: p.schedule("s", cron="every day")),
    _c("schedule", "cron", "minute 61", lambda p: p.schedule("s", cron="61 * * * *")),
    _c("schedule", "every", "half a second", lambda p: p.schedule("s", every=0.5)),
    _c("schedule", "every", "NaN", lambda p: p.schedule("s", every=NAN)),
    _c("schedule", "timezone", "unknown", lambda p: p.schedule("s", every=60, timezone="Mars/Olympus")),
    _c("schedule", "payload", "a list", lambda p: p.schedule("s", every=60, payload=[1])),
    _c("schedule", "queue", "a NUL", lambda p: p.schedule("s", every=60, queue=NUL)),
    _c("schedule", "misfire", "unknown", lambda p: p.schedule("s", every=60, misfire="never")),
    _c("schedule", "backfill", "negative", lambda p: p.schedule("s", every=60, backfill=-1)),
    _c("schedule", "overlap", "unknown", lambda p: p.schedule("s", every=60, overlap="queue")),
    _c("schedule", "add_options", "unknown option", lambda p: p.schedule("s", every=60, colour="red")),
    _c("unschedule", "name", "empty", lambda p: p.unschedule("")),
    _c("start_flow", "flow", "a function", lambda p: p.start_flow(len, {})),
    _c("start_flow", "input", "a list", lambda p: p.start_flow(FLOW, [1]), InvalidPayload),
    _c("start_flow", "input", "NaN", lambda p: p.start_flow(FLOW, {"a": NAN}), InvalidPayload),
    _c("start_flow", "dedupe_key", "a NUL", lambda p: p.start_flow(FLOW, {}, dedupe_key=NUL)),
    _c("start_flow", "dedupe_key", "513 characters", lambda p: p.start_flow(FLOW, {}, dedupe_key="k" * 513)),
    _c("flow_status", "run_id", "a string", lambda p: p.flow_status("1")),
    _c("flow_status", "run_id", "negative", lambda p: p.flow_status(-1)),
    _c("cancel_flow", "run_id", "a float", lambda p: p.cancel_flow(1.5)),
    _c("list_flow_runs", "status", "unknown", lambda p: p.list_flow_runs(status="done")),
    _c("list_flow_runs", "limit", "zero", lambda p: p.list_flow_runs(limit=0)),
    _c("list_flow_runs", "flow", "a NUL", lambda p: p.list_flow_runs(flow=NUL)),
    _c("connection", "timeout", "negative", lambda p: p.connection(-1).__enter__(), backends=("blocking",)),
    _c("connection", "shard", "a string", lambda p: p.connection(shard="0").__enter__(), backends=("blocking",)),
    _c("complete_on", "records", "ints", lambda p: p.complete_on(None, [1]), backends=("blocking",)),
    _c("complete_on", "unblock", "a NUL", lambda p: p.complete_on(None, [], [NUL]), backends=("blocking",)),
]


class AsyncCaller:
    """The asyncio processor, its coroutines awaited on a loop of its own (a case calls it as the others)."""

    def __init__(self, aio: AsyncDistributedProcessor) -> None:
        self.aio = aio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.aio, name)
        return lambda *a, **kw: asyncio.run_coroutine_threadsafe(method(*a, **kw), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.aio.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def module_dsn(pg_server: Any, template_db: str) -> Iterator[str]:
    from tests.support import unique_name

    name = unique_name("dp_bad")
    yield pg_server.create_database(name, template=template_db)
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def processors(module_dsn: str) -> Iterator[dict[str, Any]]:
    blocking = DistributedProcessor(module_dsn, connect_timeout=5)
    aio = AsyncCaller(AsyncDistributedProcessor(module_dsn, connect_timeout=5))
    memory = InMemoryProcessor()
    yield {"blocking": blocking, "async": aio, "memory": memory}
    blocking.close()
    aio.close()


def _written(backend: str, processors: dict[str, Any], dsn: str) -> tuple[int, ...]:
    if backend == "memory":
        t = processors["memory"].tables
        return (len(t.rows), len(t.key_limits), len(t.queue_limits), len(t.instances))
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM processing_queue), (SELECT count(*) FROM key_concurrency),"
                           " (SELECT count(*) FROM queue_limits), (SELECT count(*) FROM processor_instances)"
                           ).fetchone()
    return tuple(row)


@pytest.mark.parametrize("case", TABLE, ids=[f"{c.method}-{c.argument}-{c.bad}" for c in TABLE])
def test_each_bad_value_gets_its_typed_error(case: Case, processors: dict[str, Any], module_dsn: str) -> None:
    for backend in case.backends:
        before = _written(backend, processors, module_dsn)
        with pytest.raises(case.error) as caught:
            case.call(processors[backend])
        message = str(caught.value)
        if case.error is InvalidArgument:
            assert case.argument.rstrip("s") in message or case.argument in message, (backend, message)
        assert _written(backend, processors, module_dsn) == before, backend


def test_the_table_covers_every_public_method() -> None:
    public = {n for n in dir(DistributedProcessor) if not n.startswith("_") and callable(getattr(
        DistributedProcessor, n))} | {n for n in dir(InMemoryProcessor) if not n.startswith("_")
                                      and callable(getattr(InMemoryProcessor, n))}
    covered = {c.method for c in TABLE} | NO_ARGUMENTS
    assert public - covered == set()
    for name in ASYNC:  # the asyncio API's methods are in the table on that backend too
        assert any(c.method == name and "async" in c.backends for c in TABLE), name
    for name in sorted({c.method for c in TABLE}):
        params = set(inspect.signature(getattr(DistributedProcessor, name)).parameters) - {"self"}
        tried = {c.argument for c in TABLE if c.method == name}
        assert tried <= params, (name, tried - params)


# ---------------------------------------------------------------------------------------------- property

TEXT_BAD = st.one_of(
    st.text(min_size=0, max_size=5).map(lambda s: s + "\x00"),
    st.sampled_from(["", "\ud800", "x\udfff"]),
    st.integers() | st.floats(allow_nan=True) | st.none().map(lambda _: b"bytes"),
)
INT_BAD = st.one_of(st.integers(min_value=2**31, max_value=2**70), st.integers(max_value=0),
                    st.floats(), st.booleans(), st.text(max_size=3))
ID_BAD = st.one_of(st.integers(min_value=2**63, max_value=2**80), st.integers(max_value=0), st.floats(),
                   st.booleans(), st.text(max_size=3))
SECONDS_BAD = st.one_of(st.sampled_from([NAN, INF, -INF, 1e300, -1.0]), st.floats(max_value=-1e-9),
                        st.text(max_size=3), st.booleans())

PROPERTY: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any, Any], Any], tuple[str, ...]]] = {
    "add_records queue": (TEXT_BAD, lambda p, v: p.add_records([{}], queue=v), ("blocking", "async", "memory")),
    "add_records ordering_key": (TEXT_BAD, lambda p, v: p.add_records([{}], ordering_key=[v]),
                                 ("blocking", "async", "memory")),
    "add_records dedupe_key": (TEXT_BAD, lambda p, v: p.add_records([{}], dedupe_key=[v]),
                               ("blocking", "async", "memory")),
    "add_records max_attempts": (INT_BAD, lambda p, v: p.add_records([{}], max_attempts=v),
                                 ("blocking", "async", "memory")),
    "add_records delay": (SECONDS_BAD, lambda p, v: p.add_records([{}], delay=v), ("blocking", "async", "memory")),
    "cancel ids": (ID_BAD, lambda p, v: p.cancel([v]), ("blocking", "async", "memory")),
    "purge older_than": (SECONDS_BAD, lambda p, v: p.purge(v), ("blocking", "async", "memory")),
    "set_key_concurrency key": (TEXT_BAD, lambda p, v: p.set_key_concurrency(v, 1), ("blocking", "async", "memory")),
    "set_key_concurrency n": (INT_BAD, lambda p, v: p.set_key_concurrency("k", v), ("blocking", "async", "memory")),
    "set_queue_limit queue": (TEXT_BAD, lambda p, v: p.set_queue_limit(v, 1), ("blocking", "async", "memory")),
    "get_queue_status statuses": (TEXT_BAD, lambda p, v: p.get_queue_status(statuses=[v]),
                                  ("blocking", "async", "memory")),
    "claim_records queues": (TEXT_BAD, lambda p, v: p.claim_records(queues=[v]), ("blocking", "memory")),
    "claim_records batch_size": (INT_BAD, lambda p, v: p.claim_records(v), ("blocking", "memory")),
    "retry_failed error_pattern": (TEXT_BAD, lambda p, v: p.retry_failed(error_pattern=v),
                                   ("blocking", "async", "memory")),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_bad_values_get_typed_errors(data: st.DataObject, processors: dict[str, Any],
                                               module_dsn: str) -> None:
    name = data.draw(st.sampled_from(sorted(PROPERTY)), label="argument")
    strategy, call, backends = PROPERTY[name]
    value = data.draw(strategy, label="value")
    backend = data.draw(st.sampled_from(backends), label="backend")
    before = _written(backend, processors, module_dsn)
    with pytest.raises((InvalidArgument, InvalidPayload)):
        call(processors[backend], value)
    assert _written(backend, processors, module_dsn) == before


# ---------------------------------------------------------------------------------------------- the CLI

CLI_CASES = [
    (["enqueue", "--priority", str(2**40)], "priority must be a 32-bit integer"),
    (["retry-failed", "--id", str(2**64)], "id must be <="),
    (["retry-failed", "--error-pattern", "(("], "error_pattern is not a valid regular expression"),
    (["purge", "--older-than", "99999999999d"], "longer than"),
    (["enqueue", "--queue", "q" * 201], "queue must be at most 200 characters"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[" ".join(a)[:40] for a, _ in CLI_CASES])
def test_the_cli_reports_bad_input_in_one_line(args: list[str], message: str, module_dsn: str) -> None:
    result = run_cli("--dsn", module_dsn, *args, input='{"a": 1}\n')
    assert result.returncode in (1, 2), result
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
