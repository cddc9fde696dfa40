"""Named SQL statements, loaded once from ``sql/*.sql`` (one file per role) and bound to a schema.

Statements are composed with :mod:`psycopg.sql` so that the schema and table names are quoted identifiers;
every value stays a bound parameter.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

from psycopg import sql

TABLES = {
    "records": "processing_queue",
    "payloads": "processing_payload",
    "stats": "queue_stats",
    "key_limits": "key_concurrency",
    "queue_limits": "queue_limits",
    "instances": "processor_instances",
    "demo_ledger": "dproc_demo_ledger",
    "alembic_version": "alembic_version",
    "floor_events": "claim_floor_events",
    "shard_identity": "shard_identity",
    "shard_map": "shard_map",
    "shard_moves": "shard_moves",
    "shard_ids_function": "dp_set_shard_ids",  # functions, schema-qualified the same way
    "raise_ids_function": "dp_raise_ids",
    "add_records_function": "dp_add_records",
    "add_one_function": "dp_add_one",
    "enqueue_prepare_function": "dp_enqueue_prepare",
    "enqueue_finish_function": "dp_enqueue_finish",
    "key_checks_function": "dp_key_checks",
    "key_token_function": "dp_key_token",
    "fire_schedule_function": "dp_fire_schedule",
    "queue_state": "queue_state",
    "queue_rates": "queue_rates",
    "queue_controls": "queue_controls",
    "key_rates": "key_rates",
    "key_buckets": "key_buckets",
    "schedules": "schedules",
    "partition_function": "dp_partition_of",
    "channel_function": "dp_channel",
    "flow_templates": "flow_templates",
    "flow_runs": "flow_runs",
    "flow_edges": "flow_edges",
    "flow_records": "flow_records",
    "flow_settle_function": "dp_flow_settle",
    "flow_settle_take_function": "dp_flow_settle_take",
    "flow_parents_function": "dp_flow_parents",
    "start_flow_function": "dp_start_flow",
    "cancel_flow_function": "dp_cancel_flow",
    "flow_repair_function": "dp_flow_repair",
}

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@lru_cache(maxsize=1)
def raw_statements() -> dict[str, str]:
    """Return ``{name: sql_text}`` parsed from the packaged SQL files (a name is unique across them)."""
    out: dict[str, str] = {}
    folder = resources.files("core").joinpath("sql")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _NAME.split(entry.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=False):
            if name in out:
                raise ValueError(f"statement {name!r} is defined twice (sql/{entry.name})")
            # Comment lines and indentation go (no statement has a string literal spanning lines).
            lines = [ln.strip() for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
            out[name] = "\n".join(lines).strip().rstrip(";")
    return out


def channel_for(schema: str, queue: str) -> str:
    """The NOTIFY channel of a queue (an identifier of at most 63 bytes); the SQL function ``dp_channel`` names
    it the same way (the enqueue functions notify from the server)."""
    name = f"dproc:{schema}:{queue}"
    if len(name.encode()) > 63:
        name = "dproc:" + hashlib.sha256(f"{schema}:{queue}".encode()).hexdigest()[:40]
    return name


class Queries:
    """The statements bound to one schema: ``q.claim``, ``q.fail``, ... are ready-to-run query strings.

    The identifiers are quoted once, here: psycopg parses a plain string query once and caches the result,
    but re-renders and re-parses a ``sql.Composed`` on every execution (about 55 us of client CPU
    for the claim statement). Its cache also skips queries over 4 KB, hence the indentation is dropped.
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema
        idents = {key: sql.Identifier(schema, table) for key, table in TABLES.items()}
        self._statements: dict[str, str] = {
            name: sql.SQL(text).format(**idents).as_string(None)
            for name, text in raw_statements().items()
        }
        self.records_table = f"{sql.Identifier(schema).as_string()}.processing_queue"
        self._raw: dict[str, tuple[str, tuple[str, ...]]] = {}

    def raw(self, name: str) -> tuple[str, tuple[str, ...]]:
        """Statement ``name`` with PostgreSQL's own ``$n`` placeholders, and the parameter names in their
        order: run through a ``psycopg.RawCursor``, it is not parsed on the client at all (psycopg caches
        its parse of a ``%(name)s`` query only up to 4 KB)."""
        cached = self._raw.get(name)
        if cached is None:
            names: list[str] = []

            def number(m: re.Match[str]) -> str:
                if m.group(1) not in names:
                    names.append(m.group(1))
                return f"${names.index(m.group(1)) + 1}"

            text = _PLACEHOLDER.sub(number, self._statements[name]).replace("%%", "%")
            cached = self._raw[name] = (text, tuple(names))
        return cached

    def __getattr__(self, name: str) -> str:
        try:
            return self._statements[name]
        except KeyError:
            raise AttributeError(name) from None

    def names(self) -> list[str]:
        return sorted(self._statements)
