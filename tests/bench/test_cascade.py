"""A tiny `hytrec benchmark cascade` run on a synthetic log: every K row, the oracle and
the category baselines are reported, and the figures obey what the cascade guarantees."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hytrec.bench.accuracy import PRESETS, run_accuracy
from hytrec.bench.cascade import QUICK, CascadeConfig, run_cascade
from hytrec.model.synthetic import SyntheticConfig, generate


def test_quick_cascade_writes_rows_that_obey_the_cascade(tmp_path):
    log = generate(
        SyntheticConfig(users=40, min_events=15, max_events=40, categories=8, items_per_category=12)
    )
    report = run_cascade(QUICK, log, tmp_path / "cascade")
    saved = json.loads((tmp_path / "cascade.json").read_text())
    assert (tmp_path / "cascade.png").stat().st_size > 0
    assert saved["fidelity"] == "reading" and saved["command"].startswith(
        "hytrec benchmark cascade"
    )
    rows = {r["K"]: r for r in report["rows"]}
    assert list(rows) == ["1", "2", "all", "oracle"]
    # more categories, more of the catalogue searched; all categories search everything
    assert rows["1"]["searched_fraction_mean"] <= rows["2"]["searched_fraction_mean"]
    assert rows["all"]["searched_fraction_mean"] == 1.0
    # the oracle searches the target's category alone
    assert 0 < rows["oracle"]["searched_fraction_mean"] < 1
    for row in rows.values():
        assert 0 <= row["HR@50"] <= 1 and row["searched_fraction_p90"] <= 1
    assert set(report["next_category"]) == {
        "ULIM",
        "repeat last category",
        "most frequent categories",
    }
    for metrics in report["next_category"].values():
        assert metrics["users"] == 40
        assert metrics["HR@1"] <= metrics["HR@5"] <= metrics["HR@20"]


def test_the_preset_cascade_ranks_as_the_accuracy_benchmark_does(tmp_path):
    """With --preset the cascade's K = 10 row is the accuracy file's ULIM row: the same
    training, and ranks with the history's items removed (ml100k's protocol)."""
    log = generate(
        SyntheticConfig(users=40, min_events=15, max_events=40, categories=16, items_per_category=6)
    )
    preset = PRESETS["ml100k"]
    assert preset.filter_history
    run_accuracy(
        "ml100k",
        log,
        preset,
        tmp_path / "accuracy",
        models=["ULIM"],
        d_model=16,
        train_config=replace(preset.train, epochs=2, patience=2, time_budget_s=600.0, seed=3),
        progress=False,
    )
    saved = json.loads((tmp_path / "accuracy.json").read_text())["models"]["ULIM"]
    filtered, unfiltered = saved["overall"], saved["overall_unfiltered"]
    # the log repeats items, so the two protocols differ and the test tells them apart
    assert filtered["NDCG@10"] != unfiltered["NDCG@10"]
    config = CascadeConfig(
        dataset="ml100k", preset=True, epochs=2, train_seconds=600.0, d_model=16, seed=3, ks=(10, 0)
    )
    report = run_cascade(config, log, None)
    assert report["protocol"]["history_items"] == "removed from candidates"
    # the report records what trained: the preset's fields, not the benchmark's own defaults
    for name in ("max_len", "negatives", "valid_users"):
        assert report["config"][name] == getattr(preset.train, name), name
    rows = {r["K"]: r for r in report["rows"]}
    assert rows["10"]["NDCG@10"] == pytest.approx(filtered["NDCG@10"], abs=1e-12)
    assert rows["10"]["HR@50"] == pytest.approx(filtered["HR@50"], abs=1e-12)
    assert rows["all"]["searched_fraction_mean"] == 1.0


def test_a_preset_cascade_needs_a_preset():
    with pytest.raises(ValueError, match="no accuracy preset for 'planted'"):
        run_cascade(
            CascadeConfig(dataset="planted", preset=True), generate(SyntheticConfig()), None
        )
