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


def test_a_sharded_processor_labels_each_shards_series() -> None:
    m = Metrics("worker-7", sharded=True)
    m.for_shard(0).completed(3)
    m.for_shard(2).completed(5)
    m.for_shard(2).observe_claim(0.001, 5)
    text = m.render().decode()
    assert 'dp_records_completed_total{instance_id="worker-7",shard="0"} 3.0' in text
    assert 'dp_records_completed_total{instance_id="worker-7",shard="2"} 5.0' in text
    assert 'dp_records_claimed_total{instance_id="worker-7",shard="2"} 5.0' in text
    plain = Metrics("worker-8")
    plain.completed(1)
    assert 'dp_records_completed_total{instance_id="worker-8"} 1.0' in plain.render().decode()  # unchanged
