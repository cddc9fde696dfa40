"""Command-line interface: ``dproc`` (console script) and ``python -m core``.

Every option also reads an environment variable, named in its ``--help`` line, so a container is configured
with environment alone. Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from core.checks import parse_duration
from core.commands import COMMANDS, EXIT_ERROR, CliError
from core.config import KNOBS, RUN_KNOBS, Knob
from core.controlcommands import CONTROL_COMMANDS
from core.controlcommands import add_parsers as add_control_parsers
from core.dsn import redact
from core.errors import ConfigurationError, ProcessorError

log = logging.getLogger("core.cli")

EXIT_USAGE = 2


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def _number(kind: Callable[[str], Any], *, positive: bool = True) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above zero (or, with ``positive=False``, not below it)."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'>' if positive else '>='} 0, got {text}")
        return value

    return convert


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _number(kind)


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
    if knob.parse in (int, float):
        kw["type"] = _number(knob.parse, positive=knob.positive)
    elif knob.parse is not None:
        kw["type"] = _typed(knob.parse)
    _add(p, knob.flag, str(knob.env), knob.help, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dproc",
        description="distributed-processor: share one PostgreSQL table of records between many workers.",
        epilog="Without --dsn / DATABASE_URL, an embedded PostgreSQL is started under ./.dproc/pgdata.",
    )
    _add(parser, "--dsn", "DATABASE_URL", "PostgreSQL DSN")
    shards = _env("DP_SHARDS")
    parser.add_argument("--shard", action="append", metavar="DSN",
                        default=shards.split() if shards else None,
                        help="a shard's DSN, repeatable: several databases behind one processor, instead of --dsn"
                             " (env DP_SHARDS, whitespace-separated)")
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
    _add(enq, "--key-field", "DP_KEY_FIELD", "each record's ordering key from this payload field (none when absent)")
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
    _add(pg, "--older-than", "DP_PURGE_OLDER_THAN", "age, e.g. 7d, 12h", type=_typed(parse_duration), default="7d")
    _add(pg, "--batch", "DP_PURGE_BATCH", "rows per delete", type=_positive(int), default=5000)

    rf = sub.add_parser("retry-failed", help="move failed records back to pending")
    rf.add_argument("--id", type=int, action="append", dest="ids", help="record id (repeatable)")
    _add(rf, "--error-pattern", "DP_ERROR_PATTERN", "only records whose last_error matches this regex")
    _add(rf, "--queue", "DP_QUEUE", "only this queue")

    sh = sub.add_parser("shards", help="shards: status, add (rebalance onto new ones), retire one")
    sh_sub = sh.add_subparsers(dest="shards_command", required=True, metavar="ACTION", parser_class=_Parser)
    _add(sh_sub.add_parser("status", help="each shard's partitions, records and in-doubt moves"), "--json",
         "DP_JSON", "print JSON", action="store_true")
    sh_sub.add_parser("add", help="set up the configured shards that are new, then move partitions onto them")
    rt = sh_sub.add_parser("retire", help="move every record of a shard to the others; it takes no new ones")
    rt.add_argument("shard_no", type=int, help="the shard's number (see `dproc shards status`)")

    wb = sub.add_parser("dashboard", help="serve the web dashboard (extra [web]; auth: DP_DASHBOARD_AUTH=user:pass)")
    _add(wb, "--host", "DP_DASHBOARD_HOST", "bind address (beyond loopback only with auth)", default="127.0.0.1")
    _add(wb, "--port", "DP_DASHBOARD_PORT", "port", type=_positive(int), default=8090)
    _add(wb, "--read-only", "DP_DASHBOARD_READ_ONLY", "no actions: buttons hidden, POSTs refused", action="store_true")
    _add(wb, "--hide-payloads", "DP_DASHBOARD_HIDE_PAYLOADS", "never show a record's payload", action="store_true")
    _add(wb, "--auth-file", "DP_DASHBOARD_AUTH_FILE", "basic auth from a file holding user:password")

    add_control_parsers(sub, _add, _typed)

    dm = sub.add_parser("demo", help="show the product: 3 worker processes drain sample records, with proof")
    _add(dm, "--count", "DP_DEMO_COUNT", "records to enqueue", type=_positive(int), default=3000)
    _add(dm, "--workers", "DP_DEMO_WORKERS", "worker processes", type=_positive(int), default=3)
    _add(dm, "--work-ms", "DP_DEMO_WORK_MS", "simulated work per record (ms)", type=float, default=2.0)
    return parser


def _one_line(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()))


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR1 <pid>` prints every thread's stack to stderr: where a stuck worker is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    debug = _env_bool("DP_DEBUG") or "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        from core import logs  # after parsing: --help stays fast

        logs.configure(args.log_format, args.log_level)
        return {**COMMANDS, **CONTROL_COMMANDS}[args.command](args)
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
