"""Full-ranking metrics against hand-computed cases; the leave-one-out split; reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.model.evaluate import (
    EvalConfig,
    ModelReport,
    auc,
    context_length,
    evaluate,
    evaluation_batches,
    history_batch,
    hit_rate,
    leave_one_out,
    mrr,
    ndcg,
    rank_targets,
    ranking_metrics,
    summarize,
    target_ranks,
    write_reports,
)
from hytrec.model.events import EventLog, Vocabulary

RANKS = np.array([0, 1, 9, 10, 49])  # 0-based ranks of five users' targets


def test_hit_rate_by_hand():
    assert hit_rate(RANKS, 10) == pytest.approx(3 / 5)
    assert hit_rate(RANKS, 1) == pytest.approx(1 / 5)
    assert hit_rate(RANKS, 50) == pytest.approx(1.0)


def test_ndcg_by_hand():
    # rank 0 -> 1/log2(2) = 1, rank 1 -> 1/log2(3), rank 9 -> 1/log2(11); ranks 10, 49 miss
    expected = (1.0 + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert ndcg(RANKS, 10) == pytest.approx(expected)
    assert ndcg(RANKS, 1) == pytest.approx(1 / 5)
    assert ndcg(np.array([3]), 10) == pytest.approx(1 / math.log2(5))


def test_mrr_and_auc_by_hand():
    assert mrr(RANKS) == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 50) / 5)
    # 101 candidates: the target beats 100 - r of the other 100
    assert auc(RANKS, np.full(5, 101)) == pytest.approx(np.mean(1 - RANKS / 100))
    assert auc(np.array([0]), np.array([2])) == 1.0 and auc(np.array([1]), np.array([2])) == 0.0


def test_ranking_metrics_keys_and_empty_cohort():
    m = ranking_metrics(RANKS, np.full(5, 101), ks=(10, 50))
    assert list(m) == ["users", "HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR", "AUC"]
    assert m["users"] == 5
    assert math.isnan(ranking_metrics(np.zeros(0), np.zeros(0))["HR@10"])


def test_target_ranks_ties_padding_and_filtering():
    # item 0 is padding; the target (item 1) ties item 3 and trails item 2
    scores = torch.tensor([[99.0, 0.5, 0.9, 0.5, 0.1]])
    target = torch.tensor([1])
    rank, n = target_ranks(scores, target)
    assert rank.item() == 2 and n.item() == 4  # ties count against the model; pad excluded
    exclude = torch.tensor([[False, False, True, False, False]])
    rank, n = target_ranks(scores, target, exclude)
    assert rank.item() == 1 and n.item() == 3
    exclude_target = torch.tensor([[False, True, False, False, False]])
    rank, n = target_ranks(scores, target, exclude_target)
    assert rank.item() == 3 and n.item() == 4  # an excluded target ranks last


def test_target_ranks_refuse_nan_scores():
    """A NaN compares false with everything, so its target would rank -1 (an NDCG of inf):
    refused, naming the rows."""
    scores = torch.tensor([[9.0, 0.2, 0.5], [9.0, float("nan"), 0.1]])
    with pytest.raises(ValueError, match=r"NaN for 1 of 2 users \(rows \[1\]"):
        target_ranks(scores, torch.tensor([1, 2]))


def test_target_ranks_counts_the_candidates_of_each_row():
    scores = torch.tensor([[9.0, 0.2, 0.5, 0.1], [9.0, 0.3, 0.1, 0.9]])
    exclude = torch.tensor([[False, False, True, False], [False, False, False, False]])
    rank, n = target_ranks(scores, torch.tensor([1, 2]), exclude)
    assert rank.tolist() == [0, 2] and n.tolist() == [2, 3]


def test_context_length_is_the_models_bound_capped_by_max_len():
    class Bounded(torch.nn.Module):
        max_len = 50

    assert [context_length(Bounded(), m) for m in (None, 10, 80)] == [50, 10, 50]
    unbounded = torch.nn.Linear(1, 1)
    assert [context_length(unbounded, m) for m in (None, 7)] == [None, 7]


def test_summarize_puts_each_user_in_its_cohort_at_the_boundaries():
    ranked = {
        "rank": np.array([0, 20, 3, 600, 1]),
        "candidates": np.array([101, 41, 11, 1001, 3]),
        "rank_filtered": np.array([1, 1, 1, 1, 1]),
        "candidates_filtered": np.array([3, 3, 3, 3, 3]),
        "history": np.array([1, 20, 21, 501, 5]),
    }
    cfg = EvalConfig(ks=(1, 10), cohorts=((1, 20), (21, 500), (501, None)), cold_start_max=5)
    report = summarize(ranked, cfg)
    cohorts = report["cohorts"]
    assert list(cohorts) == ["1-20", "21-500", "501+", "cold-start (<=5)"]
    assert [c["users"] for c in cohorts.values()] == [3, 1, 1, 2]
    assert list(report["overall"]) == ["users", "HR@1", "HR@10", "NDCG@1", "NDCG@10", "MRR", "AUC"]
    assert all(list(c) == list(report["overall"]) for c in cohorts.values())  # same ks
    # each cohort's AUC uses its own users' candidate counts: users 1, 20, 5
    assert cohorts["1-20"]["AUC"] == pytest.approx(np.mean([1 - 0 / 100, 1 - 20 / 40, 1 - 1 / 2]))
    assert cohorts["21-500"]["HR@10"] == 1.0 and cohorts["501+"]["HR@10"] == 0.0
    filtered = summarize(ranked, EvalConfig(ks=(1, 10), filter_history=True))
    assert filtered["overall"] == ranking_metrics(np.ones(5), np.full(5, 3), (1, 10))


def tiny_log(lengths=(5, 2, 4)) -> EventLog:
    user = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    item = np.arange(1, len(user) + 1) % 7 + 1
    n = len(user)
    return EventLog(
        user=user,
        item=item,
        category=np.ones(n, np.int64),
        behavior=np.ones(n, np.int64),
        ts=np.arange(n, dtype=np.int64),
        users=Vocabulary(str(u) for u in range(1, len(lengths) + 1)),
        items=Vocabulary(str(i) for i in range(1, 9)),
        categories=Vocabulary("c"),
    )


def test_leave_one_out_at_the_boundary():
    """Users of 1, 2 (min_events - 1), 3 (exactly min_events) and 5 events: the last event
    is the test target, the second-to-last the validation target, the rest trains; a user
    below min_events only trains."""
    split = leave_one_out(tiny_log((1, 2, 3, 5)))  # events 0 | 1 2 | 3 4 5 | 6 7 8 9 10
    assert split.start.tolist() == [0, 1, 3, 6]
    assert split.train_stop.tolist() == [1, 3, 4, 9]
    assert split.valid_target.tolist() == [-1, -1, 4, 9]
    assert split.test_target.tolist() == [-1, -1, 5, 10]
    start, target = split.targets("valid")
    assert start.tolist() == [3, 6] and target.tolist() == [4, 9]
    start, target = split.targets("test")
    assert start.tolist() == [3, 6] and target.tolist() == [5, 10]
    # min_events moves the boundary: 5 events are enough for 5, 3 are not
    split = leave_one_out(tiny_log((3, 5, 4)), min_events=5)
    assert split.test_target.tolist() == [-1, 7, -1]
    assert split.valid_target.tolist() == [-1, 6, -1]
    assert split.train_stop.tolist() == [3, 6, 12]
    empty = leave_one_out(tiny_log((2, 1)))
    assert empty.targets("test")[1].tolist() == [] and empty.train_stop.tolist() == [2, 3]
    with pytest.raises(ValueError, match="min_events must be >= 3"):
        leave_one_out(tiny_log((2, 2)), min_events=2)  # validation would have no input


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12),
    st.integers(min_value=3, max_value=6),
)
def test_leave_one_out_has_no_leakage(lengths, min_events):
    """Against a per-user reading of the definition, for any user lengths."""
    log = tiny_log(tuple(lengths))
    split = leave_one_out(log, min_events)
    assert len(split.start) == len(lengths)
    training = np.zeros(len(log), dtype=bool)
    position = 0
    for row, n in enumerate(lengths):
        stop = position + n
        assert split.start[row] == position
        if n >= min_events:  # last event tests, the one before validates, the rest trains
            assert (split.valid_target[row], split.test_target[row]) == (stop - 2, stop - 1)
            assert split.train_stop[row] == stop - 2
        else:
            assert (split.valid_target[row], split.test_target[row]) == (-1, -1)
            assert split.train_stop[row] == stop
        training[position : split.train_stop[row]] = True
        position = stop
    for which in ("valid", "test"):
        start, target = split.targets(which)
        assert not training[target].any()  # no target is a training event
        assert (log.user[start] == log.user[target]).all() and (start < target).all()
    _, valid = split.targets("valid")
    _, test = split.targets("test")
    assert np.array_equal(test, valid + 1)  # test input = training events + valid target
    assert training.sum() == len(log) - 2 * len(test)


def test_history_batch_keeps_the_last_events_and_excludes_the_target():
    log = tiny_log()
    batch = history_batch(log, np.array([0, 7]), np.array([4, 10]), max_len=2)
    assert batch.lengths.tolist() == [2, 2]
    assert batch.item.tolist() == [log.item[2:4].tolist(), log.item[8:10].tolist()]
    full = history_batch(log, np.array([0, 7]), np.array([4, 10]))
    assert full.lengths.tolist() == [4, 3] and full.item[1, 3].item() == 0  # right-padded
    for column in (full.item, full.category, full.behavior, full.ts, full.lengths):
        assert column.dtype == torch.int64  # ids index embeddings; ts keeps its seconds


@settings(max_examples=200, deadline=None)
@given(
    reads=st.lists(st.integers(1, 400), max_size=60),
    users=st.integers(1, 20),
    tokens=st.integers(1, 2_000),
)
def test_evaluation_batches_hold_each_user_once_within_both_bounds(reads, users, tokens):
    reads = np.array(reads, dtype=np.int64)
    cfg = EvalConfig(batch_size=users, batch_tokens=tokens)
    batches = evaluation_batches(reads, cfg)
    assert sorted(np.concatenate(batches).tolist() if batches else []) == list(range(len(reads)))
    for batch in batches:
        assert 1 <= len(batch) <= users
        longest = reads[batch].max()
        # a user longer than the token bound goes alone; no batch is cut earlier than needed
        assert len(batch) * longest <= tokens or len(batch) == 1
        assert np.all(np.diff(reads[batch]) >= 0)  # similar lengths together, ascending
    for before, after in zip(batches, batches[1:], strict=False):
        grown = len(before) + 1
        assert grown > users or grown * reads[after[0]] > tokens  # it did not fit


def test_ranks_do_not_depend_on_how_users_are_batched():
    """The same ranks, each at its user in the split's order, whatever the batches (one user
    each, a token bound that splits them unevenly, everyone together): a model whose ranks
    differ from user to user, so a user given another's result would show."""
    from hytrec.model.hytrec import HyTRecConfig
    from hytrec.model.registry import build_model

    log = tiny_log((9, 4, 12, 5, 7, 3, 10))
    split = leave_one_out(log)
    torch.manual_seed(0)
    model = build_model(HyTRecConfig(d_model=16, long_layers=2, softmax_every=2), log)
    ranks = [
        rank_targets(model, log, split, "test", EvalConfig(batch_size=b, batch_tokens=n))
        for b, n in ((1, 10_000), (256, 17), (256, 10_000))
    ]
    assert len(set(ranks[0]["rank"].tolist())) > 2  # users differ
    starts, targets = split.targets("test")
    assert ranks[0]["history"].tolist() == (targets - starts).tolist()
    for other in ranks[1:]:
        for key, values in ranks[0].items():
            assert other[key].tolist() == values.tolist(), key


class _Oracle(torch.nn.Module):
    """Knows the answer: the target item of each test row scores highest."""

    def __init__(self, log: EventLog, answer: dict[int, int]):
        super().__init__()
        self.n, self.answer, self.log = len(log.items), answer, log
        self.table = torch.nn.Parameter(torch.eye(len(log.items)))

    def user_vector(self, batch):
        # one-hot of the answer for the row whose last input event is known
        last = batch.item[torch.arange(len(batch.lengths)), batch.lengths - 1]
        return torch.stack([self.table[self.answer[int(i)]] for i in last])

    def item_table(self):
        return self.table

    def score(self, u):
        s = u @ self.table.T
        s[..., 0] = float("-inf")
        return s


def test_evaluate_an_oracle_and_write_reports(tmp_path):
    log = tiny_log((6, 6))
    split = leave_one_out(log)
    _, targets = split.targets("test")
    answer = {int(log.item[t - 1]): int(log.item[t]) for t in targets}
    report = evaluate(_Oracle(log, answer), log, split, "test", EvalConfig())
    assert report["overall"]["MRR"] == 1.0 and report["overall"]["AUC"] == 1.0
    assert report["cohorts"]["1-20"]["users"] == 2
    assert report["protocol"]["history_items"] == "kept"
    paths = write_reports(
        [ModelReport("oracle", report)], tmp_path / "r", "oracle", {"command": "test"}
    )
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text())["models"]["oracle"]["overall"]["MRR"] == 1.0
    assert "| oracle |" in paths[1].read_text()


def test_evaluate_reports_the_other_protocol_beside_the_chosen_one():
    log = tiny_log((8, 6, 7))  # the first user's test target repeats its first item
    split = leave_one_out(log)
    _, targets = split.targets("test")
    model = _Oracle(log, {int(log.item[t - 1]): int(log.item[t]) for t in targets})
    kept = evaluate(model, log, split)  # the test targets, history items kept
    removed = evaluate(model, log, split, "test", EvalConfig(filter_history=True))
    assert kept["protocol"]["targets"] == "test"
    assert kept["overall_history_filtered"] == removed["overall"]
    assert removed["overall_unfiltered"] == kept["overall"]
    assert kept["overall"]["MRR"] == 1.0 > removed["overall"]["MRR"]  # a repeat is a miss
