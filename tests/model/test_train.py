"""Training: no leakage, determinism, learning a planted signal, checkpoint round trip."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hytrec.bench.accuracy import Popularity
from hytrec.bench.parity import pad_batch, random_user
from hytrec.model.evaluate import EvalConfig, evaluate, leave_one_out
from hytrec.model.events import EventLog, Vocabulary
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.registry import load_model, most_frequent_category
from hytrec.model.sasrec import SASRec, SASRecConfig
from hytrec.model.train import TrainConfig, train, training_rows

TINY = HyTRecConfig(d_model=32, long_layers=2, softmax_every=2, short_window=8, dropout=0.0)


def planted_log(users=120, categories=8, per_category=6, length=(12, 30), seed=0) -> EventLog:
    """Each user walks the items of one favourite category in a fixed cycle (item k is
    followed by item k+1 of the same category), with 10% random clicks; an hour apart.
    Popularity is flat, so only the sequence predicts the next item."""
    rng = np.random.default_rng(seed)
    n_items = categories * per_category
    cols = {k: [] for k in ("user", "item", "category", "ts")}
    for u in range(users):
        c, k = rng.integers(categories), rng.integers(per_category)
        for t in range(rng.integers(*length)):
            item = c * per_category + k if rng.random() > 0.1 else rng.integers(n_items)
            k = (k + 1) % per_category
            cols["user"].append(u + 1)
            cols["item"].append(item + 1)
            cols["category"].append(item // per_category + 1)
            cols["ts"].append(1_500_000_000 + 3600 * t)
    arr = {k: np.array(v, dtype=np.int64) for k, v in cols.items()}
    return EventLog(
        **arr,
        behavior=np.full(len(arr["user"]), 5, np.int64),
        users=Vocabulary(str(u) for u in range(1, users + 1)),
        items=Vocabulary(str(i) for i in range(1, n_items + 1)),
        categories=Vocabulary(str(c) for c in range(1, categories + 1)),
    )


def test_no_validation_or_test_event_in_the_training_windows():
    log = planted_log(users=40)
    split = leave_one_out(log)
    starts, stops = training_rows(split, max_len=10)
    held_out = set(split.valid_target[split.valid_target >= 0]) | set(
        split.test_target[split.test_target >= 0]
    )
    seen = {i for a, z in zip(starts, stops, strict=True) for i in range(a, z)}
    assert seen and not seen & held_out
    assert (stops - starts <= 11).all()  # the last max_len inputs + 1 target
    # and the validation input stops before its own target, the test input before the test
    assert (
        split.valid_target[split.valid_target >= 0] == split.test_target[split.test_target >= 0] - 1
    ).all()


def test_training_never_reads_a_held_out_event(monkeypatch):
    """Scramble every held-out event: the trained weights must not change."""
    log = planted_log(users=30)
    split = leave_one_out(log)
    tc = TrainConfig(epochs=1, batch_size=16, max_len=12, valid_users=None, seed=3)
    a = dict(train(TINY, log, split, tc, progress=False).model.named_parameters())
    held = np.concatenate([split.valid_target, split.test_target])
    held = held[held >= 0]
    scrambled = EventLog(
        **{k: getattr(log, k).copy() for k in ("user", "item", "category", "behavior", "ts")},
        users=log.users,
        items=log.items,
        categories=log.categories,
    )
    scrambled.item[held] = (scrambled.item[held] % (len(log.items) - 1)) + 1
    # validation reads the scrambled targets, so compare one epoch's weights (no selection)
    b = dict(train(TINY, scrambled, split, tc, progress=False).model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights():
    log = planted_log(users=30)
    split = leave_one_out(log)
    tc = TrainConfig(epochs=2, batch_size=16, max_len=12, valid_users=None, negatives=16, seed=7)
    cfg = HyTRecConfig(d_model=32, long_layers=2, softmax_every=2, short_window=8)  # dropout
    a = train(cfg, log, split, tc, progress=False)
    b = train(cfg, log, split, tc, progress=False)
    assert a.model.version == b.model.version
    assert [(h["loss"], h["valid_NDCG@10"]) for h in a.history] == [
        (h["loss"], h["valid_NDCG@10"]) for h in b.history
    ]
    c = train(cfg, log, split, TrainConfig(**{**tc.__dict__, "seed": 8}), progress=False)
    assert c.model.version != a.model.version


def test_early_stopping_breaks_zero_ndcg_ties_by_mrr(monkeypatch):
    """On a large catalogue the first epochs all score validation NDCG@10 = 0 while the ranks
    improve (Taobao, 55k items): the improvement (MRR) must reset patience and the latest
    model must be kept, not epoch 1's. NDCG@10 still decides when it differs."""
    import hytrec.model.train as train_module

    real = train_module.summarize
    figures = iter([(0.0, 0.001), (0.0, 0.002), (0.0, 0.003), (0.01, 0.0005), (0.01, 0.0004)])

    def scripted(*args, **kwargs):
        report = real(*args, **kwargs)
        ndcg, mrr = next(figures)
        report["overall"].update({"NDCG@10": ndcg, "MRR": mrr})
        return report

    monkeypatch.setattr(train_module, "summarize", scripted)
    log = planted_log(users=16, length=(6, 10))
    tc = TrainConfig(epochs=5, batch_size=16, max_len=8, valid_users=None, patience=1, seed=0)
    result = train(TINY, log, leave_one_out(log), tc, progress=False)
    assert len(result.history) == 5  # epochs 2 and 3 improved MRR; 4 improved NDCG@10
    assert result.best_epoch == 4  # higher NDCG@10 beats higher MRR; epoch 5 ties it, worse
    assert [h["valid_MRR"] for h in result.history] == [0.001, 0.002, 0.003, 0.0005, 0.0004]


def test_hytrec_recovers_the_planted_signal_far_above_popularity(tmp_path):
    log = planted_log()
    split = leave_one_out(log)
    tc = TrainConfig(
        lr=3e-3, epochs=15, batch_size=16, max_len=32, patience=3, valid_users=None, seed=0
    )
    result = train(
        TINY, log, split, tc, out_dir=tmp_path / "ckpt", dataset="planted", progress=False
    )
    model_report = evaluate(result.model, log, split, "test")["overall"]
    popular = evaluate(Popularity(log, split), log, split, "test")["overall"]
    assert popular["HR@10"] < 0.35  # 48 items, flat popularity: about 10/48 by chance
    assert model_report["HR@10"] > 0.75 and model_report["NDCG@10"] > 3 * popular["NDCG@10"]

    # train -> save -> load -> evaluate gives the same figures and the same item categories
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.version == result.model.version
    assert evaluate(loaded, log, split, "test")["overall"] == model_report
    assert torch.equal(loaded.item_category, torch.from_numpy(most_frequent_category(log)))
    extra = loaded.checkpoint_extra
    assert extra["dataset"] == "planted" and extra["train_config"]["seed"] == 0
    assert extra["metrics"]["valid"]["NDCG@10"] == pytest.approx(result.valid["NDCG@10"])


def test_sasrec_trains_saves_and_loads(tmp_path):
    log = planted_log(users=40)
    split = leave_one_out(log)
    cfg = SASRecConfig(d_model=32, max_len=16, dropout=0.0)
    result = train(
        cfg,
        log,
        split,
        TrainConfig(epochs=2, batch_size=16, max_len=16, valid_users=None),
        tmp_path / "s",
        progress=False,
    )
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded, SASRec)
    cfg_eval = EvalConfig(ks=(10,))
    assert (
        evaluate(loaded, log, split, "test", cfg_eval)["overall"]
        == evaluate(result.model, log, split, "test", cfg_eval)["overall"]
    )


def test_sasrec_is_causal_and_bounded():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=50, d_model=16, max_len=12)).eval()
    cfg = HyTRecConfig(num_items=50, num_categories=5)
    g = torch.Generator().manual_seed(0)
    batch = pad_batch([random_user(10, cfg, g), random_user(7, cfg, g)])
    u = model(batch)
    assert u.shape == (2, 10, 16)
    batch.item[0, 6:] = 1  # changing later events leaves earlier vectors alone
    assert torch.allclose(model(batch)[0, :6], u[0, :6])
    assert torch.isneginf(model.score(model.user_vector(batch))[:, 0]).all()
    with pytest.raises(ValueError, match="at most 12"):
        model(pad_batch([random_user(13, cfg, g)]))


def test_most_frequent_category():
    log = planted_log(users=5)
    log.category[:] = 1
    log.category[log.item == log.item[0]] = 2
    cats = most_frequent_category(log)
    assert cats[log.item[0]] == 2 and cats[0] == 0


def test_patience_waits_for_min_epochs(monkeypatch):
    """Every epoch scores the same (a loss plateau): patience 1 stops after epoch 2, unless
    min_epochs holds training until then."""
    import hytrec.model.train as train_module

    real = train_module.summarize

    def flat(*args, **kwargs):
        report = real(*args, **kwargs)
        report["overall"].update({"NDCG@10": 0.0, "MRR": 0.001})
        return report

    monkeypatch.setattr(train_module, "summarize", flat)
    log = planted_log(users=16, length=(6, 10))
    tc = TrainConfig(epochs=6, batch_size=16, max_len=8, valid_users=None, patience=1, seed=0)
    assert len(train(TINY, log, leave_one_out(log), tc, progress=False).history) == 2
    held = replace(tc, min_epochs=4)
    result = train(TINY, log, leave_one_out(log), held, progress=False)
    assert len(result.history) == 4 and result.best_epoch == 1


def test_full_softmax_log_prob_leaves_the_padding_item_out():
    """The fused form (the table without its padding row) equals the log-softmax over every
    item with the padding's logit at -inf, in value and in both gradients."""
    from hytrec.model.base import full_softmax_log_prob

    torch.manual_seed(0)
    user = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    table = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, 30, (50,))
    weights = torch.rand(50, dtype=torch.float64)  # a loss whose gradient differs per row

    def reference(u, e):
        logits = (u @ e.T).clone()
        logits[:, 0] = float("-inf")
        return logits.log_softmax(-1).gather(1, target[:, None])[:, 0]

    got = full_softmax_log_prob(user, table, target)
    want = reference(user, table)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads = torch.autograd.grad((got * weights).sum(), (user, table))
    grads_ref = torch.autograd.grad((want * weights).sum(), (user, table))
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert grads[1][0].abs().max() == 0  # the padding row is never pushed
