"""Command-line interface (``dproc`` / ``python -m core``)."""

from __future__ import annotations

import argparse
import os
import sys

from core.dsn import redact


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dproc", description="distributed-processor command line")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL DSN (env DATABASE_URL)")
    parser.add_argument("--schema", default=os.environ.get("DP_SCHEMA", "public"),
                        help="PostgreSQL schema of the tables (env DP_SCHEMA, default public)")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("DP_DEBUG") == "1",
                        help="show tracebacks on errors (env DP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="bring the database schema to the latest migration")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            from core.migrate import upgrade

            if not args.dsn:
                parser.error("no database: pass --dsn or set DATABASE_URL")
            upgrade(args.dsn, args.schema)
            print(f"migrated {redact(args.dsn)} (schema {args.schema}) to head")
            return 0
    except Exception as exc:
        if args.debug:
            raise
        print(f"dproc {args.command}: error: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 2
