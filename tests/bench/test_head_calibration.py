"""`hytrec benchmark head-calibration` on synthetic events with an untrained SASRec + head:
the event sets against a brute force, recency-frequency against the demo's plain-Python
rule, and the report's own consistency (the gate shifts: tests/model/test_calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hytrec.bench.demo import load_events, recency_frequency, time_cut
from hytrec.bench.head_calibration import (
    HeadCalibrationConfig,
    event_sets,
    run_head_calibration,
)
from hytrec.model.evaluate import history_batch, ranking_scores
from hytrec.model.registry import build_model, load_model
from hytrec.model.repeat import RepeatConfig
from hytrec.model.sasrec import SASRecConfig

K = 30  # more than the 20 events the SASRec reads: own items beyond them enter the list


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    events, _ = load_events("synthetic")
    torch.manual_seed(0)
    config = SASRecConfig(d_model=16, layers=1, heads=1, max_len=20, repeat_head=RepeatConfig())
    directory = tmp_path_factory.mktemp("ckpt")
    build_model(config, events).save(directory)
    cfg = HeadCalibrationConfig(
        checkpoint=str(directory),
        dataset="synthetic",
        top_k=K,
        held_out_events=40,  # of the 70 after the cut: a sample
        gate_shifts=(0.0, 50.0),
        batch=64,
    )
    return events, cfg


def test_the_event_sets_are_the_held_out_sample_and_each_users_last_event_before_the_cut(setup):
    events, cfg = setup
    sets = event_sets(events, cfg)
    cut = time_cut(events, cfg.heldout_fraction)
    assert len(sets["held_out"]) == 40 and len(set(sets["held_out"])) == 40
    for row in sets["held_out"]:
        assert events.ts[row] >= cut and row > 0 and events.user[row - 1] == events.user[row]
    want = []
    for user in np.unique(events.user):
        rows = [r for r in np.nonzero(events.user == user)[0] if events.ts[r] < cut]
        if len(rows) >= 2:
            want.append(rows[-1])
    assert sorted(sets["in_period"].tolist()) == sorted(want)


def test_the_report_against_recomputation(setup, tmp_path):
    events, cfg = setup
    report = run_head_calibration(cfg, str(tmp_path / "calib"))
    written = json.loads((tmp_path / "calib.json").read_text())
    assert (tmp_path / "calib.png").stat().st_size > 0
    assert written["config"]["gate_shifts"] == [0.0, 50.0]
    first = np.searchsorted(events.user, events.user, side="left")
    model = load_model(cfg.checkpoint).eval()
    for name, rows in event_sets(events, cfg).items():
        part = report[name]
        assert written[name] == part and part["events"] == len(rows)
        # recency-frequency: the demo's plain-Python rule over the same histories
        hits = 0
        for row in rows:
            past = events.item[first[row] : row].tolist()
            hits += int(events.item[row]) in recency_frequency(past, K)
        assert part[f"recency_frequency_hit@{K}"] == pytest.approx(hits / len(rows))
        assert part[f"hit@{K}_by_gate_shift"]["0.0"] == part[f"model_hit@{K}"]
        # the model's list kept to the user's items: every earlier item of the user, also
        # those before the 20 events this SASRec reads
        own_hits = 0
        for row in rows:
            begin = max(first[row], row - 20)
            with torch.no_grad():
                one = history_batch(events, np.array([begin]), np.array([row]))
                scores = ranking_scores(model, one)[0]
            mine = set(events.item[first[row] : row].tolist())
            ranked = [i for i in scores.argsort(descending=True).tolist() if i in mine][:K]
            own_hits += int(events.item[row]) in ranked
        assert part[f"model_own_items_only_hit@{K}"] == pytest.approx(own_hits / len(rows))
        share = part["own_items_share_of_list"]
        for key, none_at in (("own_items_mean_p", 0), ("other_items_mean_p", 1)):
            assert (part[key] is None) == (share == none_at)  # no such item in any list
            assert part[key] is None or 0 < part[key] < 1


def test_a_model_without_the_head_is_refused(tmp_path):
    events, _ = load_events("synthetic")
    build_model(SASRecConfig(d_model=16, layers=1, heads=1, max_len=20), events).save(tmp_path)
    with pytest.raises(ValueError, match="no repeat head"):
        run_head_calibration(HeadCalibrationConfig(checkpoint=str(tmp_path), dataset="synthetic"))


def test_the_command_line_runs_it_and_prints_both_sets(setup, tmp_path, capsys):
    from hytrec import cli

    _, cfg = setup
    argv = ["benchmark", "head-calibration", "--checkpoint", cfg.checkpoint, "--dataset",
            "synthetic", "--top-k", "30", "--held-out-events", "20", "--gate-shifts", "0,2",
            "--output", str(tmp_path / "c")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "in_period (" in out and "held_out (20 events)" in out
    assert json.loads((tmp_path / "c.json").read_text())["config"]["gate_shifts"] == [0.0, 2.0]
