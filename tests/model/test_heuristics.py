"""The heuristic baselines against brute-force references written from their definitions."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.model.batch import EventBatch
from hytrec.model.evaluate import EvalConfig, leave_one_out, rank_targets
from hytrec.model.events import EventLog, Vocabulary
from hytrec.model.heuristics import Popularity, RecencyFrequency, heuristics

NUM_ITEMS = 9  # items 1..8, 0 is padding

# (user, item) in time order; hand-made so that every rule has something to decide:
# repeats, equal counts broken by recency, a transition seen in training, targets outside
# the history, a last item with no successor, a user too short to be scored.
EVENTS = [
    (1, 1), (1, 2), (1, 1), (1, 3), (1, 2), (1, 4), (1, 2),  # fmt: skip
    (2, 5), (2, 6), (2, 5), (2, 6), (2, 7), (2, 8),
    (3, 2), (3, 4), (3, 1), (3, 4), (3, 3),
    (4, 3), (4, 8),
    (5, 4), (5, 2), (5, 4), (5, 5), (5, 2), (5, 2), (5, 6), (5, 4),
]  # fmt: skip


def hand_log() -> EventLog:
    user = np.array([u for u, _ in EVENTS], dtype=np.int64)
    n = len(user)
    return EventLog(
        user=user,
        item=np.array([i for _, i in EVENTS], dtype=np.int64),
        category=np.zeros(n, np.int64),
        behavior=np.ones(n, np.int64),
        ts=np.arange(n, dtype=np.int64),
        users=Vocabulary(str(u) for u in range(1, 6)),
        items=Vocabulary(str(i) for i in range(1, NUM_ITEMS)),
        categories=Vocabulary(),
    )


# ------------------------------------------------------------------ brute-force references


def order_recent(history: list[int]) -> list[tuple]:
    """A sort key per item: the user's items newest first; all others equal."""
    newest = {item: p for p, item in enumerate(history)}
    return [(1, newest[i]) if i in newest else (0, 0) for i in range(NUM_ITEMS)]


def order_frequency(history: list[int]) -> list[tuple]:
    counts, newest = Counter(history), {item: p for p, item in enumerate(history)}
    return [(1, counts[i], newest[i]) if i in counts else (0, 0, 0) for i in range(NUM_ITEMS)]


def order_recency_frequency(history: list[int]) -> list[tuple]:
    """count / (1 + distinct items touched after the item's newest event), ties by recency."""
    counts, newest = Counter(history), {item: p for p, item in enumerate(history)}
    later = {i: sum(1 for j in newest if newest[j] > newest[i]) for i in newest}
    return [
        (1, Fraction(counts[i], 1 + later[i]), newest[i]) if i in counts else (0, 0, 0)
        for i in range(NUM_ITEMS)
    ]


def order_transition(history: list[int], training: list[list[int]]) -> list[tuple]:
    pairs = Counter((a, b) for run in training for a, b in zip(run, run[1:], strict=False))
    pop = Counter(i for run in training for i in run)
    last = history[-1]
    return [(pairs[(last, i)], pop[i]) for i in range(NUM_ITEMS)]


def order_popularity(history: list[int], training: list[list[int]]) -> list[tuple]:
    pop = Counter(i for run in training for i in run)
    return [(pop[i],) for i in range(NUM_ITEMS)]


def brute_rank(key: list[tuple], target: int, excluded: set[int]) -> int:
    """0-based rank with ties against the target: the other candidates whose key is at least
    the target's; an excluded target ranks behind every candidate."""
    candidates = [i for i in range(1, NUM_ITEMS) if i not in excluded]
    if target in excluded:
        return len(candidates)
    return sum(1 for i in candidates if i != target and key[i] >= key[target])


@pytest.mark.parametrize("which", ["valid", "test"])
@pytest.mark.parametrize("filter_history", [False, True])
def test_heuristics_match_brute_force(which, filter_history):
    log = hand_log()
    split = leave_one_out(log)
    training = [log.item[a:z].tolist() for a, z in zip(split.start, split.train_stop, strict=True)]
    models = {**heuristics(log, split), "popularity": Popularity(log, split)}
    references = {
        "recent-items": lambda h: order_recent(h),
        "user-frequency": lambda h: order_frequency(h),
        "recency-frequency": lambda h: order_recency_frequency(h),
        "item-transition": lambda h: order_transition(h, training),
        "popularity": lambda h: order_popularity(h, training),
    }
    starts, targets = split.targets(which)
    cfg = EvalConfig(batch_size=2)  # several batches of different lengths
    for name, model in models.items():
        ranked = rank_targets(model, log, split, which, cfg)
        suffix = "_filtered" if filter_history else ""
        expected = []
        for a, t in zip(starts, targets, strict=True):
            history = log.item[a:t].tolist()
            excluded = set(history) if filter_history else set()
            expected.append(brute_rank(references[name](history), int(log.item[t]), excluded))
        assert ranked["rank" + suffix].tolist() == expected, name


def test_hand_log_exercises_every_rule():
    """The fixture is not trivial: the heuristics disagree and some targets are hit."""
    log = hand_log()
    split = leave_one_out(log)
    ranks = {
        name: rank_targets(model, log, split, "test")["rank"].tolist()
        for name, model in heuristics(log, split).items()
    }
    assert len({tuple(r) for r in ranks.values()}) == 4  # four different rankings
    assert ranks["recent-items"][0] == 1  # user 1: 4 then 2, newest first
    assert ranks["user-frequency"][0] == 0  # user 1: item 2 occurs twice before the target
    # user 2's test target 8 follows 7 in no training run: popularity decides (8 seen once)
    assert ranks["item-transition"][1] > 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(1, NUM_ITEMS - 1), min_size=1, max_size=14), min_size=1, max_size=4
    )
)
def test_recency_frequency_orders_as_its_definition(histories):
    """Any right-padded batch: every pair of items in the order of the exact (Fraction) key,
    padding included (a padded row must not count its zeros)."""
    T = max(len(h) for h in histories)
    item = torch.zeros(len(histories), T, dtype=torch.long)
    for row, history in enumerate(histories):
        item[row, : len(history)] = torch.tensor(history)
    zeros = torch.zeros_like(item)
    lengths = torch.tensor([len(h) for h in histories])
    batch = EventBatch(item, zeros, zeros, zeros, lengths)
    scores = RecencyFrequency(NUM_ITEMS).rank_scores(batch)
    for row, history in enumerate(histories):
        key = order_recency_frequency(history)
        for i in range(1, NUM_ITEMS):
            for j in range(1, NUM_ITEMS):
                expected = (key[i] > key[j]) - (key[i] < key[j])
                got = scores[row, i].item() - scores[row, j].item()
                assert (got > 0) - (got < 0) == expected, (history, i, j)
