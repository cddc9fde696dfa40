"""core/tracing.py without a database: importing core never needs (nor imports) opentelemetry; without the package,
or with DP_TRACING=off, every entry point answers None and the in-memory processor works as before; the stored
form of a context; the trace_parent option."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from core import tracing
from core.config import RUN_KNOBS, trace_parent_value
from tests.support import ROOT

# A meta path finder that refuses opentelemetry, as if the package were not installed.
HIDE_OPENTELEMETRY = textwrap.dedent("""
    import sys

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
""")

WITHOUT_THE_PACKAGE = HIDE_OPENTELEMETRY + textwrap.dedent("""
    import core
    from core import DistributedProcessor, tracing
    from core.testing import InMemoryProcessor

    assert not tracing.available()
    assert tracing.sending("q", 1) is None
    assert tracing.traced_handler(print, is_async=False, trace_parent="link", instance_id="x") is None
    p = InMemoryProcessor()
    ids = p.add_records([{"n": 1}, {"n": 2}])
    seen = []
    summary = p.run(lambda r: seen.append(r.trace_context), stop_when_empty=True, handle_signals=False,
                    trace_parent="child")
    assert summary.processed == 2 and seen == [None, None], (summary, seen)
    assert not any(m == "opentelemetry" or m.startswith("opentelemetry.") for m in sys.modules)
    print("ok")
""")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_core_imports_and_works_without_opentelemetry() -> None:
    result = _python(WITHOUT_THE_PACKAGE)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_importing_core_does_not_import_opentelemetry() -> None:
    result = _python("import sys, core, core.processor, core.aio, core.worker\n"
                     "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_dp_tracing_off_behaves_as_if_the_package_were_absent() -> None:
    pytest.importorskip("opentelemetry.sdk")
    code = textwrap.dedent("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        from core import tracing
        print(tracing.available(), tracing.sending("q", 1),
              tracing.traced_handler(print, is_async=False, trace_parent="link", instance_id="x"))
    """)
    assert _python(code, DP_TRACING="off").stdout.split() == ["False", "None", "None"]
    assert _python(code, DP_TRACING="").stdout.split()[0] == "True"


def test_the_stored_form_is_the_traceparent_then_the_tracestate() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.encode({"traceparent": parent}) == parent
    assert tracing.encode({"traceparent": parent, "tracestate": ""}) == parent
    assert tracing.encode({"traceparent": parent, "tracestate": "a=1,b=x y"}) == f"{parent} a=1,b=x y"
    assert tracing.encode({}) is None
    assert tracing.decode(f"{parent} a=1,b=x y") == {"traceparent": parent, "tracestate": "a=1,b=x y"}
    assert tracing.decode(parent) == {"traceparent": parent}


def test_trace_parent_is_link_or_child_on_run_and_the_cli() -> None:
    assert RUN_KNOBS["trace_parent"].default == "link" and RUN_KNOBS["trace_parent"].env == "DP_TRACE_PARENT"
    assert [trace_parent_value(v) for v in ("link", "child")] == ["link", "child"]
    with pytest.raises(ValueError, match="trace_parent must be one of link, child"):
        trace_parent_value("parent")
    from core.cli import build_parser

    assert build_parser().parse_args(["run", "--trace-parent", "child"]).trace_parent == "child"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--trace-parent", "sibling"])
