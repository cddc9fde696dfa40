"""Metric names and labels as a Prometheus server scrapes them."""

from __future__ import annotations

from core.metrics import Metrics


def test_the_worker_label_is_ours_and_there_are_no_created_series() -> None:
    m = Metrics("worker-7")
    m.observe_claim(0.003, 100)
    m.completed(100)
    m.observe_handlers([0.001, 0.002])
    text = m.render().decode()
    assert 'dp_records_completed_total{instance_id="worker-7"} 100.0' in text
    assert 'instance="' not in text  # Prometheus adds its own `instance` label to every scraped series
    assert "_created" not in text
    assert 'dp_handler_seconds_count{instance_id="worker-7"} 2.0' in text
