"""Smoke test of `hytrec benchmark accuracy`'s harness on a tiny planted log."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from hytrec.bench.accuracy import PRESETS, run_accuracy
from hytrec.model.codebook import SemanticIds
from hytrec.model.evaluate import leave_one_out
from hytrec.model.events import Vocabulary
from hytrec.model.registry import MODELS, spec
from hytrec.model.synthetic import revisiting_log
from hytrec.model.train import TrainConfig


def test_accuracy_harness_reports_heuristics_intervals_and_seeds(tmp_path):
    log = revisiting_log(users=40, length=(8, 14))
    tc = TrainConfig(epochs=1, batch_size=16, max_len=16, valid_users=None, seed=0)
    run_accuracy(
        "planted",
        log,
        PRESETS["taobao"],
        tmp_path / "acc",
        models=["SASRec", "SASRec + repeat head"],
        d_model=16,
        train_config=tc,
        progress=False,
        seeds=(0, 1),
    )
    report = json.loads((tmp_path / "acc.json").read_text())
    models = report["models"]
    assert list(models) == [
        "popularity",
        "recent-items",
        "user-frequency",
        "recency-frequency",
        "item-transition",
        "SASRec",
        "SASRec + repeat head",
    ]
    best = report["best_heuristic"]
    assert best in ("recent-items", "user-frequency", "recency-frequency", "item-transition")
    assert report["seeds"] == [0, 1] and "at most 1 epochs" in report["budget"]
    for name, row in models.items():
        low, high = row["NDCG@10_ci95"]
        assert low <= row["overall"]["NDCG@10"] <= high, name
    head = models["SASRec + repeat head"]
    vs = head["vs_best_heuristic"]
    assert vs["heuristic"] == best
    assert vs["ratio"] == pytest.approx(
        head["overall"]["NDCG@10"] / models[best]["overall"]["NDCG@10"]
    )
    assert [r["seed"] for r in head["seed_runs"]] == [0, 1]
    assert head["seed_runs"][0]["NDCG@10"] == head["overall"]["NDCG@10"]
    assert head["config"]["repeat_head"]["buffer_size"] == 100
    # the config that trained (sizes from the data), not the config class's defaults
    assert head["config"]["num_items"] == len(log.items) and head["config"]["d_model"] == 16
    assert "vs_best_heuristic" not in models["recent-items"]
    # the time to converge: training and validation until the kept epoch ended
    assert head["seconds_to_best"] == head["history"][head["best_epoch"] - 1]["seconds"] > 0
    assert head["seed_runs"][0]["seconds_to_best"] == head["seconds_to_best"]
    assert head["seed_runs"][1]["seconds_to_best"] > 0
    md = (tmp_path / "acc.md").read_text()
    assert "| recent-items |" in md and f"ratio to the best heuristic ({best})" in md
    assert (tmp_path / "acc.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown models"):
        run_accuracy("planted", log, PRESETS["taobao"], tmp_path / "x", models=["GPT"])


def test_train_and_evaluate_commands_with_the_head_and_reference_lines(tmp_path, capsys):
    from hytrec.cli import main

    revisiting_log(users=30, length=(8, 12)).save(tmp_path / "log")
    head = '{"d_model": 16, "max_len": 16, "repeat_head": {"buffer_size": 10}}'
    main(
        [
            "train",
            "--dataset",
            str(tmp_path / "log"),
            "--out",
            str(tmp_path / "ckpt"),
            "--model",
            "sasrec",
            "--model-config",
            head,
            "--epochs",
            "1",
            "--max-len",
            "16",
        ]
    )
    args = ["evaluate", "--dataset", str(tmp_path / "log"), "--checkpoint", str(tmp_path / "ckpt")]
    main([*args, "--output", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    for name in (
        "popularity",
        "recent-items",
        "user-frequency",
        "recency-frequency",
        "item-transition",
    ):
        assert f"reference {name}: HR@10" in out
    models = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert list(models)[0] == "SASRec + repeat head" and "recent-items" in models


@pytest.mark.parametrize("model", sorted(MODELS))
def test_evaluate_command_takes_every_registered_model(tmp_path, capsys, model):
    """`hytrec train` then `hytrec evaluate` for each registry line (a config without a
    repeat_head field crashed evaluate)."""
    from hytrec.cli import main

    log = revisiting_log(users=20, length=(6, 9))
    if getattr(spec(model).model, "NEEDS_CATEGORIES", False):  # ULIM: three, from the items
        log = replace(log, category=log.item % 3 + 1, categories=Vocabulary(["a", "b", "c"]))
    log.save(tmp_path / "log")
    small = {"d_model": 16}
    if "max_len" in {f.name for f in fields(spec(model).config)}:
        small["max_len"] = 12
    train = ["train", "--dataset", str(tmp_path / "log"), "--out", str(tmp_path / "ckpt")]
    main([*train, "--model", model, "--model-config", json.dumps(small), "--epochs", "1"])
    args = ["evaluate", "--dataset", str(tmp_path / "log"), "--checkpoint", str(tmp_path / "ckpt")]
    main([*args, "--output", str(tmp_path / "eval")])
    models = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert list(models)[0].lower().startswith(model) and "item-transition" in models


def test_head_cost_benchmark_smoke(tmp_path):
    from hytrec.bench.head_benchmark import HeadCostConfig, run_head_cost

    cfg = HeadCostConfig(batches=1, rank_users=16, repeats=1, d_model=16)
    report = run_head_cost(cfg, revisiting_log(users=40, length=(8, 14)), str(tmp_path / "c"))
    models = report["models"]
    assert set(models) == {
        "SASRec",
        "SASRec + repeat head",
        "HyTRec 3:1",
        "HyTRec 3:1 + repeat head",
    }
    head = models["HyTRec 3:1 + repeat head"]
    assert head["train_step_ratio"] == pytest.approx(
        head["train_step_s"] / models["HyTRec 3:1"]["train_step_s"]
    )
    assert report["command"].startswith("hytrec benchmark head-cost --dataset taobao")
    assert json.loads((tmp_path / "c.json").read_text())["positions_per_step"] > 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_ulim_reads_level_one_codes_as_categories_where_the_data_has_none(tmp_path):
    from hytrec.bench.hisac_parity import codebook_for
    from hytrec.model.data import DataError

    log = revisiting_log(users=30, length=(8, 12))  # no categories
    codebook_for(len(log.items)).save(tmp_path / "sids")
    tc = TrainConfig(epochs=1, batch_size=16, max_len=16, valid_users=None, seed=0)
    args = ("planted", log, PRESETS["taobao"])
    options = {"d_model": 16, "train_config": tc, "progress": False, "models": ["ULIM"]}
    with pytest.raises(DataError, match="categor"):  # no categories and no codebook
        run_accuracy(*args, tmp_path / "refused", **options)
    run_accuracy(*args, tmp_path / "acc", semantic_ids=str(tmp_path / "sids"), **options)
    ulim = json.loads((tmp_path / "acc.json").read_text())["models"]["ULIM"]
    assert ulim["categories"] == "pseudo: the semantic IDs' level-1 codes"
    assert ulim["config"]["num_categories"] == 16 + 1  # 16 level-1 codes and the unknown
    assert 0.0 <= ulim["overall"]["NDCG@10"] <= 1.0
    # the next-category baselines beside it, on the same pseudo-categories: "repeat last
    # category" hits at 1 exactly when the target's code is the previous event's
    report = json.loads((tmp_path / "acc.json").read_text())
    baselines = report["next_category_baselines"]
    assert set(baselines) == {"repeat last category", "most frequent categories"}
    pseudo = SemanticIds.load(tmp_path / "sids").as_categories(log)
    _, targets = leave_one_out(pseudo).targets("test")
    expected = np.mean(pseudo.category[targets] == pseudo.category[targets - 1])
    assert baselines["repeat last category"]["HR@1"] == pytest.approx(expected)
    assert "category_metrics" in ulim
    assert "Next category" in (tmp_path / "acc.md").read_text()


def test_every_preset_validates_by_the_protocol_it_tests_by():
    """Early stopping picks the epoch by validation: a preset whose validation kept history
    items as candidates while its test removed them (ml100k and ml-latest did) chose epochs
    by another ranking than the one reported; such a preset is refused."""
    from hytrec.bench.accuracy import Preset

    for name, preset in PRESETS.items():
        assert preset.train.filter_history == preset.filter_history, name
    ml = PRESETS["ml100k"]
    with pytest.raises(ValueError, match="validation filter_history=False"):
        Preset(ml.path, replace(ml.train, filter_history=False), True, ml.note)
