"""Prometheus metrics of the worker (hytrec/stream/metrics.py) and `hytrec status`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from types import SimpleNamespace
from typing import NamedTuple

import pytest
from kafka import KafkaProducer
from test_stream_support import REPO, start_worker, stop_worker, wait_for

from hytrec.stream.accounting import PartitionAccount
from hytrec.stream.broker import EmbeddedBroker
from hytrec.stream.metrics import (
    StreamMetrics,
    format_status,
    histogram_quantile,
    parse_metrics,
    summarize,
)
from hytrec.stream.publishing import WorkerStats
from hytrec.stream.schemas import REASONS, EngineResult, Recommendation, encode_behavior

TS = 1511544000


class TP(NamedTuple):
    topic: str
    partition: int


class FakeConsumer:
    def __init__(self):
        self._committed_offset = {TP("behaviors", 0): 10, TP("behaviors", 1): None}
        self._read_offset = {TP("behaviors", 1): 4}
        self.high = {TP("behaviors", 0): 15, TP("behaviors", 1): 5}

    def assignment(self):
        return set(self.high)

    def highwater(self, tp):
        return self.high[tp]


def rec(user: str, received_at: float, produced_at: float) -> Recommendation:
    return Recommendation(
        user_id=user,
        items=["a"],
        scores=[1.0],
        model_version="m-1",
        source_partition=0,
        source_offset=1,
        event_ts=TS,
        received_at=received_at,
        produced_at=produced_at,
    )


def fake_worker():
    engine = SimpleNamespace(
        model_version="m-1",
        stats=SimpleNamespace(step_seconds=0.0, search_seconds=0.0),
        store=SimpleNamespace(
            slot_of={"u1": 0, "u2": 1, "u3": 2}, num_slots=8, evicted={"u0": None}, evictions=5
        ),
    )
    stats = WorkerStats(recommendations_out=2, batches=1)
    account = stats.accounting.partitions
    account[0] = PartitionAccount(consumed=8, applied=5, dead_lettered=2, replays_skipped=1)
    account[3] = PartitionAccount(consumed=4, applied=2, dead_lettered=1, in_flight=1)
    stats.checkpoints, stats.snapshots_written, stats.snapshot_bytes = 2, 7, 700
    stats.checkpoint_seconds, stats.users_restored, stats.log_resets = 0.5, 4, 1
    stats.rejected.update({"invalid_json": 2, "out_of_order": 1})
    return SimpleNamespace(stats=stats, engine=engine, app=SimpleNamespace(consumer=FakeConsumer()))


def fed_metrics() -> StreamMetrics:
    worker = fake_worker()
    metrics = StreamMetrics(worker)
    worker.engine.stats.step_seconds, worker.engine.stats.search_seconds = 0.004, 0.002
    result = EngineResult(
        recommendations=[rec("u1", 100.0, 100.02), rec("u2", 100.0, 100.3)],
        rejected=[],
    )
    metrics.observe_batch(result, batch_size=12, engine_s=0.01, publish_s=0.003)
    worker.engine.stats.step_seconds, worker.engine.stats.search_seconds = 0.010, 0.003
    metrics.observe_batch(EngineResult([rec("u3", 5.0, 5.007)], []), 3, 0.008, 0.002)
    return metrics


def samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_exposition_has_the_counters_gauges_and_histograms():
    metrics = fed_metrics()
    text = metrics.exposition().decode()
    got = samples(text)
    assert got["hytrec_events_in_total"] == 12
    assert got["hytrec_events_applied_total"] == 7
    assert got['hytrec_partition_events_total{outcome="consumed",partition="0"}'] == 8
    assert got['hytrec_partition_events_total{outcome="dead_lettered",partition="3"}'] == 1
    assert got['hytrec_partition_events_total{outcome="unaccounted",partition="3"}'] == 0
    assert got['hytrec_partition_events_in_flight{partition="3"}'] == 1
    assert got["hytrec_recommendations_out_total"] == 2
    assert got["hytrec_batches_total"] == 1
    assert got["hytrec_duplicates_skipped_total"] == 1
    assert got['hytrec_dlq_messages_total{reason="invalid_json"}'] == 2
    assert got['hytrec_dlq_messages_total{reason="out_of_order"}'] == 1
    for reason in REASONS:  # every reason is a series, so a dashboard sees it from 0
        assert f'hytrec_dlq_messages_total{{reason="{reason}"}}' in got
    assert got['hytrec_model_info{model_version="m-1"}'] == 1
    assert got["hytrec_state_slots_used"] == 3
    assert got["hytrec_state_slots_capacity"] == 8
    assert got["hytrec_state_users_offloaded"] == 1
    assert got["hytrec_state_evictions_total"] == 5
    # committed offset where there is one, else the next offset to read
    assert got['hytrec_consumer_lag{partition="0",topic="behaviors"}'] == 5
    assert got['hytrec_consumer_lag{partition="1",topic="behaviors"}'] == 0
    assert got["hytrec_batch_size_count"] == 2 and got["hytrec_batch_size_sum"] == 15
    assert got['hytrec_batch_size_bucket{le="4.0"}'] == 1
    assert got["hytrec_event_to_recommendation_seconds_count"] == 3
    assert got['hytrec_event_to_recommendation_seconds_bucket{le="0.01"}'] == 1
    assert got['hytrec_event_to_recommendation_seconds_bucket{le="0.025"}'] == 2
    assert got["hytrec_engine_step_seconds_count"] == 2
    assert got["hytrec_engine_step_seconds_sum"] == pytest.approx(0.010)
    assert got["hytrec_index_search_seconds_sum"] == pytest.approx(0.003)
    assert got["hytrec_batch_publish_seconds_sum"] == pytest.approx(0.005)
    assert got["hytrec_batch_engine_seconds_count"] == 2
    assert got["hytrec_checkpoints_total"] == 2
    assert got["hytrec_snapshots_written_total"] == 7
    assert got["hytrec_snapshot_bytes_total"] == 700
    assert got["hytrec_checkpoint_seconds_total"] == 0.5
    assert got["hytrec_users_restored_total"] == 4
    assert got["hytrec_log_resets_total"] == 1


def test_each_metrics_object_has_its_own_registry():
    a, b = StreamMetrics(fake_worker()), StreamMetrics(fake_worker())
    assert a.registry is not b.registry
    a.observe_batch(EngineResult([], []), batch_size=4)
    assert samples(b.exposition().decode())["hytrec_batch_size_count"] == 0


def test_an_engine_without_stats_or_store_still_exposes_the_worker_counters():
    stats = WorkerStats()
    stats.accounting.partitions[0] = PartitionAccount(consumed=3, in_flight=3)
    worker = SimpleNamespace(stats=stats, engine=object(), app=None)
    metrics = StreamMetrics(worker)
    metrics.observe_batch(EngineResult([rec("u", 1.0, 1.5)], []), 3, 0.1, 0.1)
    got = samples(metrics.exposition().decode())
    assert got["hytrec_events_in_total"] == 3
    assert got["hytrec_engine_step_seconds_count"] == 0
    assert "hytrec_state_slots_used" not in got


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * 9 / 10)
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0


KNOWN = """\
# HELP hytrec_events_in_total Behaviour messages consumed
# TYPE hytrec_events_in_total counter
hytrec_events_in_total 1000.0
# TYPE hytrec_recommendations_out_total counter
hytrec_recommendations_out_total 800.0
# TYPE hytrec_batches_total counter
hytrec_batches_total 10.0
# TYPE hytrec_checkpoints_total counter
hytrec_checkpoints_total 4.0
# TYPE hytrec_snapshots_written_total counter
hytrec_snapshots_written_total 900.0
# TYPE hytrec_snapshot_bytes_total counter
hytrec_snapshot_bytes_total 38000000.0
# TYPE hytrec_model_swaps_total counter
hytrec_model_swaps_total 1.0
# TYPE hytrec_duplicates_skipped_total counter
hytrec_duplicates_skipped_total 4.0
# TYPE hytrec_dlq_messages_total counter
hytrec_dlq_messages_total{reason="invalid_json"} 3.0
hytrec_dlq_messages_total{reason="out_of_order"} 7.0
hytrec_dlq_messages_total{reason="too_deep"} 0.0
# TYPE hytrec_partition_events_total counter
hytrec_partition_events_total{outcome="consumed",partition="0"} 600.0
hytrec_partition_events_total{outcome="applied",partition="0"} 580.0
hytrec_partition_events_total{outcome="dead_lettered",partition="0"} 6.0
hytrec_partition_events_total{outcome="replays_skipped",partition="0"} 4.0
hytrec_partition_events_total{outcome="unaccounted",partition="0"} 0.0
hytrec_partition_events_total{outcome="consumed",partition="1"} 400.0
hytrec_partition_events_total{outcome="applied",partition="1"} 396.0
hytrec_partition_events_total{outcome="dead_lettered",partition="1"} 4.0
hytrec_partition_events_total{outcome="replays_skipped",partition="1"} 0.0
hytrec_partition_events_total{outcome="unaccounted",partition="1"} 0.0
# TYPE hytrec_partition_events_in_flight gauge
hytrec_partition_events_in_flight{partition="0"} 10.0
hytrec_partition_events_in_flight{partition="1"} 0.0
# TYPE hytrec_model_info gauge
hytrec_model_info{model_version="hytrec-abc"} 1.0
# TYPE hytrec_state_slots_used gauge
hytrec_state_slots_used 600.0
# TYPE hytrec_state_slots_capacity gauge
hytrec_state_slots_capacity 6300.0
# TYPE hytrec_state_users_offloaded gauge
hytrec_state_users_offloaded 0.0
# TYPE hytrec_state_evictions_total counter
hytrec_state_evictions_total 0.0
# TYPE hytrec_consumer_lag gauge
hytrec_consumer_lag{partition="0",topic="behaviors"} 12.0
hytrec_consumer_lag{partition="1",topic="behaviors"} 0.0
# TYPE hytrec_batch_size histogram
hytrec_batch_size_bucket{le="64.0"} 2.0
hytrec_batch_size_bucket{le="128.0"} 10.0
hytrec_batch_size_bucket{le="+Inf"} 10.0
hytrec_batch_size_count 10.0
hytrec_batch_size_sum 1000.0
# TYPE hytrec_event_to_recommendation_seconds histogram
hytrec_event_to_recommendation_seconds_bucket{le="0.01"} 400.0
hytrec_event_to_recommendation_seconds_bucket{le="0.05"} 800.0
hytrec_event_to_recommendation_seconds_bucket{le="+Inf"} 800.0
hytrec_event_to_recommendation_seconds_count 800.0
hytrec_event_to_recommendation_seconds_sum 12.0
"""


def test_status_summary_and_text_of_a_known_exposition():
    before = parse_metrics(KNOWN, at=10.0)
    before.events_in, before.recommendations_out = 600.0, 500.0
    sample = parse_metrics(KNOWN, at=12.0)
    summary = summarize(sample, before)
    assert summary["events_in"] == 1000 and summary["recommendations_out"] == 800
    assert summary["events_per_s"] == pytest.approx(200.0)
    assert summary["recommendations_per_s"] == pytest.approx(150.0)
    assert summary["dlq"] == {"invalid_json": 3, "out_of_order": 7} and summary["dlq_total"] == 10
    account = summary["accounting"]
    assert account["total"] == {
        "consumed": 1000,
        "applied": 976,
        "dead_lettered": 10,
        "replays_skipped": 4,
        "unaccounted": 0,
        "never_delivered": 0,
        "in_flight": 10,
    }
    assert account["balanced"] and account["partitions"]["1"]["applied"] == 396
    assert summary["mean_batch_size"] == 100.0
    assert summary["latency_s"]["p50"] == pytest.approx(0.01)
    assert summary["latency_s"]["p99"] == pytest.approx(0.01 + 0.04 * (792 - 400) / 400)
    assert summary["state"]["slots_used"] == 600 and summary["state"]["slots_capacity"] == 6300
    assert summary["lag"] == {"behaviors/0": 12, "behaviors/1": 0} and summary["lag_total"] == 12
    assert summary["model_version"] == "hytrec-abc"
    json.dumps(summary)  # what --json prints

    text = format_status(summary, "http://h:1/metrics")
    assert "(model hytrec-abc)" in text
    assert "events in            1,000  (200.0/s over 2.0 s)" in text
    assert "recommendations out  800  (150.0/s over 2.0 s)" in text
    assert "DLQ                  10  (invalid_json 3, out_of_order 7)" in text
    assert (
        "accounting           consumed 1,000 = applied 976 + dead-lettered 10 + replays "
        "skipped 4 + in flight 10; unaccounted 0\n" in text
    )
    assert "p50 10.0 ms, p99 49.2 ms" in text
    assert "600 / 6,300 used" in text
    assert "behaviors/0 12" in text
    assert "checkpoints          4  (900 snapshots, 38.0 MB, 0.0 s);" in text
    assert "model swaps 1, new logs -" in text

    alone = format_status(summarize(sample))  # one scrape: no rates
    assert "/s over" not in alone
    unbalanced = parse_metrics(KNOWN.replace('partition="1"} 396.0', 'partition="1"} 395.0'))
    assert not summarize(unbalanced)["accounting"]["balanced"]
    assert "NOT BALANCED" in format_status(summarize(unbalanced))
    assert "NEVER DELIVERED" not in text
    hole = 'hytrec_partition_events_total{outcome="never_delivered",partition="1"} 3.0\n'
    holed = parse_metrics(
        KNOWN.replace(
            "# TYPE hytrec_partition_events_in_flight",
            hole + "# TYPE hytrec_partition_events_in_flight",
        )
    )
    assert summarize(holed)["accounting"]["total"]["never_delivered"] == 3
    assert "3 OFFSETS NEVER DELIVERED" in format_status(summarize(holed))


# ---------------------------------------------------------------------- a real worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return samples(response.read().decode())
    except OSError:
        return None


@pytest.mark.integration
def test_worker_serves_metrics_and_hytrec_status_reads_them(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with EmbeddedBroker() as broker:
        worker = start_worker(
            broker.bootstrap, tmp_path, group="metrics", extra_args=["--web-port", str(port)]
        )
        try:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
            valid = 0
            for i in range(20):
                user = f"m{i % 3}"
                event = {
                    "user_id": user,
                    "item_id": f"i{i}",
                    "category_id": "c",
                    "behavior": "pv",
                    "ts": TS + i,
                }
                producer.send("behaviors", key=user.encode(), value=encode_behavior(event))
                valid += 1
            producer.send("behaviors", key=b"m0", value=b'{"user_id": "m0", "item_id": ')
            late = dict(event, user_id="m1", ts=TS - 100)  # the test engine refuses it
            producer.send("behaviors", key=b"m1", value=encode_behavior(late))
            producer.flush()
            producer.close()

            def counted():
                got = scrape(url)
                done = (
                    got
                    and got.get("hytrec_events_in_total") == valid + 2
                    and got.get('hytrec_dlq_messages_total{reason="out_of_order"}') == 1
                )
                return got if done else None

            try:
                got = wait_for(counted, 25, "the worker's metrics to count every event")
            finally:
                log = (tmp_path / "worker.log").read_text()
                print(f"last scrape: {scrape(url)}\nworker log tail:\n{log[-3000:]}")
            assert got['hytrec_dlq_messages_total{reason="invalid_json"}'] == 1, log[-2000:]
            assert got["hytrec_recommendations_out_total"] >= 3
            assert got["hytrec_batch_size_sum"] == valid + 2
            assert got['hytrec_model_info{model_version="last-items-1"}'] == 1
            assert got["hytrec_events_applied_total"] == valid
            assert got["hytrec_event_to_recommendation_seconds_count"] >= 3

            def run_status(*args):
                return subprocess.run(
                    [sys.executable, "-m", "hytrec.cli", "status", "--url", url, *args],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout

            text = run_status("--interval", "0.2")
            assert f"events in            {valid + 2}  (0.0/s over" in text, text
            assert "DLQ                  2  (invalid_json 1, out_of_order 1)" in text, text
            assert f"consumed {valid + 2} = applied {valid} + dead-lettered 2" in text, text
            assert "latency recv->rec" in text and "consumer lag" in text, text
            as_json = json.loads(run_status("--interval", "0", "--json"))
            assert as_json["events_in"] == valid + 2
            assert as_json["dlq"] == {"invalid_json": 1, "out_of_order": 1}
            assert as_json["accounting"]["balanced"]
            assert as_json["accounting"]["total"]["consumed"] == valid + 2
            assert set(as_json["lag"]) <= {f"behaviors/{p}" for p in range(4)}
        finally:
            stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
