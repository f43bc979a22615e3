"""`hytrec benchmark state-store` at a tiny size: more users than the device slots and the
host budget hold, so every tier is used; every figure present and sane (no timing is
asserted: the machine is shared)."""

from __future__ import annotations

import json
import math

from hytrec.bench.state_store_benchmark import StateStoreBenchConfig, run_benchmark


def test_the_state_store_benchmark_uses_every_tier(tmp_path, capsys):
    config = StateStoreBenchConfig(
        users=3_000,
        host_budget_mib=8.0,  # ~190 users of 42.5 KB
        device_budget_mib=4.0,  # ~95 slots
        events=512,
        latency_ops=50,
        output=tmp_path / "run",
    )
    result_path = tmp_path / "results" / "state-store-cpu.json"
    returned = run_benchmark(config, result_path, command="pytest")

    written = json.loads(result_path.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["bytes_per_user"] == 42_544  # HyTRecConfig's default state
    assert written["device_slots"] == 98 and written["host_users"] == 197
    assert written["users_on_disk"] > 2_000 and written["disk_bytes"] > 2_000 * 42_544
    for tier in ("device", "host", "disk"):
        for op in ("write", "read"):
            q = written["latency"][tier][op]
            assert 0 < q["p50_us"] <= q["p99_us"] and math.isfinite(q["p99_us"]), (tier, op)
    assert [p["hot_share"] for p in written["phases"]] == [0.01, 0.1, 0.5]
    for phase in written["phases"]:
        assert phase["events_per_s"] > 0 and phase["events"] == 512
    assert written["phases"][-1]["disk_reads"] > 0  # 1,500 hot users: most come from disk
    assert not (tmp_path / "run" / "states").exists() or not any(
        (tmp_path / "run" / "states").iterdir()
    )  # the engine closed its disk tier
    assert result_path.with_suffix(".png").stat().st_size > 0
    assert "hot set" in capsys.readouterr().out
