"""Baselines that learn nothing but counts: the bar every trained model has to clear.

On event streams people come back to what they looked at: on the Taobao sample the user's
own recent items, newest first, score about twice the NDCG@10 of any model trained without
the repeat head (`repeat.py`). The accuracy harness therefore always runs these beside the
models, in the same protocol (`evaluate.py`: full ranking, ties against the model, the
harness's split and candidate filter).

Each baseline scores every item after a user's history (the events `rank_targets` gives it,
the whole history before the target) with `rank_scores(batch) -> [B, num_items]`. The scores
are integers (held in float64, exact) built so that the order is exactly the intended one:

    popularity       pop(i)                            pop = count among the training events
    recent-items     1 + p(i)                          p(i) = position of i's newest event in
                                                       the history (0-based); 0 if absent
    user-frequency   n(i) (T + 1) + 1 + p(i)           n(i) = i's events in the history,
                                                       T = history length; 0 if absent
    recency-frequency  n(i) / (1 + r(i)), ties by p(i) r(i) = distinct items touched after
                                                       i's newest event (0: the newest item)
    item-transition  C[a, i] (pop_max + 1) + pop(i)    a = the history's last item; C[a, i] =
                                                       how often i directly follows a in a
                                                       user's training events

So recent-items lists the user's distinct items newest first, user-frequency by count with
ties broken by recency, recency-frequency by count divided by recency rank (an item touched
twice, one item ago, weighs as much as the newest item touched once: the two signals a shop
combines by hand, with no parameter to tune), item-transition by transition count with
popularity breaking ties and taking over where the last item has no (or no more) successors.
Items outside the user's history all score 0 under the three history rules: no popularity
tie-breaker is added, so a target the user never touched ties with every other untouched
candidate and, ties counting against, ranks behind all of them (the pure heuristics).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from hytrec.model.evaluate import EvalSplit
from hytrec.model.events import EventLog
from hytrec.model.hytrec import EventBatch


def training_mask(log: EventLog, split: EvalSplit) -> np.ndarray:
    """Boolean [len(log)]: the events training may read (start .. train_stop-1 per user)."""
    delta = np.zeros(len(log) + 1, dtype=np.int64)
    np.add.at(delta, split.start, 1)
    np.add.at(delta, split.train_stop, -1)
    return np.cumsum(delta[:-1]) > 0


def training_counts(log: EventLog, split: EvalSplit) -> np.ndarray:
    """int64 [num_items]: each item's count among the training events."""
    return np.bincount(log.item[training_mask(log, split)], minlength=len(log.items))


def _positions(batch: EventBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(1-based position [B, T] with 0 at padding, T) of a right-padded batch."""
    T = batch.item.shape[1]
    pos = torch.arange(1, T + 1, device=batch.item.device)[None].expand_as(batch.item)
    return torch.where(batch.mask, pos, 0).double(), T


def _newest_position(batch: EventBatch, num_items: int) -> torch.Tensor:
    """float64 [B, num_items]: 1 + position of each item's newest event in the row, 0 if
    absent (padding scatters 0 into column 0, which never counts)."""
    pos, _ = _positions(batch)
    out = torch.zeros(len(pos), num_items, dtype=torch.float64, device=pos.device)
    return out.scatter_reduce_(1, batch.item, pos, "amax")


class Heuristic(nn.Module):
    """Shared plumbing: the catalogue size and the `rank_scores` protocol."""

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        raise NotImplementedError


class Popularity(Heuristic):
    """Every item by its count among the training events, the same for every user."""

    def __init__(self, log: EventLog, split: EvalSplit):
        super().__init__(len(log.items))
        self.register_buffer("counts", torch.from_numpy(training_counts(log, split)).double())

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        return self.counts[None].expand(len(batch.lengths), -1).clone()


class RecentItems(Heuristic):
    """The user's distinct items, newest first."""

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        return _newest_position(batch, self.num_items)


class UserFrequency(Heuristic):
    """The user's items by how often they occur in the history, ties by recency."""

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        newest = _newest_position(batch, self.num_items)
        _, T = _positions(batch)
        count = torch.zeros_like(newest).scatter_add_(1, batch.item, batch.mask.double())
        return torch.where(count > 0, count * (T + 1) + newest, 0.0)


class RecencyFrequency(Heuristic):
    """The user's items by count / (1 + distinct items touched since), ties by recency."""

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        newest = _newest_position(batch, self.num_items)  # [B, N]
        count = torch.zeros_like(newest).scatter_add_(1, batch.item, batch.mask.double())
        # r(i) = items whose newest event is later than i's
        ascending = newest.sort(1).values
        later = newest.shape[1] - torch.searchsorted(ascending, newest, right=True)
        # equal ratios give equal float64 quotients (both correctly rounded) and different
        # ones differ by >= 1 / (T + 1)^2: sort by recency, then stably by the ratio, and
        # score by the place in that order
        ratio = torch.where(count > 0, count / (1.0 + later), 0.0)
        by_recency = newest.argsort(dim=1, stable=True)
        order = by_recency.gather(1, ratio.gather(1, by_recency).argsort(dim=1, stable=True))
        place = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return torch.where(count > 0, place.double(), 0.0)


class ItemTransition(Heuristic):
    """First-order next-item counts from the training events, applied to the user's last
    item, backed off to training popularity."""

    def __init__(self, log: EventLog, split: EvalSplit):
        super().__init__(len(log.items))
        train = training_mask(log, split)
        # a pair (j, j+1) is a transition when both are training events of the same user
        pair = train[:-1] & train[1:] & (log.user[:-1] == log.user[1:])
        src, dst = log.item[:-1][pair], log.item[1:][pair]
        keys, counts = np.unique(src * self.num_items + dst, return_counts=True)  # sorted by src
        self.src, self.dst, self.count = keys // self.num_items, keys % self.num_items, counts
        self.pop = training_counts(log, split)

    def transitions(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(successor items, counts) of `item` in the training events."""
        lo, hi = np.searchsorted(self.src, [item, item + 1])
        return self.dst[lo:hi], self.count[lo:hi]

    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        last = batch.item[torch.arange(len(batch.lengths)), batch.lengths - 1].tolist()
        scores = np.tile(self.pop.astype(np.float64), (len(last), 1))  # [B, num_items]
        weight = float(self.pop.max(initial=0) + 1)
        for row, item in enumerate(last):
            dst, count = self.transitions(item)
            scores[row, dst] += count * weight
        return torch.from_numpy(scores).to(batch.item.device)


class LastCategory(nn.Module):
    """Next-category baseline: the category of the user's last event (every other one
    ties behind it)."""

    def __init__(self, num_categories: int):
        super().__init__()
        self.num_categories = num_categories

    def category_scores(self, batch: EventBatch) -> torch.Tensor:
        rows = torch.arange(len(batch.lengths), device=batch.item.device)
        last = batch.category[rows, batch.lengths - 1]
        scores = torch.zeros(len(rows), self.num_categories, dtype=torch.float64)
        return scores.to(batch.item.device).scatter_(1, last[:, None], 1.0)


class FrequentCategories(LastCategory):
    """Next-category baseline: the user's categories by how often they occur in the
    history, ties by recency (its top K are "the user's K most frequent categories")."""

    def category_scores(self, batch: EventBatch) -> torch.Tensor:
        pos, T = _positions(batch)
        shape = (len(pos), self.num_categories)
        newest = torch.zeros(shape, dtype=torch.float64, device=pos.device)
        newest.scatter_reduce_(1, batch.category, pos, "amax")
        count = torch.zeros_like(newest).scatter_add_(1, batch.category, batch.mask.double())
        return torch.where(count > 0, count * (T + 1) + newest, 0.0)


CATEGORY_BASELINES = {
    "repeat last category": LastCategory,
    "most frequent categories": FrequentCategories,
}


def category_baselines(log: EventLog) -> dict[str, LastCategory]:
    """The two next-category baselines a model with a category head is reported beside."""
    return {name: make(len(log.categories)) for name, make in CATEGORY_BASELINES.items()}


HEURISTICS = {
    "recent-items": lambda log, split: RecentItems(len(log.items)),
    "user-frequency": lambda log, split: UserFrequency(len(log.items)),
    "recency-frequency": lambda log, split: RecencyFrequency(len(log.items)),
    "item-transition": ItemTransition,
}


def heuristics(log: EventLog, split: EvalSplit) -> dict[str, Heuristic]:
    """The four heuristic baselines every accuracy table reports, fitted to `split`."""
    return {name: make(log, split) for name, make in HEURISTICS.items()}
