"""The main job end to end on synthetic events, small enough for CI: it trains, streams
through a real broker and a worker process, reports, and leaves no process behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.train import TrainConfig
from hytrec.stream.demo import DemoConfig, run_demo

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_demo_runs_end_to_end_and_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYTREC_CACHE", str(tmp_path / "cache"))
    config = DemoConfig(
        dataset="synthetic",
        model=HyTRecConfig(d_model=16, long_layers=2, softmax_every=2, dropout=0),
        train=TrainConfig(epochs=2, patience=1, valid_users=50),
        train_seconds=20,
        heldout_seconds=3,
        device="cpu",
        output=tmp_path / "run",
    )
    before = set(children(os.getpid()))
    summary = run_demo(config)
    assert set(children(os.getpid())) <= before, "the demo left a process running"

    assert summary["events_in"] == summary["history_events"] + summary["heldout_events"]
    assert summary["recommendations_out"] >= summary["users"]
    assert summary["latency_ms"]["recommendations"] > 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    quality = summary["quality"]
    assert quality["scored_events"] > 0.9 * summary["heldout_events"]
    assert 0 <= quality["hytrec_hit@20"] <= 1
    assert len(summary["sample_users"]) == 3
    assert all(user["recommended"] for user in summary["sample_users"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["events_in"] == summary["events_in"]
    assert (tmp_path / "run" / "demo.png").stat().st_size > 0
    assert "next-event hit@20" in capsys.readouterr().out

    # a second run reuses the trained checkpoint
    assert run_demo(config)["checkpoint_reused"]
