"""Every knob of a processor, defined once: its default, its environment variable, its CLI flag, its check.

:class:`Settings` is what the constructor builds and every role reads; ``KNOBS`` is what the CLI turns into
options (``dproc run --batch-size`` reads ``DP_BATCH_SIZE``), so a default or a check lives in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.checks import MAX_BATCH, check_queue_name, parse_optional_duration, positive_int, seconds_or_none
from core.dsn import resolve_dsn
from core.errors import ConfigurationError, InvalidArgument
from core.instance import new_instance_id
from core.payloads import MAX_PAYLOAD_BYTES
from core.retry import RetryPolicy
from core.tracing import TRACE_PARENTS

POOLING_MODES = ("session", "transaction")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


@dataclass(frozen=True)
class Knob:
    """One setting: the constructor (or ``run()``) parameter, its default, and how the CLI offers it."""

    name: str
    default: Any
    help: str
    env: str | None = None  # read by the CLI; None: a library-only setting
    parse: Callable[[str], Any] | None = None  # CLI type (int, float); None: a string
    scope: str = "run"  # "global": every command; "run": `dproc run`; "": not on the CLI
    positive: bool = True  # a number the CLI requires > 0 (else >= 0)
    cli_default: Any = ...  # what the CLI passes when unset, if not ``default`` (None: derived there)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _knobs(*knobs: Knob) -> dict[str, Knob]:
    return {k.name: k for k in knobs}


def trace_parent_value(value: object) -> str:
    """A ``trace_parent`` value (``run()``, ``--trace-parent``): ``link`` or ``child``."""
    if value not in TRACE_PARENTS:
        raise ValueError(f"trace_parent must be one of {', '.join(TRACE_PARENTS)}, got {value!r}")
    return str(value)


# Constructor settings. A default of None is derived from the others (see Settings.build).
KNOBS: dict[str, Knob] = _knobs(
    Knob("schema", "public", "schema of the tables", "DP_SCHEMA", scope="global"),
    Knob("connect_timeout", 10.0, "seconds to wait for the database", "DP_CONNECT_TIMEOUT", float, "global"),
    Knob("pooling", "session", "session, or transaction (behind PgBouncer's transaction pooling: no prepared "
         "statements, no session state, no LISTEN)", "DP_POOLING", scope="global"),
    Knob("instance_id", None, "instance id (default <hostname>-<pid>-<hex>)", "DP_INSTANCE_ID"),
    Knob("queue", "default", "queue(s) to work, comma-separated", "DP_QUEUE"),
    Knob("batch_size", 100, "records per claim", "DP_BATCH_SIZE", int),
    Knob("lease_seconds", 30.0, "lease length", "DP_LEASE_SECONDS", float),
    Knob("max_attempts", 5, "default attempts per record", "DP_MAX_ATTEMPTS", int),
    Knob("heartbeat_interval", None, "seconds between heartbeats (<= lease/3)", "DP_HEARTBEAT_INTERVAL", float),
    Knob("dead_after", None, "heartbeat age after which an instance is declared dead", "DP_DEAD_AFTER", float),
    Knob("cleanup_interval", None, "seconds between orphan recoveries", "DP_CLEANUP_INTERVAL", float),
    Knob("pool_max", 10, "max pooled connections (CLI default: concurrency + 3, 4..50)", "DP_POOL_MAX", int,
         cli_default=None),
    Knob("retry", None, "retry policy (RetryPolicy)", scope=""),
    Knob("pool_min", 1, "min pooled connections", scope=""),
    Knob("statement_timeout", 30.0, "server-side limit per statement, seconds", scope=""),
    Knob("key_concurrency", 1, "default limit of records in flight per ordering key", scope=""),
    Knob("block_on_failure", False, "default: a failed keyed record stops its key", scope=""),
    Knob("copy_threshold", 2000, "batches at least this large are inserted with COPY", scope=""),
    Knob("cleanup_batch", 1000, "records recovered per statement", scope=""),
    Knob("notify", True, "add_records sends NOTIFY", scope=""),
    Knob("application_name", "distributed-processor", "application_name of the connections", scope=""),
    Knob("instance_retention", 86400.0, "seconds a stopped instance stays in the registry", scope=""),
    Knob("horizon_warning_seconds", 300.0, "health is degraded while something holds the MVCC horizon back "
         "longer than this (seconds, or none)", "DP_HORIZON_WARNING_SECONDS", parse_optional_duration, "global"),
    Knob("max_payload_bytes", MAX_PAYLOAD_BYTES, "largest payload accepted, in bytes of JSON",
         "DP_MAX_PAYLOAD_BYTES", int, "global"),
    Knob("retention", 7 * 86400.0, "finished records older than this are deleted by the maintainer (e.g. 7d, "
         "or none to keep them)", "DP_RETENTION", parse_optional_duration),
)

# Parameters of run() that the CLI offers too (their defaults are run()'s), and the retry policy's delays.
RUN_KNOBS: dict[str, Knob] = _knobs(
    Knob("concurrency", 10, "handler threads", "DP_CONCURRENCY", int),
    Knob("grace_seconds", 30.0, "drain time after SIGTERM", "DP_GRACE_SECONDS", float, positive=False),
    Knob("poll_interval", 1.0, "max seconds between polls when idle", "DP_POLL_INTERVAL", float),
    Knob("handler_timeout", None, "per-record timeout in seconds", "DP_HANDLER_TIMEOUT", float),
    Knob("retry_base_delay", RetryPolicy.base_delay, "first retry delay in seconds", "DP_RETRY_BASE_DELAY", float,
         positive=False),
    Knob("retry_max_delay", RetryPolicy.max_delay, "cap of the retry delay in seconds", "DP_RETRY_MAX_DELAY",
         float, positive=False),
    Knob("trace_parent", "link", "with OpenTelemetry (extra [otel]) and a tracer provider: each process span links "
         "to the trace that added its record (link) or is its child (child)", "DP_TRACE_PARENT", trace_parent_value),
)


def optional_seconds(name: str, value: object) -> float | None:
    try:
        return seconds_or_none(name, value)
    except InvalidArgument as exc:
        raise ConfigurationError(str(exc)) from None


def default(name: str) -> Any:
    """The default of a constructor knob (the constructor's signature reads them from here)."""
    return KNOBS[name].default


def run_default(name: str) -> Any:
    return RUN_KNOBS[name].default


@dataclass(frozen=True)
class Settings:
    """The validated settings of one processor. Build with :meth:`build`; every role reads from here."""

    dsn: str
    instance_id: str
    queue: str
    batch_size: int
    lease_seconds: float
    max_attempts: int
    retry: RetryPolicy
    schema: str
    pool_min: int
    pool_max: int
    connect_timeout: float
    statement_timeout: float | None
    key_concurrency: int
    block_on_failure: bool
    copy_threshold: int
    cleanup_batch: int
    dead_after: float
    heartbeat_interval: float
    cleanup_interval: float
    notify: bool
    application_name: str
    instance_retention: float
    pooling: str
    horizon_warning_seconds: float | None
    retention: float | None
    max_payload_bytes: int

    @classmethod
    def build(cls, dsn: str | None, *, database: bool = True, **kw: Any) -> Settings:
        """Check every knob and derive the dependent ones; bad values raise :class:`ConfigurationError`.

        ``dsn`` falls back to ``DATABASE_URL``; with ``database=False`` (the in-memory processor) it is unused.
        """
        values = {name: kw.pop(name, knob.default) for name, knob in KNOBS.items()}
        if kw:
            raise ConfigurationError(f"unknown settings: {sorted(kw)}")
        schema = values["schema"]
        if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(f"schema must be a plain identifier, got {schema!r}")
        check_queue_name(values["queue"], ConfigurationError)
        try:
            batch_size = positive_int("batch_size", values["batch_size"], maximum=MAX_BATCH)
            ints = {name: positive_int(name, values[name]) for name in
                    ("max_attempts", "pool_max", "key_concurrency", "copy_threshold", "cleanup_batch",
                     "max_payload_bytes")}
            pool_min = positive_int("pool_min", values["pool_min"], allow_zero=True)
        except InvalidArgument as exc:
            raise ConfigurationError(str(exc)) from None
        if pool_min > ints["pool_max"]:
            raise ConfigurationError("pool_min must not exceed pool_max")
        lease = values["lease_seconds"]
        if not lease or lease <= 0:
            raise ConfigurationError("lease_seconds must be > 0")
        if values["connect_timeout"] <= 0:
            raise ConfigurationError("connect_timeout must be > 0")
        if values["pooling"] not in POOLING_MODES:
            raise ConfigurationError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {values['pooling']!r}")
        lease = float(lease)
        # Heartbeats at most every lease/3 so two can be missed before a lease runs out.
        heartbeat = float(values["heartbeat_interval"] or min(10.0, lease / 3))
        if heartbeat > lease / 3 + 1e-9:
            raise ConfigurationError("heartbeat_interval must be at most lease_seconds / 3")
        return cls(
            dsn=resolve_dsn(dsn) if database else "",
            instance_id=values["instance_id"] or new_instance_id(),
            queue=values["queue"],
            batch_size=batch_size,
            lease_seconds=lease,
            max_attempts=ints["max_attempts"],
            retry=values["retry"] or RetryPolicy(),
            schema=schema,
            pool_min=pool_min,
            pool_max=ints["pool_max"],
            connect_timeout=float(values["connect_timeout"]),
            statement_timeout=values["statement_timeout"],
            key_concurrency=ints["key_concurrency"],
            block_on_failure=bool(values["block_on_failure"]),
            copy_threshold=ints["copy_threshold"],
            cleanup_batch=ints["cleanup_batch"],
            dead_after=float(values["dead_after"] or max(lease, 3 * heartbeat)),
            heartbeat_interval=heartbeat,
            cleanup_interval=float(values["cleanup_interval"] or max(1.0, lease / 2)),
            notify=bool(values["notify"]),
            application_name=str(values["application_name"]),
            instance_retention=float(values["instance_retention"]),
            pooling=values["pooling"],
            horizon_warning_seconds=optional_seconds("horizon_warning_seconds", values["horizon_warning_seconds"]),
            retention=optional_seconds("retention", values["retention"]),
            max_payload_bytes=ints["max_payload_bytes"],
        )


class SettingsView:
    """The settings as read-only attributes of a processor (``p.batch_size`` is ``p.settings.batch_size``)."""

    settings: Settings

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def queue(self) -> str:
        return self.settings.queue

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    @property
    def max_attempts(self) -> int:
        return self.settings.max_attempts

    @property
    def retry(self) -> RetryPolicy:
        return self.settings.retry

    @property
    def heartbeat_interval(self) -> float:
        return self.settings.heartbeat_interval

    @property
    def dead_after(self) -> float:
        return self.settings.dead_after

    @property
    def cleanup_interval(self) -> float:
        return self.settings.cleanup_interval

    @property
    def pool_min(self) -> int:
        return self.settings.pool_min

    @property
    def pool_max(self) -> int:
        return self.settings.pool_max

    @property
    def connect_timeout(self) -> float:
        return self.settings.connect_timeout

    @property
    def statement_timeout(self) -> float | None:
        return self.settings.statement_timeout

    @property
    def key_concurrency(self) -> int:
        return self.settings.key_concurrency

    @property
    def block_on_failure(self) -> bool:
        return self.settings.block_on_failure

    @property
    def copy_threshold(self) -> int:
        return self.settings.copy_threshold

    @property
    def cleanup_batch(self) -> int:
        return self.settings.cleanup_batch

    @property
    def notify(self) -> bool:
        return self.settings.notify

    @property
    def application_name(self) -> str:
        return self.settings.application_name

    @property
    def instance_retention(self) -> float:
        return self.settings.instance_retention

    @property
    def pooling(self) -> str:
        return self.settings.pooling

    @property
    def schema(self) -> str:
        return self.settings.schema

    @property
    def horizon_warning_seconds(self) -> float | None:
        return self.settings.horizon_warning_seconds

    @property
    def retention(self) -> float | None:
        return self.settings.retention

    @property
    def max_payload_bytes(self) -> int:
        return self.settings.max_payload_bytes
