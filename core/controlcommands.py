"""The queue control commands of ``dproc``: ``pause``, ``resume``, ``schedules``, ``schedule``, ``unschedule``,
``rate``. Each takes the parsed options (``core.cli``) and prints one line, or ``--json``."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from typing import Any

from core.checks import parse_duration
from core.commands import EXIT_OK, CliError, _processor, resolve_dsn


def add_parsers(sub: Any, add: Any, typed: Any) -> None:
    """The commands' parsers (``add`` is core.cli's option helper, ``typed`` its type wrapper)."""
    ps = sub.add_parser("pause", help="pause a queue on every instance (no new claims; in-flight records finish)")
    ps.add_argument("queue", help="the queue")
    ps.add_argument("--until", help="resume by itself then: a duration (30m) or an ISO date-time with a zone")
    ps.add_argument("--reason", help="why (shown in status and health)")
    rs = sub.add_parser("resume", help="resume a paused queue (its idle workers wake at once)")
    rs.add_argument("queue", help="the queue")
    ls = sub.add_parser("schedules", help="list the schedules with their next and last fire")
    add(ls, "--json", "DP_JSON", "print JSON", action="store_true")
    sc = sub.add_parser("schedule", help="declare or update a schedule (idempotent)")
    sc.add_argument("name", help="the schedule's name")
    when = sc.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="five fields, or six with seconds first, e.g. '30 2 * * *'")
    when.add_argument("--every", type=typed(parse_duration), help="an interval, e.g. 30s, 5m (at least 1s)")
    sc.add_argument("--timezone", default="UTC", help="the zone of --cron (zoneinfo name, default UTC)")
    sc.add_argument("--queue", help="the queue of its records (default the processor's)")
    sc.add_argument("--payload", default="{}", help="each record's payload, a JSON object (default {})")
    sc.add_argument("--misfire", default="latest", choices=("skip", "latest", "all"), help="missed ticks")
    sc.add_argument("--backfill", type=typed(parse_duration), help="with --misfire all: how far back")
    sc.add_argument("--overlap", default="allow", choices=("allow", "skip_if_running"), help="overlapping runs")
    sc.add_argument("--priority", type=int, help="its records' priority")
    us = sub.add_parser("unschedule", help="remove a schedule")
    us.add_argument("name", help="the schedule's name")
    rt = sub.add_parser("rate", help="limit a queue's starts (N per --per seconds, across instances); --off removes")
    rt.add_argument("queue", help="the queue")
    rt.add_argument("n", nargs="?", type=int, help="record starts per period")
    rt.add_argument("--per", type=typed(parse_duration), default=1.0, help="the period (default 1s)")
    rt.add_argument("--off", action="store_true", help="remove the queue's rate")


def _until(text: str | None) -> datetime | float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--until {text!r}: give a duration (30m, 2h) or an ISO date-time with a zone") from None


def cmd_pause(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        p.pause(args.queue, until=_until(args.until), reason=args.reason)
        state = p.paused_queues().get(args.queue, {})
    until = f" until {state['until'].isoformat()}" if state.get("until") else ""
    print(f"paused queue {args.queue!r}{until}")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        was = p.resume(args.queue)
    print(f"resumed queue {args.queue!r}" if was else f"queue {args.queue!r} was not paused")
    return EXIT_OK


def _when(value: Any) -> str:
    return "-" if value is None else value.isoformat() if isinstance(value, datetime) else str(value)


def cmd_schedules(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args, announce=not args.json)) as p:
        rows = p.list_schedules()
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return EXIT_OK
    print(f"{'name':<24}{'when':<36}{'queue':<16}{'next fire':<34}{'last fire':<34}{'fired':>8}")
    for r in rows:
        every = r["every"]
        when = f"cron {r['cron']} {r['timezone']}" if r["cron"] else f"every {every.total_seconds():g}s"
        print(f"{r['name']:<24}{when:<36}{r['queue']:<16}{_when(r['next_fire']):<34}{_when(r['last_fire']):<34}"
              f"{r['fired']:>8}")
    if not rows:
        print("(no schedules)")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise CliError(f"--payload is not JSON: {exc.msg}") from None
    options = {} if args.priority is None else {"priority": args.priority}
    every = None if args.every is None else timedelta(seconds=args.every)
    with _processor(args, resolve_dsn(args)) as p:
        row = p.schedule(args.name, cron=args.cron, every=every, payload=payload, queue=args.queue,
                         timezone=args.timezone, misfire=args.misfire, backfill=args.backfill, overlap=args.overlap,
                         **options)
    print(f"schedule {args.name!r}: next fire {_when(row.get('next_fire'))}")
    return EXIT_OK


def cmd_unschedule(args: argparse.Namespace) -> int:
    with _processor(args, resolve_dsn(args)) as p:
        gone = p.unschedule(args.name)
    print(f"removed schedule {args.name!r}" if gone else f"no schedule {args.name!r}")
    return EXIT_OK


def cmd_rate(args: argparse.Namespace) -> int:
    if args.off == (args.n is not None):
        raise CliError("give N (and --per), or --off")
    with _processor(args, resolve_dsn(args)) as p:
        p.set_queue_rate(args.queue, None if args.off else args.n, args.per)
    print(f"queue {args.queue!r}: " + ("no rate" if args.off else f"at most {args.n} starts per {args.per:g}s"))
    return EXIT_OK


CONTROL_COMMANDS = {"pause": cmd_pause, "resume": cmd_resume, "schedules": cmd_schedules, "schedule": cmd_schedule,
                    "unschedule": cmd_unschedule, "rate": cmd_rate}
