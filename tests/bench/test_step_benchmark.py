"""`hytrec benchmark step` at a tiny size: every row present, and its derived figures
consistent (bytes per event, achieved bandwidth, fraction of the roofline). No timing is
asserted: the machine is shared."""

from __future__ import annotations

import json
import math

import pytest

from hytrec.bench.step_benchmark import QUICK, kernel_bytes_per_event, run_step_benchmark
from hytrec.model.hytrec import HyTRec, HyTRecConfig


def test_an_event_moves_the_state_twice_per_run_and_its_inputs_once():
    # H=2, dk=dv=16: the state is 2*16*16*4 = 2,048 B, read and written back; q, k, v, o
    # and three gates are 2 * (4*16 + 3) * 4 = 536 B
    assert kernel_bytes_per_event(2, 16, 1) == 2 * 2048 + 536
    assert kernel_bytes_per_event(2, 16, 4) == 2 * 2048 // 4 + 536


def test_the_step_benchmark_writes_a_row_per_size_with_consistent_figures(tmp_path):
    report = run_step_benchmark(QUICK, tmp_path / "step-cpu")
    written = json.loads((tmp_path / "step-cpu.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["command"].startswith("hytrec benchmark step --users 1,8")
    peak = written["copy_bandwidth_gb_s"]
    assert math.isfinite(peak) and peak > 0
    rows = written["rows"]
    kernel = [r for r in rows if r["level"] == "kernel"]
    model = [r for r in rows if r["level"] == "model"]
    assert len(kernel) == len(QUICK.users) * len(QUICK.head_dims)
    assert [r["users"] for r in model] == list(QUICK.users)
    state = HyTRec(HyTRecConfig(d_model=QUICK.d_model)).state_bytes_per_user()
    for r in rows:
        assert math.isfinite(r["events_per_s"]) and r["events_per_s"] > 0, r
        assert r["achieved_gb_s"] == pytest.approx(
            r["events_per_s"] * r["bytes_per_event"] / 1e9, rel=1e-3
        )
        assert r["roofline_fraction"] == pytest.approx(r["achieved_gb_s"] / peak, rel=2e-3)
    for r in kernel:
        assert r["bytes_per_event"] == kernel_bytes_per_event(QUICK.heads, r["head_dim"], 1)
    for r in model:
        assert r["bytes_per_event"] == 2 * state and r["state_bytes_per_user"] == state
    assert (tmp_path / "step-cpu.png").stat().st_size > 0
