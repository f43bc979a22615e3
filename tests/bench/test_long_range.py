"""`hytrec benchmark long-range` at tiny sizes: what each model reads, the rows, JSON and
PNG. No accuracy or timing assertions (a smoke run trains for two epochs)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hytrec.bench.long_range import QUICK, _inputs, _users, run_long_range
from hytrec.cli import main
from hytrec.model.synthetic import long_range_log


def test_a_window_shorter_than_the_distance_never_holds_the_key():
    keys = 4
    log = long_range_log(10, 30, keys=keys, fillers=20, seed=1)
    window, answers = _inputs(log, 20, torch.device("cpu"))
    assert window.item.shape == (10, 20) and (window.item > 2 * keys).all()  # fillers only
    whole, same = _inputs(log, None, torch.device("cpu"))
    assert whole.item.shape == (10, 30) and torch.equal(answers, same)
    assert torch.equal(whole.item[:, 0] + keys, answers)  # the key, 30 events back


def test_every_epoch_trains_on_new_users_and_the_test_users_are_others():
    """With a fixed training set a short-window model names each training answer from the
    user's fillers (loss near 0, test accuracy at chance): new users every epoch stop that."""
    device = torch.device("cpu")
    first, second, test = (
        _users(QUICK, 12, None, draw, device)[0].item for draw in [(0, 0), (0, 1), (1,)]
    )
    assert first.shape == second.shape == (QUICK.train_users, 12)
    assert test.shape == (QUICK.test_users, 12)
    fillers = [{tuple(row[1:].tolist()) for row in users} for users in (first, second, test)]
    assert (
        not fillers[0] & fillers[1] and not fillers[0] & fillers[2] and not fillers[1] & fillers[2]
    )
    again = _users(QUICK, 12, None, (0, 1), device)[0].item
    assert torch.equal(second, again)  # seeded


def test_run_writes_a_row_per_distance_and_model(tmp_path):
    report = run_long_range(QUICK, tmp_path / "lr", progress=False)
    rows = report["rows"]
    assert [(r["distance"], r["model"]) for r in rows] == [
        (d, m) for d in sorted(QUICK.distances) for m in QUICK.models()
    ]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["mean_rank"] >= 0 and r["event_cost_us"] > 0
        assert 1 <= r["epochs_run"] <= QUICK.epochs and len(r["loss_by_epoch"]) == r["epochs_run"]
        sasrec = r["model"].startswith("SASRec")
        assert r["reads"] == (f"last {QUICK.sasrec_max_len} events" if sasrec else "whole history")
        longer = [t["distance"] for t in r["tested_longer"]]
        assert longer == [d for d in sorted(QUICK.test_distances) if d > r["distance"]] == [20]
        assert all(0.0 <= t["accuracy"] <= 1.0 for t in r["tested_longer"])
    written = json.loads((tmp_path / "lr.json").read_text())
    assert written["rows"] == rows and np.isclose(written["chance_accuracy"], 1 / QUICK.keys)
    assert (tmp_path / "lr.png").read_bytes().startswith(b"\x89PNG")


def test_command_line_runs_the_benchmark(tmp_path):
    stem = tmp_path / "cli"
    assert (
        main(
            [
                "benchmark",
                "long-range",
                "--quick",
                "--distances",
                "6",
                "--output",
                str(stem),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["distance"] for r in rows] == [6] * len(QUICK.models())
    chosen = stem.with_name("chosen")
    argv = ["benchmark", "long-range", "--quick", "--distances", "6", "--no-progress"]
    argv += ["--models-run", "TADN-only", "HyTRec 3:1, long-first fusion", "--output", str(chosen)]
    assert main(argv) == 0
    rows = json.loads(chosen.with_suffix(".json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["TADN-only", "HyTRec 3:1, long-first fusion"]


def test_the_long_first_row_starts_its_fusion_gate_on_the_long_branch():
    from hytrec.model.hytrec import HyTRec

    config = QUICK.models()["HyTRec 3:1, long-first fusion"]
    assert HyTRec(config).fusion.gate.bias.eq(2.0).all()
    assert HyTRec(QUICK.models()["HyTRec 3:1"]).fusion.gate.bias.eq(0.0).all()
    with pytest.raises(ValueError, match="unknown models"):
        replace(QUICK, models_run=("GPT",))


def test_training_reaches_the_network_not_only_the_item_table():
    """The answer's loss must train the layers that could carry the key, not just the item
    table (the serving `user_vector` computes without gradients)."""
    from hytrec.bench.long_range import _answer_logits
    from hytrec.model.registry import build_model

    log = long_range_log(6, 10, keys=3, fillers=8, seed=0)
    for config in QUICK.models().values():
        model = build_model(config, log)
        batch, answers = _inputs(log, getattr(config, "max_len", None), torch.device("cpu"))
        torch.nn.functional.cross_entropy(_answer_logits(model, batch), answers).backward()
        table = model.item_table()
        others = [p for p in model.parameters() if p is not table and p.grad is not None]
        assert any(p.grad.abs().sum() > 0 for p in others), type(model).__name__
