"""The commands of ``dproc``: one function each, called by :func:`core.cli.main` with the parsed options."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from core.dsn import redact

log = logging.getLogger("core.cli")

EXIT_OK, EXIT_ERROR = 0, 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ---------------------------------------------------------------------- helpers


def resolve_dsn(args: argparse.Namespace, *, announce: bool = True) -> str:
    """The DSN from --dsn / DATABASE_URL, else an embedded server (started, migrated, and announced).
    With --shard / DP_SHARDS: the first shard's (the processor gets them all)."""
    if getattr(args, "shard", None):
        if args.dsn:
            raise CliError("give --dsn or --shard, not both")
        return str(args.shard[0])
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


def load_handler(path: str | None) -> Any:
    """The handler ``package.module:attr`` names: a function, or a flow (core.flows.Flow) or a list of flows."""
    if not path:
        raise CliError("no handler: pass --handler package.module:function (or set DP_HANDLER)")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise CliError(f"handler {path!r} must look like package.module:function (or :flow)")
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
    from core.flows.template import as_flows

    if as_flows(target) is None and not callable(target):
        raise CliError(f"handler {path!r} is not callable (nor a flow)")
    return target


def _processor(args: argparse.Namespace, dsn: str, **kw: Any) -> Any:
    from core.processor import DistributedProcessor

    kw.setdefault("connect_timeout", args.connect_timeout)
    if getattr(args, "shard", None):
        return DistributedProcessor(shards=list(args.shard), schema=args.schema, pooling=args.pooling, **kw)
    return DistributedProcessor(dsn, schema=args.schema, pooling=args.pooling, **kw)


# ---------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.migrate import upgrade

    dsn = resolve_dsn(args)
    if args.shard:
        with _processor(args, dsn) as p:
            p.migrate()
        print(f"migrated {len(args.shard)} shards (schema {args.schema}) to head")
        return EXIT_OK
    upgrade(dsn, args.schema, connect_timeout=args.connect_timeout)
    print(f"migrated {redact(dsn)} (schema {args.schema}) to head")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from core.flows.template import as_flows
    from core.retry import RetryPolicy

    handler = load_handler(args.handler)
    dsn = resolve_dsn(args)
    queues = [q.strip() for q in str(args.queue).split(",") if q.strip()]
    if not queues:
        raise CliError("--queue names no queue")
    flows = as_flows(handler)
    # Flows work their steps' queues unless a queue is named (--queue other than the default, or DP_QUEUE).
    work: list[str] | None = None if flows is not None and queues == ["default"] and not os.environ.get(
        "DP_QUEUE") else queues
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
    if args.transactional and flows is not None:
        raise CliError("--transactional: a flow's steps say whether they are transactional")
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
        log.info("worker starting", extra={"instance_id": p.instance_id, "queues": work or "the flows'",
                                           "dsn": redact(dsn),
                                           "concurrency": args.concurrency})
        try:
            summary = p.run(
                handler,
                concurrency=args.concurrency,
                queues=work,
                stop_when_empty=args.stop_when_empty,
                transactional=args.transactional,
                handler_timeout=args.handler_timeout,
                poll_interval=args.poll_interval,
                listen=not args.poll_only,
                grace_seconds=args.grace_seconds,
                trace_parent=args.trace_parent,
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
    if args.key_field and args.ordering_key:
        raise CliError("give --ordering-key or --key-field, not both")
    dsn = resolve_dsn(args)
    started = time.perf_counter()
    from tqdm import tqdm

    with _processor(args, dsn) as p, tqdm(
        total=len(payloads), unit="rec", disable=args.no_progress or not sys.stderr.isatty(), file=sys.stderr
    ) as bar:
        for start in range(0, len(payloads), args.batch):
            chunk = payloads[start : start + args.batch]
            keys = args.ordering_key if not args.key_field else [
                None if r.get(args.key_field) is None else str(r[args.key_field]) for r in chunk]
            p.add_records(chunk, queue=args.queue, priority=args.priority, ordering_key=keys)
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
        print(json.dumps({"queues": status["queues"], "totals": status["totals"], "paused": status["paused"],
                          "instances": instances},
                         default=str, indent=2))
        return EXIT_OK
    cols = ("pending", "processing", "completed", "failed", "cancelled")
    print(f"{'queue':<20}" + "".join(f"{c:>12}" for c in cols) + f"{'oldest pending':>16}")
    for name, q in sorted(status["queues"].items()):
        age = q["oldest_pending_age_seconds"]
        paused = q.get("paused")
        state = "" if not paused else "  paused" + (f" ({paused['reason']})" if paused.get("reason") else "") + (
            f" until {paused['until'].isoformat()}" if paused.get("until") else "")
        print(f"{name:<20}" + "".join(f"{q[c]:>12}" for c in cols) + f"{(f'{age:.1f}s' if age else '-'):>16}{state}")
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
    dsn = resolve_dsn(args, announce=False) if args.dsn or args.shard else None
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


def cmd_shards(args: argparse.Namespace) -> int:
    from core.shardcommands import shards_command

    if not args.shard:
        raise CliError("no shards: pass --shard DSN (repeatable) or set DP_SHARDS")
    with _processor(args, resolve_dsn(args)) as p:
        return shards_command(p, args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from core.web.cli import serve
    except ImportError as exc:  # the optional extra; an import error of our own is a bug, shown as one
        if (exc.name or "").split(".")[0] not in ("starlette", "jinja2", "uvicorn", "markupsafe", "anyio"):
            raise
        raise CliError("the dashboard needs the web extra: pip install 'distributed-processor[web]'") from None
    return serve(args, lambda: _processor(args, resolve_dsn(args)))


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
    "shards": cmd_shards,
    "dashboard": cmd_dashboard,
}
