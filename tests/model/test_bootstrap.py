"""The paired bootstrap over users against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hytrec.model.evaluate import ndcg, ndcg_per_user, paired_bootstrap


def test_per_user_ndcg_averages_to_ndcg():
    ranks = np.array([0, 1, 9, 10, 49])
    values = ndcg_per_user(ranks, 10)
    assert values[0] == 1.0 and values[3] == values[4] == 0.0
    assert values.mean() == pytest.approx(ndcg(ranks, 10))


def test_a_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(1)
    b = rng.random(500)
    out = paired_bootstrap(b + 0.25, b, resamples=300)
    assert out["diff"] == pytest.approx(0.25)
    assert out["diff_ci"] == pytest.approx([0.25, 0.25])  # pairing removes all the noise
    assert out["share_a_ahead"] == 1.0
    assert out["ratio"] == pytest.approx((b.mean() + 0.25) / b.mean())


def test_interval_widths_match_the_normal_approximation():
    """Mean of n Bernoulli(0.3): standard error sqrt(p(1-p)/n); a paired difference whose
    users differ by independent N(0.1, 0.2^2) has standard error 0.2/sqrt(n)."""
    n, p = 20_000, 0.3
    rng = np.random.default_rng(2)
    a = (rng.random(n) < p).astype(float)
    single = paired_bootstrap(a, resamples=2000, seed=3)
    half = (single["ci"][1] - single["ci"][0]) / 2
    assert half == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.1)
    assert single["ci"][0] < a.mean() < single["ci"][1]

    noise = rng.normal(0.1, 0.2, n)
    paired = paired_bootstrap(a + noise, a, resamples=2000, seed=3)
    half = (paired["diff_ci"][1] - paired["diff_ci"][0]) / 2
    assert half == pytest.approx(1.96 * 0.2 / math.sqrt(n), rel=0.1)  # not the unpaired width
    assert paired["diff_ci"][0] < noise.mean() < paired["diff_ci"][1]


def test_same_seed_same_interval_and_errors():
    a = np.arange(10.0)
    assert paired_bootstrap(a, seed=5) == paired_bootstrap(a, seed=5)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(a, a[:3])
    with pytest.raises(ValueError, match="no users"):
        paired_bootstrap(np.zeros(0))


def test_seeds_widen_the_interval_by_their_spread_and_keep_the_pairing():
    """Seeds [S, U] are drawn with replacement per resample: runs that differ only by a
    per-seed offset of -d, 0, +d (identical users) give the interval of the mean of three
    draws from {-d, 0, d}, whose 2.5 % and 97.5 % quantiles are -d and +d (each extreme has
    probability 1/27 > 2.5 %)."""
    users = np.full(300, 0.3)
    d = 0.02
    runs = np.stack([users - d, users, users + d])  # [3 seeds, 300 users]
    out = paired_bootstrap(runs, resamples=4000, seed=1)
    assert out["mean"] == pytest.approx(0.3)
    assert out["ci"] == pytest.approx([0.3 - d, 0.3 + d])
    assert paired_bootstrap(runs[1], resamples=500)["ci"] == pytest.approx([0.3, 0.3])

    rng = np.random.default_rng(4)
    b = rng.random(400)
    same_seeds = np.stack([b + 0.1] * 3)  # three seeds that agree: only users vary
    paired = paired_bootstrap(same_seeds, b, resamples=500)
    assert paired["diff_ci"] == pytest.approx([0.1, 0.1])  # users paired across the sides
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(same_seeds, b[:10])


def test_weights_give_the_mean_over_events_resampled_by_user():
    """Per-user means weighted by each user's events: the mean over events; equal weights
    change nothing; a constant per-event difference keeps a zero-width interval."""
    rng = np.random.default_rng(4)
    hits = [rng.random(int(k)) < 0.4 for k in rng.integers(1, 30, 300)]  # events per user
    per_user = np.array([h.mean() for h in hits])
    events = np.array([len(h) for h in hits])
    out = paired_bootstrap(per_user, weights=events, seed=1)
    assert out["mean"] == pytest.approx(np.concatenate(hits).mean())
    assert out["ci"][0] < out["mean"] < out["ci"][1]
    plain = paired_bootstrap(per_user, seed=1)
    equal = paired_bootstrap(per_user, weights=np.full(300, 7.0), seed=1)
    assert equal["ci"] == pytest.approx(plain["ci"]) and equal["mean"] == pytest.approx(
        plain["mean"]
    )
    shifted = paired_bootstrap(per_user + 0.1, per_user, weights=events, resamples=300)
    assert shifted["diff"] == pytest.approx(0.1) and shifted["diff_ci"] == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="one value per user"):
        paired_bootstrap(per_user, weights=events[:5])
