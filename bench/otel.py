"""Suite ``otel`` (``python -m bench --only otel``): what the ``[otel]`` extra costs the W=2 drain.

* the extra installed (opentelemetry-api importable) and no SDK configured, against tracing unavailable
  (``DP_TRACING=off``: core/tracing.py behaves as if the package were not installed, and never imports it),
  same code, same records: target within noise (>= 0.95x). Alternated pairs (every other pair in the other
  order), medians; many short pairs, since a shared machine's load moves single runs by more than 5 %;
* the same pairs' worker CPU per record (both workers' process time from the start gun to the end of run(),
  over the records; the import of opentelemetry at run start included): less moved by other load than the
  wall clock; target <= 1.05x;
* for information, no target: the same drain with an SDK tracer provider configured in the workers (no span
  processor, so nothing exported: the cost of a ``process`` span per record itself).

The records are added by ``add_records`` without a span, so they carry no trace context in any case.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from functools import partial
from typing import Any

from bench.baseline import ROOT

OFF = {"DP_TRACING": "off", "DPB_OTEL_SDK": ""}
NO_SDK = {"DP_TRACING": "", "DPB_OTEL_SDK": ""}
SDK = {"DP_TRACING": "", "DPB_OTEL_SDK": "1"}

PROBE = ("import json; from core import tracing; import bench.workers as w; w.configure_tracing();"
         " print(json.dumps({'available': tracing.available(),"
         " 'wraps': tracing.traced_handler(print, is_async=False, trace_parent='link', instance_id='x') is not None}))")


def probe(env: dict[str, str]) -> dict[str, Any]:
    """What a worker process sees under ``env``: whether tracing is available, whether run() would wrap."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(bench: Any) -> None:
    from bench.runner import Row

    n = 20_000 if bench.quick else 50_000
    pairs = 3 if bench.quick else 11
    seen = {name: probe(env) for name, env in (("off", OFF), ("no_sdk", NO_SDK), ("sdk", SDK))}
    if not seen["no_sdk"]["available"]:
        print("otel: opentelemetry-api is not installed (pip install -e '.[otel]'): nothing to compare")
        return
    assert seen == {"off": {"available": False, "wraps": False}, "no_sdk": {"available": True, "wraps": False},
                    "sdk": {"available": True, "wraps": True}}, seen

    cpu: dict[str, list[float]] = {"installed": [], "off": [], "sdk": []}

    def drain(env: dict[str, str], name: str) -> float:
        bench.fill_pending(n)
        out = bench.drain_procs("ours", 2, 100, env=env)
        cpu[name].append(sum(out["cpu_run"]) / out["done"] * 1e6)  # workers' CPU in run(), us per record
        return float(out["rate"])

    print(f"otel: W=2 drain of {n:,} records, the [otel] extra installed and no SDK vs tracing unavailable")
    installed, off = bench._alternate(pairs, partial(drain, NO_SDK, "installed"), partial(drain, OFF, "off"),
                                      swap=True)
    i, o = statistics.median(installed), statistics.median(off)
    bench.add(Row("otel", "W=2 drain, extra installed, no SDK", i, "rec/s", o, "DP_TRACING=off (as if absent)",
                  target="within noise (>= 0.95x)", met=i / o >= 0.95,
                  extra={"installed_runs": installed, "off_runs": off, "n": n, "pairs": pairs, "probes": seen}))
    ci, co = statistics.median(cpu["installed"]), statistics.median(cpu["off"])
    bench.add(Row("otel", "worker CPU per record, extra installed, no SDK", ci, "us", co,
                  "DP_TRACING=off (as if absent)", target="<= 1.05x", met=ci / co <= 1.05,
                  extra={"installed_runs": cpu["installed"], "off_runs": cpu["off"]}))
    print("otel: W=2 drain with an SDK provider in the workers (a process span per record, none exported)")
    traced = [drain(SDK, "sdk") for _ in range(1 if bench.quick else 3)]
    t = statistics.median(traced)
    bench.add(Row("otel", "W=2 drain, SDK configured (no exporter)", t, "rec/s", o, "DP_TRACING=off (as if absent)",
                  extra={"sdk_runs": traced, "n": n}))
    bench.add(Row("otel", "worker CPU per record, SDK configured", statistics.median(cpu["sdk"]), "us", co,
                  "DP_TRACING=off (as if absent)", extra={"sdk_runs": cpu["sdk"]}))
