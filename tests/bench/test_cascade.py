"""A tiny `hytrec benchmark cascade` run on a synthetic log: every K row, the oracle and
the category baselines are reported, and the figures obey what the cascade guarantees."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hytrec.bench.accuracy import PRESETS, run_accuracy
from hytrec.bench.cascade import QUICK, CascadeConfig, run_cascade, stage_swap_scores
from hytrec.model.synthetic import SyntheticConfig, generate
from hytrec.model.ulim import category_logsumexp


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
    training, and ranks with the history's items removed (ml100k's protocol); with --versus
    SASRec the stage swap's SASRec row is that file's SASRec row."""
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
        models=["ULIM", "SASRec"],
        d_model=16,
        train_config=replace(preset.train, epochs=2, patience=2, time_budget_s=600.0, seed=3),
        progress=False,
    )
    saved = json.loads((tmp_path / "accuracy.json").read_text())["models"]
    filtered, unfiltered = saved["ULIM"]["overall"], saved["ULIM"]["overall_unfiltered"]
    # the log repeats items, so the two protocols differ and the test tells them apart
    assert filtered["NDCG@10"] != unfiltered["NDCG@10"]
    config = CascadeConfig(
        dataset="ml100k",
        preset=True,
        epochs=2,
        train_seconds=600.0,
        d_model=16,
        seed=3,
        ks=(10, 0),
        versus="SASRec",
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
    swap = {r["ranking"]: r for r in report["stage_swap"]["rows"]}
    assert list(swap) == [
        "SASRec",
        "SASRec, oracle category",
        "ULIM P(c) x SASRec P(x | c)",
        "SASRec P(c) x ULIM P(x | c)",
    ]
    sasrec = saved["SASRec"]["overall"]
    assert swap["SASRec"]["NDCG@10"] == pytest.approx(sasrec["NDCG@10"], abs=1e-12)
    assert swap["SASRec"]["HR@50"] == pytest.approx(sasrec["HR@50"], abs=1e-12)
    # inside the target's category the target can only rank higher
    assert swap["SASRec, oracle category"]["HR@50"] >= swap["SASRec"]["HR@50"]
    implied = report["next_category"]["SASRec (implied)"]
    assert implied["users"] == 40 and implied["HR@1"] <= implied["HR@10"]


def test_a_preset_cascade_needs_a_preset():
    with pytest.raises(ValueError, match="no accuracy preset for 'planted'"):
        run_cascade(
            CascadeConfig(dataset="planted", preset=True), generate(SyntheticConfig()), None
        )


def test_a_versus_model_is_refused_by_name_before_ulim_trains():
    log = generate(SyntheticConfig())
    with pytest.raises(ValueError, match="'SASRec 2' is not in the zoo"):
        run_cascade(CascadeConfig(dataset="planted", versus="SASRec 2"), log, None)
    with pytest.raises(ValueError, match="'HiSAC' needs semantic IDs"):
        run_cascade(CascadeConfig(dataset="planted", versus="HiSAC"), log, None)


def test_the_stage_swap_factors_each_distribution_into_its_two_stages():
    """P(c) is the sum of P(x) over c's items; each swap is a distribution whose category
    marginal is the P(c) it took and whose order inside a category is the P(x | c) it
    took; swapping a model with its own factors gives its distribution back."""
    generator = torch.Generator().manual_seed(0)
    U, N, C = 5, 40, 6
    item_category = torch.randint(1, C, (N,), generator=generator)
    item_category[:C] = torch.arange(C)  # every category has an item; padding's is 0
    versus = 3 * torch.randn(U, N, generator=generator, dtype=torch.float64)
    ulim = 3 * torch.randn(U, N, generator=generator, dtype=torch.float64)
    ulim[:, 0] = float("-inf")
    ulim = ulim.log_softmax(-1)  # ULIM's ungated cascade: a distribution over the items
    ulim_log_p = category_logsumexp(ulim, item_category, C)
    target = torch.randint(1, C, (U,), generator=generator)
    swaps, versus_log_p = stage_swap_scores(ulim_log_p, ulim, versus, item_category, target, "V")

    log_q = versus.clone()
    log_q[:, 0] = float("-inf")
    log_q = log_q.log_softmax(-1)
    brute = torch.stack(
        [log_q[:, item_category == c].logsumexp(-1) for c in range(C)], -1
    )  # [U, C]
    torch.testing.assert_close(versus_log_p, brute)
    torch.testing.assert_close(versus_log_p.exp().sum(-1), torch.ones(U, dtype=torch.float64))
    torch.testing.assert_close(swaps["V"], log_q)
    for name, marginal, within in (
        ("ULIM P(c) x V P(x | c)", ulim_log_p, log_q),
        ("V P(c) x ULIM P(x | c)", brute, ulim),
    ):
        swap = swaps[name]
        torch.testing.assert_close(category_logsumexp(swap, item_category, C), marginal)
        for c in range(1, C):  # the order inside c is the other model's
            inside = item_category == c
            torch.testing.assert_close(
                swap[:, inside] - swap[:, inside].amax(-1, keepdim=True),
                within[:, inside] - within[:, inside].amax(-1, keepdim=True),
            )
    oracle = swaps["V, oracle category"]
    assert torch.isinf(oracle[item_category[None] != target[:, None]]).all()
    # a model swapped with its own factors is itself
    own, _ = stage_swap_scores(brute, log_q, versus, item_category, target, "V")
    torch.testing.assert_close(own["ULIM P(c) x V P(x | c)"], log_q)
    torch.testing.assert_close(own["V P(c) x ULIM P(x | c)"], log_q)


def test_the_category_marginal_does_not_underflow_far_below_the_top():
    # float32 log-probabilities 500 nats below the row's top: each category sums from its own
    log_prob = torch.tensor([[0.0, -500.0, -501.0]])
    marginal = category_logsumexp(log_prob, torch.tensor([0, 1, 1]), 2)
    assert marginal.dtype == torch.float32
    torch.testing.assert_close(
        marginal, torch.tensor([[0.0, -500.0 + torch.log1p(torch.exp(torch.tensor(-1.0)))]])
    )
