"""The short benchmark run (`python -m bench --quick`): ratios only, with margins wide enough not to flake,
narrow enough that a regression halving throughput fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--no-plot"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    rows = json.loads(Path(out).read_text())["rows"]
    return {(r["suite"], r["case"]): r for r in rows}


def test_drain_through_run_keeps_a_fair_share_of_the_raw_loop(results: dict[Any, Any]) -> None:
    row = results[("drain", "W=2 run()")]
    assert row["ratio"] > 0.3, row  # measured about 0.55-0.6 on 2 cores; the target (0.85) is tracked by bench


def test_enqueue_of_10000_record_batches_against_raw_copy(results: dict[Any, Any]) -> None:
    assert results[("enqueue", "batches of 10,000")]["ratio"] > 0.3


def test_idle_notify_latency(results: dict[Any, Any]) -> None:
    assert results[("latency", "idle worker (NOTIFY) p50")]["value"] < 25
    assert results[("latency", "idle worker (NOTIFY) p99")]["value"] < 100


def test_claim_rate_does_not_fall_with_finished_rows(results: dict[Any, Any]) -> None:
    row = results[("table", "claim rate, 200,000 finished rows")]
    assert row["ratio"] > 0.6, row
    assert results[("table", "health_check(), 200,000 finished rows")]["value"] < 100


def test_many_ordering_keys_cost_little(results: dict[Any, Any]) -> None:
    assert results[("keys", "10,000 ordering keys")]["ratio"] > 0.35


def test_worker_memory_is_bounded_and_flat(results: dict[Any, Any]) -> None:
    assert results[("memory", "worker RSS peak over 50,000 records")]["value"] < 100
    assert results[("memory", "growth from warm-up to the end")]["value"] < 20
