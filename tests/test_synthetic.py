"""The synthetic funnel: determinism, the canonical order, and every planted signal."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from hytrec.model.events import Behavior
from hytrec.model.synthetic import SyntheticConfig, generate, generate_with_truth, long_range_log

CFG = SyntheticConfig(users=60, min_events=300, max_events=600, seed=7)


@pytest.fixture(scope="module")
def planted():
    return generate_with_truth(CFG)


def test_same_seed_same_log_other_seed_differs():
    a, b, c = generate(CFG), generate(CFG), generate(replace(CFG, seed=8))
    for col in ("user", "item", "category", "behavior", "ts"):
        assert np.array_equal(getattr(a, col), getattr(b, col))
    assert a.items == b.items and a.users == b.users
    assert not np.array_equal(a.item[:1000], c.item[:1000])


def test_canonical_order_and_vocabularies(planted):
    log, truth = planted
    same_user = log.user[1:] == log.user[:-1]
    assert (np.diff(log.user) >= 0).all() and (np.diff(log.ts)[same_user] > 0).all()
    lengths = np.bincount(log.user)[1:]
    assert lengths.min() >= CFG.min_events and lengths.max() <= CFG.max_events
    assert len(log.items) - 1 == CFG.categories * CFG.items_per_category
    assert len(log.categories) - 1 == CFG.categories and log.category.min() >= 1
    # an item belongs to exactly one category
    item_cat = np.zeros(len(log.items), dtype=np.int64)
    item_cat[log.item] = log.category
    assert np.array_equal(item_cat[log.item], log.category)
    assert truth.favourites.shape == (CFG.users, CFG.favourites)
    assert truth.burst_category.shape == log.user.shape


def test_next_category_is_favourite_or_burst_far_above_popularity(planted):
    log, truth = planted
    favourite = (log.category[:, None] == truth.favourites[log.user - 1]).any(axis=1)
    burst = truth.burst_category >= 0
    assert (log.category[burst] == truth.burst_category[burst]).all()
    explained = (favourite | burst).mean()
    most_popular = np.bincount(log.category).max() / len(log)
    assert explained > 0.7 and explained > 4 * most_popular
    # the favourites are stable: first and second half of each history agree as well
    late = np.concatenate([np.arange(e - s) >= (e - s) // 2 for _, s, e in log.user_slices()])
    assert abs(favourite[late].mean() - favourite[~late].mean()) < 0.05


def test_bursts_are_short_in_time_and_sessions_have_day_gaps(planted):
    log, truth = planted
    gaps = np.diff(log.ts)[log.user[1:] == log.user[:-1]]
    assert np.median(gaps) < 120 and gaps.max() > 86400  # clicks in seconds, days apart
    b = truth.burst_category
    run = (b[1:] >= 0) & (b[1:] == b[:-1]) & (log.user[1:] == log.user[:-1])
    assert run.mean() > 0.03
    assert np.percentile(np.diff(log.ts)[run], 99) < 300  # a burst lasts minutes


def test_funnel_conversions_act_on_the_last_viewed_item(planted):
    log, _ = planted
    share = np.bincount(log.behavior, minlength=10)[
        [Behavior.PRODUCT_CLICK, Behavior.COLLECTION, Behavior.ADD_TO_CART, Behavior.PAYMENT]
    ] / len(log)
    assert np.allclose(share, CFG.funnel, atol=0.01)
    view = log.behavior == Behavior.PRODUCT_CLICK
    last_view = np.maximum.accumulate(np.where(view, np.arange(len(log)), 0))
    assert (log.user[last_view] == log.user).all()  # each user starts with a view
    assert np.array_equal(log.item[~view], log.item[last_view][~view])


def test_scales_to_long_histories():
    start = time.perf_counter()
    log = generate(SyntheticConfig(users=100, min_events=12_000, max_events=12_000))
    assert len(log) == 1_200_000 and time.perf_counter() - start < 5.0


def test_rejects_impossible_configs():
    with pytest.raises(ValueError, match="favourites"):
        generate(SyntheticConfig(categories=2, favourites=3))
    with pytest.raises(ValueError, match="min_events"):
        generate(SyntheticConfig(min_events=10, max_events=5))


@pytest.mark.parametrize("distance", [1, 2, 50])
def test_long_range_answer_depends_only_on_the_key_distance_back(distance):
    keys, fillers = 5, 30
    log = long_range_log(40, distance, keys=keys, fillers=fillers, seed=3)
    rows = log.item.reshape(40, distance + 1)  # every user: key, fillers, answer
    key, answer, between = rows[:, 0], rows[:, -1], rows[:, 1:-1]
    assert set(key.tolist()) <= set(range(1, keys + 1))
    assert (answer == key + keys).all()  # key j -> answer j
    assert ((between > 2 * keys) & (between <= 2 * keys + fillers)).all()  # only fillers
    assert len(set(key.tolist())) > 1  # the answer varies from user to user
    assert (np.diff(log.ts.reshape(40, -1), axis=1) == 60).all()
    assert len(log.items) == 1 + 2 * keys + fillers
    assert (log.category == 0).all() and (log.behavior == int(Behavior.PRODUCT_CLICK)).all()
    with pytest.raises(ValueError, match="keys >= 2"):
        long_range_log(3, distance, keys=1)
