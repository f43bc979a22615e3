"""`hytrec benchmark stream` at a tiny size: a real broker and worker process, and a JSON
with every figure present, positive and finite (no timing is asserted: the machine is shared)."""

from __future__ import annotations

import json
import math

import pytest

from hytrec.bench.stream_benchmark import StreamBenchConfig, run_benchmark

pytestmark = pytest.mark.integration

FIGURES = (
    "raw_consume_events_per_s",
    "engine_events_per_s",
    "ratio",
    "plumbing_events_per_s",
    "plumbing_ratio",
    "engine_only_events_per_s",
    "latency_ms_p50",
    "latency_ms_p99",
)


def test_the_stream_benchmark_writes_every_figure(tmp_path, capsys):
    config = StreamBenchConfig(
        dataset="synthetic",
        events=300,
        paced_events=100,
        rate=200.0,
        d_model=16,
        top_k=5,
        worker_timeout_s=120.0,
        output=tmp_path / "run",
    )
    result_path = tmp_path / "results" / "stream-cpu.json"
    returned = run_benchmark(config, result_path, command="pytest")

    written = json.loads(result_path.read_text())
    assert written == json.loads(json.dumps(returned))
    for key in ("device", "command", "date", "git_commit", "config", "machine"):
        assert key in written, key
    assert written["command"] == "pytest"
    assert written["config"]["events"] == 300
    assert "untrained" in written["config"]["model"]
    for key in FIGURES:
        value = written[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert written["latency_ms_p99"] >= written["latency_ms_p50"]
    assert written["latency_recommendations"] > 0
    assert result_path.with_suffix(".png").stat().st_size > 0
    assert "ratio" in capsys.readouterr().out
