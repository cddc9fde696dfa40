"""The layout rules of core/: no import cycle, no module over about 400 lines, SQL only in named statements."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from core import DistributedProcessor
from core.api import ProcessorAPI

CORE = Path(__file__).resolve().parents[2] / "core"
MAX_LINES = 400
# Files whose job is SQL text: the loader of the named statements, the schema's trigger DDL.
SQL_FILES = {"queries.py", "schema.py"}
# Statements, as SQL is written here (upper case). LISTEN is not among them: its channel is an identifier,
# composed with psycopg.sql.Identifier where it is used.
_SQL_LITERAL = re.compile(r"^\s*(SELECT|INSERT INTO|UPDATE|DELETE FROM|WITH|COPY|SET)\s")


def _module_name(path: Path) -> str:
    rel = path.relative_to(CORE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every core module ``path`` imports, wherever the import stands (function bodies and TYPE_CHECKING
    blocks included: a cycle hidden behind a lazy import is still a cycle in the design)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            # "from core import embedded" names a module; "from core import DistributedProcessor" the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_core_modules() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, known) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    # The checker itself must be able to fail: a two-module and a three-module cycle.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": set()}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_about_400_lines(name: str) -> None:
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


@pytest.mark.parametrize("name", sorted(n for n, p in _modules().items() if p.name not in SQL_FILES))
def test_sql_lives_in_named_statements(name: str) -> None:
    tree = ast.parse(_modules()[name].read_text(encoding="utf-8"))
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [s for s in literals if _SQL_LITERAL.match(s)] == []


def test_the_facade_adds_only_database_methods_to_the_shared_api() -> None:
    own = {n for n, v in vars(DistributedProcessor).items() if callable(v) or isinstance(v, property)}
    shared = {n for n in dir(ProcessorAPI) if not n.startswith("__")}
    assert own - shared == {"__init__", "__repr__", "dsn", "q", "_pool", "connection", "complete_on", "migrate"}
    for name in sorted(shared & own):
        assert inspect.signature(getattr(DistributedProcessor, name)) == inspect.signature(
            getattr(ProcessorAPI, name)), name
