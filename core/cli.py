"""Command-line interface: ``dproc`` (console script) and ``python -m core``.

Every option also reads an environment variable, named in its ``--help`` line, so a container is configured
with environment alone. Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from core.config import KNOBS, RUN_KNOBS, Knob
from core.dsn import redact
from core.errors import ConfigurationError, ProcessorError

log = logging.getLogger("core.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 45s, 30m, 12h, 7d)")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * factor


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return convert


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line, exit 2, as argparse does, without the usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add(p: argparse.ArgumentParser, flag: str, env: str, help: str, **kw: Any) -> None:
    """An option whose default comes from ``env``; the variable is named in the help text."""
    if kw.get("action") == "store_true":
        kw["default"] = _env_bool(env)
    else:
        raw = _env(env)
        if raw is not None and "type" in kw:
            try:
                kw["default"] = kw["type"](raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise CliError(f"environment variable {env}={raw!r} is invalid: {exc}") from None
        elif raw is not None:
            kw["default"] = raw
    default = kw.get("default")
    shown = f", default {default}" if default not in (None, False, "") and "DSN" not in help else ""
    p.add_argument(flag, help=f"{help} (env {env}{shown})", **kw)


def _add_knob(p: argparse.ArgumentParser, knob: Knob) -> None:
    """A processor setting as an option: flag, variable, help and default all come from core.config."""
    kw: dict[str, Any] = {"default": knob.default if knob.cli_default is ... else knob.cli_default}
    if knob.parse is not None:
        kw["type"] = _positive(knob.parse) if knob.positive else _non_negative(knob.parse)
    _add(p, knob.flag, str(knob.env), knob.help, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dproc",
        description="distributed-processor: share one PostgreSQL table of records between many workers.",
        epilog="Without --dsn / DATABASE_URL, an embedded PostgreSQL is started under ./.dproc/pgdata.",
    )
    _add(parser, "--dsn", "DATABASE_URL", "PostgreSQL DSN")
    for knob in KNOBS.values():
        if knob.scope == "global":
            _add_knob(parser, knob)
    _add(parser, "--log-format", "DP_LOG_FORMAT", "log format", choices=("text", "json"), default="text")
    _add(parser, "--log-level", "DP_LOG_LEVEL", "log level", default="INFO",
         choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    _add(parser, "--debug", "DP_DEBUG", "show tracebacks on errors", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("migrate", help="bring the database schema to the latest migration")

    run = sub.add_parser("run", help="run a worker (the container entrypoint); SIGTERM drains and exits 0")
    _add(run, "--handler", "DP_HANDLER", "handler as package.module:function")
    for knob in (*KNOBS.values(), *RUN_KNOBS.values()):
        if knob.scope == "run":
            _add_knob(run, knob)
    _add(run, "--poll-only", "DP_POLL_ONLY", "no LISTEN/NOTIFY (for PgBouncer transaction pooling)",
         action="store_true")
    _add(run, "--transactional", "DP_TRANSACTIONAL",
         "call handler(record, conn) in a transaction that also completes the record", action="store_true")
    _add(run, "--stop-when-empty", "DP_STOP_WHEN_EMPTY", "exit once nothing is due or held", action="store_true")
    _add(run, "--health-port", "DP_HEALTH_PORT", "serve /health/live, /health/ready, /health, /metrics on this port",
         type=int)
    _add(run, "--health-host", "DP_HEALTH_HOST", "bind address of the health endpoint", default="0.0.0.0")
    _add(run, "--migrate", "DP_MIGRATE", "migrate the schema before starting", action="store_true")

    enq = sub.add_parser("enqueue", help="add records from JSON lines (a file or stdin)")
    enq.add_argument("file", nargs="?", default="-", help="JSON-lines file, one object per line (default stdin)")
    _add(enq, "--queue", "DP_QUEUE", "target queue", default="default")
    _add(enq, "--priority", "DP_PRIORITY", "priority of the records", type=int, default=0)
    _add(enq, "--ordering-key", "DP_ORDERING_KEY", "ordering key for every record")
    _add(enq, "--batch", "DP_ENQUEUE_BATCH", "records per insert (COPY when large)", type=_positive(int),
         default=10000)
    _add(enq, "--no-progress", "DP_NO_PROGRESS", "no progress bar", action="store_true")

    st = sub.add_parser("status", help="counts per queue and the live instances")
    _add(st, "--json", "DP_JSON", "print JSON", action="store_true")

    hl = sub.add_parser("health", help="health check: exit 0 when healthy, 1 when degraded or unhealthy")
    _add(hl, "--json", "DP_JSON", "print the full report as JSON", action="store_true")
    _add(hl, "--timeout", "DP_HEALTH_TIMEOUT", "seconds before giving up", type=_positive(float), default=5.0)

    sub.add_parser("cleanup", help="recover orphaned records (expired leases, dead instances) once")

    pg = sub.add_parser("purge", help="delete finished records older than a duration, in bounded batches")
    _add(pg, "--older-than", "DP_PURGE_OLDER_THAN", "age, e.g. 7d, 12h", type=parse_duration, default="7d")
    _add(pg, "--batch", "DP_PURGE_BATCH", "rows per delete", type=_positive(int), default=5000)

    rf = sub.add_parser("retry-failed", help="move failed records back to pending")
    rf.add_argument("--id", type=int, action="append", dest="ids", help="record id (repeatable)")
    _add(rf, "--error-pattern", "DP_ERROR_PATTERN", "only records whose last_error matches this regex")
    _add(rf, "--queue", "DP_QUEUE", "only this queue")

    dm = sub.add_parser("demo", help="show the product: 3 worker processes drain sample records, with proof")
    _add(dm, "--count", "DP_DEMO_COUNT", "records to enqueue", type=_positive(int), default=3000)
    _add(dm, "--workers", "DP_DEMO_WORKERS", "worker processes", type=_positive(int), default=3)
    _add(dm, "--work-ms", "DP_DEMO_WORK_MS", "simulated work per record (ms)", type=float, default=2.0)
    return parser


# ---------------------------------------------------------------------- helpers


def resolve_dsn(args: argparse.Namespace, *, announce: bool = True) -> str:
    """The DSN from --dsn / DATABASE_URL, else an embedded server (started, migrated, and announced)."""
    if args.dsn:
        return str(args.dsn)
    from core import embedded

    dsn = embedded.start()
    if announce:
        print(f"dproc: no DATABASE_URL set: using the embedded PostgreSQL in {embedded.default_data_dir()}",
              file=sys.stderr)
    from core.migrate import upgrade

    upgrade(dsn, args.schema)
    return dsn


def load_handler(path: str | None) -> Callable[..., Any]:
    if not path:
        raise CliError("no handler: pass --handler package.module:function (or set DP_HANDLER)")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise CliError(f"handler {path!r} must look like package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import handler module {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CliError(f"handler {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def _processor(args: argparse.Namespace, dsn: str, **kw: Any) -> Any:
    from core import DistributedProcessor

    kw.setdefault("connect_timeout", args.connect_timeout)
    return DistributedProcessor(dsn, schema=args.schema, **kw)


# ---------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.migrate import upgrade

    dsn = resolve_dsn(args)
    upgrade(dsn, args.schema, connect_timeout=args.connect_timeout)
    print(f"migrated {redact(dsn)} (schema {args.schema}) to head")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from core.retry import RetryPolicy

    handler = load_handler(args.handler)
    dsn = resolve_dsn(args)
    queues = [q.strip() for q in str(args.queue).split(",") if q.strip()]
    if not queues:
        raise CliError("--queue names no queue")
    kw: dict[str, Any] = {
        "queue": queues[0],
        "batch_size": args.batch_size,
        "lease_seconds": args.lease_seconds,
        "max_attempts": args.max_attempts,
        "instance_id": args.instance_id,
        "pool_max": args.pool_max or max(4, min(args.concurrency + 3, 50)),
        "heartbeat_interval": args.heartbeat_interval,
        "dead_after": args.dead_after,
        "cleanup_interval": args.cleanup_interval,
        "retry": RetryPolicy(base_delay=args.retry_base_delay, max_delay=args.retry_max_delay),
    }
    if args.transactional:
        n_params = len(inspect.signature(handler).parameters)
        if n_params < 2:
            raise CliError("--transactional needs a handler taking (record, conn)")
    with _processor(args, dsn, **kw) as p:
        if args.migrate:
            p.migrate()
        server = None
        if args.health_port is not None:
            from core.http import HealthServer

            server = HealthServer(p, args.health_host, args.health_port,
                                  live_within=max(30.0, 3 * args.poll_interval)).start()
        log.info("worker starting", extra={"instance_id": p.instance_id, "queues": queues, "dsn": redact(dsn),
                                           "concurrency": args.concurrency})
        try:
            summary = p.run(
                handler,
                concurrency=args.concurrency,
                queues=queues,
                stop_when_empty=args.stop_when_empty,
                transactional=args.transactional,
                handler_timeout=args.handler_timeout,
                poll_interval=args.poll_interval,
                listen=not args.poll_only,
                grace_seconds=args.grace_seconds,
            )
        finally:
            if server is not None:
                server.stop()
    print(json.dumps({"instance_id": p.instance_id, **summary.as_dict()}), flush=True)
    stuck = [t for t in threading.enumerate() if t.name.startswith("dp-handler") and t.is_alive()]
    if stuck:
        # A handler that ignored the grace period would keep the interpreter alive at exit; its record was
        # already released and its late result is fenced, so leave now.
        log.warning("handlers still running after the grace period; exiting anyway", extra={"threads": len(stuck)})
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def read_json_lines(stream: TextIO) -> list[dict[str, Any]]:
    """Parse every line first, so a malformed line (reported with its number) writes nothing."""
    out: list[dict[str, Any]] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(
                f"line {number}: malformed JSON ({exc.msg} at column {exc.colno}); nothing enqueued"
            ) from None
        if not isinstance(value, dict):
            raise CliError(f"line {number}: expected a JSON object, got {type(value).__name__}; nothing enqueued")
        out.append(value)
    return out


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.file == "-":
        payloads = read_json_lines(sys.stdin)
    else:
        try:
            with open(args.file, encoding="utf-8") as fh:
                payloads = read_json_lines(fh)
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    dsn = resolve_dsn(args)
    started = time.perf_counter()
    from tqdm import tqdm

    with _processor(args, dsn) as p, tqdm(
        total=len(payloads), unit="rec", disable=args.no_progress or not sys.stderr.isatty(), file=sys.stderr
    ) as bar:
        for start in range(0, len(payloads), args.batch):
            chunk = payloads[start : start + args.batch]
            p.add_records(chunk, queue=args.queue, priority=args.priority, ordering_key=args.ordering_key)
            bar.update(len(chunk))
    elapsed = time.perf_counter() - started
    rate = len(payloads) / elapsed if elapsed > 0 else 0.0
    print(f"enqueued {len(payloads)} records into queue {args.queue!r} in {elapsed:.2f}s ({rate:,.0f}/s)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args, announce=not args.json)
    with _processor(args, dsn) as p:
        status = p.get_queue_status()
        instances = p.list_instances()
    if args.json:
        print(json.dumps({"queues": status["queues"], "totals": status["totals"], "instances": instances},
                         default=str, indent=2))
        return EXIT_OK
    cols = ("pending", "processing", "completed", "failed", "cancelled")
    print(f"{'queue':<20}" + "".join(f"{c:>12}" for c in cols) + f"{'oldest pending':>16}")
    for name, q in sorted(status["queues"].items()):
        age = q["oldest_pending_age_seconds"]
        print(f"{name:<20}" + "".join(f"{q[c]:>12}" for c in cols) + f"{(f'{age:.1f}s' if age else '-'):>16}")
    print()
    print(f"{'instance':<40}{'status':>10}{'processing':>12}{'heartbeat age':>15}")
    now = time.time()
    for inst in instances:
        age = now - inst["last_heartbeat_at"].timestamp()
        print(f"{inst['instance_id']:<40}{inst['status']:>10}{inst['processing']:>12}{age:>14.1f}s")
    if not instances:
        print("(no running instances)")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args, announce=False) if args.dsn else None
    if dsn is None:
        raise CliError("no database: pass --dsn or set DATABASE_URL")
    with _processor(args, dsn, connect_timeout=min(args.timeout, args.connect_timeout)) as p:
        report = p.health_check(timeout=args.timeout)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    else:
        reasons = "; ".join(report["reasons"])
        print(f"{report['status']}" + (f": {reasons}" if reasons else ""))
    return EXIT_OK if report["status"] == "healthy" else EXIT_ERROR


def cmd_cleanup(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        n = p.cleanup_orphaned_records()
    print(f"recovered {n} orphaned records")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        n = p.purge(args.older_than, batch=args.batch)
    print(f"purged {n} finished records older than {args.older_than:g}s")
    return EXIT_OK


def cmd_retry_failed(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        n = p.retry_failed(args.ids, queue=args.queue, error_pattern=args.error_pattern)
    print(f"moved {n} failed records back to pending")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from core.demo import run_demo

    return run_demo(resolve_dsn(args), args.schema, count=args.count, workers=args.workers, work_ms=args.work_ms)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "enqueue": cmd_enqueue,
    "status": cmd_status,
    "health": cmd_health,
    "cleanup": cmd_cleanup,
    "purge": cmd_purge,
    "retry-failed": cmd_retry_failed,
    "demo": cmd_demo,
}


def _one_line(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()))


def main(argv: Sequence[str] | None = None) -> int:
    debug = _env_bool("DP_DEBUG") or "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        from core import logs

        logs.configure(args.log_format, args.log_level)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ProcessorError, ConfigurationError, OSError) as exc:
        if debug:
            raise
        print(f"dproc: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            raise
        print(f"dproc: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_ERROR
