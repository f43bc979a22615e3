"""`hytrec benchmark backfill` at a tiny size: a real broker and worker process, both ways
of building the states, and a JSON where every state agrees (no timing is asserted: the
machine is shared)."""

from __future__ import annotations

import json
import math

import pytest

from hytrec.bench.backfill_benchmark import BackfillBenchConfig, run_benchmark

pytestmark = pytest.mark.integration


def test_the_backfill_benchmark_writes_every_figure_and_the_states_agree(tmp_path, capsys):
    config = BackfillBenchConfig(
        dataset="synthetic", events=400, d_model=16, worker_timeout_s=120.0, output=tmp_path
    )
    result_path = tmp_path / "results" / "backfill-cpu.json"
    returned = run_benchmark(config, result_path, command="pytest")

    written = json.loads(result_path.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["command"] == "pytest" and written["config"]["events"] == 400
    for key in ("stream_events_per_s", "backfill_events_per_s", "speedup"):
        assert math.isfinite(written[key]) and written[key] > 0, key
    users = written["config"]["users"]
    assert written["users_compared"] == written["backfill_users_written"] == users > 0
    assert written["states_equal"] == written["applied_offsets_equal"] == users
    assert written["vector_max_abs_diff"] <= 1e-4 and not written["users_missing"]
    assert result_path.with_suffix(".png").stat().st_size > 0
    assert "speedup" in capsys.readouterr().out
