"""Smoke runs of HPGR's figures on a small synthetic log: `hytrec pretrain mim` (checkpoint,
report and plot), the pre-training curve with and without the session module, and the
sparsity curve."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hytrec import cli
from hytrec.bench.hpgr_benchmark import SparsityConfig, run_pretrain_curve, run_sparsity
from hytrec.model.hpgr import HPGRConfig
from hytrec.model.pretrain import MIMConfig
from hytrec.model.registry import load_model
from hytrec.model.synthetic import SyntheticConfig, generate

MIM = MIMConfig(
    model=HPGRConfig(d_model=16, heads=2, max_len=40, top_k=None),
    max_len=40,
    negatives=32,
    epochs=2,
    batch_size=16,
)


def small_log():
    return generate(
        SyntheticConfig(users=30, min_events=20, max_events=40, categories=5, items_per_category=20)
    )


def test_pretrain_mim_command_saves_the_encoder_and_writes_the_report(tmp_path, capsys):
    stem = tmp_path / "events"
    small_log().save(stem)
    out, report = tmp_path / "mim", tmp_path / "report"
    args = ["pretrain", "mim", "--dataset", str(stem), "--out", str(out), "--output", str(report)]
    args += ["--epochs", "2", "--negatives", "32", "--max-len", "40", "--d-model", "16"]
    assert cli.main([*args, "--no-progress"]) == 0
    written = json.loads(report.with_suffix(".json").read_text())
    assert report.with_suffix(".png").stat().st_size > 0
    assert written["fidelity"] == "reading" and written["leaked_targets"] == 0
    assert len(written["loss_by_epoch"]) == 2 and written["sessions"] >= 30
    for key in ("masked_item_HR@10", "popularity_HR@10", "git_commit", "command", "machine"):
        assert key in written
    assert load_model(out).NAME == "hpgr"
    assert "leaked targets 0" in capsys.readouterr().out


def test_pretrain_curve_runs_with_and_without_the_session_module(tmp_path):
    report = run_pretrain_curve("synthetic", small_log(), MIM, tmp_path / "curve", False)
    runs = report["runs"]
    assert set(runs) == {"with SEM", "without SEM"}
    assert runs["without SEM"]["config"]["model"]["session_module"] is False
    assert all(len(r["history"]) == 2 and r["leaked_targets"] == 0 for r in runs.values())
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_sparsity_curve_reports_ndcg_and_the_flops_fraction_per_k(tmp_path):
    stem, mim = tmp_path / "events", tmp_path / "mim"
    small_log().save(stem)
    pretrain_args = ["pretrain", "mim", "--dataset", str(stem), "--out", str(mim), "--epochs", "1"]
    pretrain_args += ["--max-len", "30", "--negatives", "32", "--output", str(tmp_path / "p")]
    assert cli.main([*pretrain_args, "--no-progress"]) == 0
    cfg = replace(
        SparsityConfig(dataset="synthetic"),
        ks=(2, 0),
        recent=2,
        pretrain_epochs=1,
        epochs=1,
        max_len=30,
        negatives=32,
        seeds=(0, 1),
    )
    log = small_log()
    report = run_sparsity(cfg, log, tmp_path / "sparsity", progress=False)
    rows = {r["k"]: r for r in report["rows"]}
    assert set(rows) == {2, "all"}
    # each k once per seed, every run its full epochs, and the paired interval against dense
    assert all(r["epochs_run"] == [1, 1] and not r["cut_by_time_budget"] for r in rows.values())
    assert len(rows[2]["NDCG@10_per_seed"]) == 2
    assert rows[2]["NDCG@10"] == pytest.approx(np.mean(rows[2]["NDCG@10_per_seed"]))
    low, high = rows[2]["NDCG@10_vs_dense_ci95"]
    assert low <= rows[2]["NDCG@10_vs_dense"] <= high
    # dense against itself: ratio 1, and (its seeds drawn independently on each side) an
    # interval around 0
    low, high = rows["all"]["NDCG@10_minus_dense_ci95"]
    assert rows["all"]["NDCG@10_vs_dense"] == 1.0 and low <= 0.0 <= high
    assert rows["all"]["attention_flops_fraction"] == 1.0
    assert 0 < rows[2]["attention_flops_fraction"] < 1.0
    assert rows[2]["pairs_dense"] == rows["all"]["pairs_attended"]
    assert report["fidelity"] == "reading" and "git_commit" in report
    assert report["pretrain"]["loss"] == "full softmax"  # whatever the fine-tuning's
    assert (tmp_path / "sparsity.png").stat().st_size > 0
    # from a saved pre-training instead: the report carries that run's summary
    args = ["hpgr-sparsity", "--dataset", str(stem), "--ks", "0", "--epochs", "1"]
    args += ["--max-len", "30", "--negatives", "32", "--init-from", str(mim)]
    assert cli.main(["benchmark", *args, "--output", str(tmp_path / "s2"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "s2.json").read_text())
    assert again["config"]["init_from"] == str(mim) and again["pretrain"]["leaked_targets"] == 0
    with pytest.raises(ValueError, match="dense"):
        SparsityConfig(ks=(4, 8))


def test_accuracy_harness_pretrains_for_the_hpgr_row_and_runs_its_ablations(tmp_path):
    from hytrec.bench.accuracy import PRESETS, run_accuracy
    from hytrec.model.train import TrainConfig

    tc = TrainConfig(epochs=1, batch_size=16, max_len=30, negatives=32, valid_users=None)
    names = ["HPGR", "HPGR no pre-training", "HPGR no sparse attention"]
    stem = tmp_path / "acc"
    run_accuracy("synthetic", small_log(), PRESETS["taobao"], stem, names, 16, tc, False)
    models = json.loads(stem.with_suffix(".json").read_text())["models"]
    assert set(names) <= set(models)
    assert models["HPGR"]["pretraining"]["leaked_targets"] == 0
    # not the fine-tuning's 32 sampled negatives: they make MIM collapse (`pretrain.py`)
    assert models["HPGR"]["pretraining"]["loss"] == "full softmax"
    assert models["HPGR"]["config"]["selection"] == "pretrained"
    assert "pretraining" not in models["HPGR no pre-training"]
    assert models["HPGR no sparse attention"]["config"]["top_k"] is None


def test_accuracy_harness_refuses_or_leaves_out_hpgr_without_timestamps(tmp_path):

    from hytrec.bench.accuracy import PRESETS, run_accuracy
    from hytrec.model.data import DataError
    from hytrec.model.train import TrainConfig
    from tests.test_data import log_of

    positions = log_of([list(range(12)), list(range(9)), list(range(7))])
    tc = TrainConfig(epochs=1, batch_size=16, max_len=12, valid_users=None)
    with pytest.raises(DataError, match="beauty and sports"):
        run_accuracy("s3rec", positions, PRESETS["beauty"], tmp_path / "a", ["HPGR"], 16, tc, False)
    run_accuracy("s3rec", positions, PRESETS["beauty"], tmp_path / "b", ["SASRec"], 16, tc, False)
    left_out = json.loads((tmp_path / "b.json").read_text())["left_out"]
    assert set(left_out) == {
        "HPGR",
        "HPGR + repeat head",
        "HPGR no pre-training",
        "HPGR no sparse attention",
    }
