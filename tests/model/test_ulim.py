"""ULIM: P(c) is a distribution with the pointer-generator's limits, the serving slots give
the training form's interests and P(c) after every event, eviction is counted, and the
cascade gates items by the top categories."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hytrec.bench.parity import UserEvents
from hytrec.bench.ulim_parity import stream_vs_parallel_max_abs
from hytrec.model.batch import EventBatch
from hytrec.model.repeat import RepeatConfig
from hytrec.model.ulim import ULIM, ULIMConfig

# the user term and cross interest on: the default (off) is their W_u = W_x = 0 case (and
# `ulim_parity`'s first config)
CFG = ULIMConfig(
    num_items=80,
    num_categories=9,
    d_model=16,
    slots=8,
    slot_len=4,
    short_len=2,
    window=3,
    user_term=True,
    cross_interest=True,
)


def model_of(cfg: ULIMConfig = CFG, seed: int = 0) -> ULIM:
    torch.manual_seed(seed)
    model = ULIM(cfg)
    model.item_category.copy_(torch.randint(1, cfg.num_categories, (cfg.num_items,)))
    with torch.no_grad():
        # far from the near-zero initial values, where every category's a^c is the same
        for emb in (model.item_emb, model.category_emb, model.behavior_emb):
            emb.weight.normal_(std=0.5)
        for term in (model.user_to_interest, model.cross_to_interest):
            if term is not None:  # W_u and W_x start at 0: test them non-zero
                term.weight.normal_(std=0.2)
    return model.eval()


def random_batch(lengths: list[int], cfg: ULIMConfig = CFG, seed: int = 0) -> EventBatch:
    """Right-padded random users; categories 1..C-1, times rising with repeats."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    real = torch.arange(T)[None] < lens[:, None]

    def draw(low, high):
        return torch.randint(low, high, (B, T), generator=g) * real

    gaps = torch.randint(0, 3, (B, T), generator=g) ** 9  # many 0 s gaps, some long ones
    ts = (10**9 + gaps.cumsum(1)) * real
    return EventBatch(draw(1, cfg.num_items), draw(1, cfg.num_categories), draw(1, 10), ts, lens)


def prefix(batch: EventBatch, row: int, stop: int) -> EventBatch:
    return EventBatch(
        *(getattr(batch, f)[row : row + 1, :stop] for f in ("item", "category", "behavior", "ts")),
        lengths=torch.tensor([stop]),
    )


def test_p_of_c_is_a_distribution_with_the_pointer_generator_limits():
    model, batch = model_of(), random_batch([12, 5, 1])
    with torch.no_grad():
        p = model.category_scores(batch).exp()
        np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-6)
        touched = torch.zeros_like(p, dtype=torch.bool)
        for row, n in enumerate(batch.lengths.tolist()):
            touched[row, batch.category[row, :n]] = True
        model.copy_switch.bias.fill_(50.0)  # p_gen -> 1: the generator alone
        generated = model.category_scores(batch).exp()
        assert generated[:, 0].max() < 1e-20 and (generated[:, 1:] > 0).all()
        model.copy_switch.bias.fill_(-50.0)  # p_gen -> 0: every bit of mass on the slots
        copied = model.category_scores(batch).exp()
        np.testing.assert_allclose(copied.sum(-1).numpy(), 1.0, atol=1e-6)
        assert (copied[~touched] < 1e-20).all()  # an untouched category gets no copy mass
        assert (copied[touched] > 0).all()
    no_pointer = model_of(ULIMConfig(**{**CFG.__dict__, "pointer": False}))
    with torch.no_grad():
        np.testing.assert_allclose(
            no_pointer.category_scores(batch).exp().sum(-1).numpy(), 1.0, atol=1e-6
        )


def users_of(batch: EventBatch) -> list[UserEvents]:
    return [
        UserEvents(*(getattr(batch, f)[row, :n] for f in ("item", "category", "behavior", "ts")))
        for row, n in enumerate(batch.lengths.tolist())
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_training_form_after_every_event(seed):
    """One event at a time and in random micro-batches (users interleaved in one shared
    state), the slots give the training form's u^c of each event's category and P(c) over
    every category, at every position; fixed runs give the same state either way (the kept
    interests to float rounding)."""
    model = model_of(seed=seed)
    lengths = [17, 9, 1, 13]
    batch = random_batch(lengths, seed=seed)
    for max_batch in (1, 5):
        worst = stream_vs_parallel_max_abs(model, users_of(batch), max_batch, seed)
        assert worst <= 1e-5, (max_batch, worst)
    state = model.new_state(6)
    slots = torch.tensor([4, 0, 5, 2])
    for t in range(max(lengths)):
        rows = [r for r, n in enumerate(lengths) if n > t]
        step = EventBatch(
            *(getattr(batch, f)[rows, t : t + 1] for f in ("item", "category", "behavior", "ts")),
            lengths=torch.ones(len(rows), dtype=torch.long),
        )
        model.step(state, slots[rows], step)
    assert int((state.slot_key > 0).sum(1).max()) <= CFG.slots
    # mixed micro-batches: runs of several events per user in one call
    mixed = model.new_state(6)
    for lo, hi in ((0, 3), (3, 4), (4, 11), (11, 17)):
        rows = [r for r, n in enumerate(lengths) if n > lo]
        runs = torch.tensor([min(hi, lengths[r]) - lo for r in rows])
        run_batch = EventBatch(
            *(getattr(batch, f)[rows, lo:hi] for f in ("item", "category", "behavior", "ts")),
            lengths=runs,
        )
        model.step(mixed, slots[rows], run_batch)
    for name, tensor in state.parts().items():
        if tensor.is_floating_point():  # the kept interests, formed in other batches
            torch.testing.assert_close(mixed.parts()[name], tensor, rtol=0, atol=1e-6)
        else:
            assert torch.equal(mixed.parts()[name], tensor), name
    with torch.no_grad():
        offline = model.user_vector(batch)
        served = model.step(model.new_state(4), torch.arange(4), batch)
    np.testing.assert_allclose(offline.numpy(), served.numpy(), atol=1e-6)


def test_a_read_forms_again_only_the_interests_of_slots_that_took_events():
    """The state keeps each slot's u^c: a step leaves exactly the slot of each new event
    stale, the read brings it up to date, and every kept interest equals one formed afresh
    from its slot's events, also for slots evicted and taken by another category."""
    cfg = replace(CFG, slots=3)  # these users touch up to 8 categories
    model = model_of(cfg)
    lengths = [17, 9, 13]
    batch = random_batch(lengths, cfg, seed=3)
    state, slots = model.new_state(3), torch.arange(3)
    for t in range(max(lengths)):
        rows = [r for r, n in enumerate(lengths) if n > t]
        step = EventBatch(
            *(getattr(batch, f)[rows, t : t + 1] for f in ("item", "category", "behavior", "ts")),
            lengths=torch.ones(len(rows), dtype=torch.long),
        )
        model.apply_events(state, slots[rows], step)
        assert state.slot_stale[rows].sum(1).tolist() == [1] * len(rows), t
        model.read_state(state, slots[rows])
        assert not state.slot_stale.any(), t
    assert int(state.evictions.sum()) > 0
    kept = model.read_state(state, slots)
    state.slot_stale |= state.slot_key > 0  # forget every kept interest
    afresh = model.read_state(state, slots)
    torch.testing.assert_close(kept.slot_interest, afresh.slot_interest, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.log_p, afresh.log_p, rtol=0, atol=1e-6)


def test_parity_breaks_when_a_changed_slot_keeps_its_old_interest():
    """The parity figure sees a stale interest: a stream that never marks slots stale."""
    model = model_of()
    users = users_of(random_batch([17, 9], seed=4))
    apply_events = model.apply_events

    def unmarked(state, slots, batch):
        apply_events(state, slots, batch)
        state.slot_stale[slots] = False

    model.apply_events = unmarked
    assert stream_vs_parallel_max_abs(model, users, 1) > 1e-3


def test_slots_beyond_the_cap_evict_the_least_frequent_and_are_counted():
    cfg = ULIMConfig(**{**CFG.__dict__, "slots": 2})
    model = model_of(cfg)
    # categories 1, 1, 2, 3: slot of 2 (one event, older than none) goes when 3 arrives
    cats = torch.tensor([[1, 1, 2, 3]])
    batch = EventBatch(
        torch.tensor([[5, 6, 7, 8]]),
        cats,
        torch.ones(1, 4, dtype=torch.long),
        torch.tensor([[10**9, 10**9 + 1, 10**9 + 2, 10**9 + 3]]),
        torch.tensor([4]),
    )
    state = model.new_state(1)
    model.apply_events(state, torch.tensor([0]), batch)
    assert sorted((state.slot_key[0] - 1).tolist()) == [1, 3]
    assert int(state.evictions[0]) == 1
    assert state.slot_count[0].tolist() == [2, 1]


def test_cascade_gates_by_the_top_categories_and_reduces_to_per_category_scoring():
    model, batch = model_of(), random_batch([10, 6, 3])
    with torch.no_grad():
        read = model.readout(batch)
        gated = model.cascade_scores(read, top_k=2)
        top = read.log_p.topk(2, -1).indices
        inside = (model.item_category[None, :, None] == top[:, None, :]).any(-1)
        inside[:, 0] = False
        assert torch.isneginf(gated[~inside]).all() and torch.isfinite(gated[inside]).all()
        # K = all, the dot merge, no log P: u^{cat(x)} . e_x, each item with its own
        # category's interest
        plain = model.cascade_scores(read, top_k=None, use_log_p=False, within_category=False)
        cats = model.item_category.expand(len(batch.lengths), -1)
        u = model.category_interests(read, cats)  # [B, N, d]
        expected = (u * model.item_table()[None]).sum(-1)
        np.testing.assert_allclose(plain[:, 1:].numpy(), expected[:, 1:].numpy(), atol=1e-5)
        with_p = model.cascade_scores(read, top_k=None, within_category=False)
        np.testing.assert_allclose(
            (with_p - plain)[:, 1:].numpy(), read.log_p[:, cats[0]][:, 1:].numpy(), atol=1e-5
        )
        oracle = model.cascade_scores(read, top_k=None, oracle=torch.tensor([1, 2, 3]))
        of_oracle = model.item_category[None] == torch.tensor([[1], [2], [3]])
        assert (torch.isfinite(oracle)[:, 1:] == of_oracle[:, 1:]).all()  # 0: padding, -inf
        assert torch.isneginf(oracle[:, 0]).all()


def test_the_item_loss_reads_the_interest_serving_forms_for_the_next_category():
    """The item loss's vector at position t (`_target_interests`: u^{c*} + W_u s + W_x a^{c*},
    c* the category of event t + 1) is what serving forms after event t for c*."""
    model, batch = model_of(), random_batch([9, 6, 2])
    real = torch.arange(8)[None] < (batch.lengths - 1)[:, None]  # [B, T-1]
    with torch.no_grad():
        trained = model._target_interests(batch, model.forward_all(batch), real)[0]
        served = []
        for row, stop in real.nonzero().tolist():
            read = model.readout(prefix(batch, row, stop + 1))
            target = batch.category[row, stop + 1].view(1, 1)
            served.append(model.category_interests(read, target)[0, 0])
    torch.testing.assert_close(trained, torch.stack(served), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ring", [1, 4, 12])
def test_the_read_out_after_every_position_is_the_read_out_of_each_ring(ring):
    """`NewestQueryReadout.forward_every` (a band of one [T, T] attention) equals `forward`
    over each position's ring of its last events, built as copies; padded positions read 0.
    Rings shorter and longer than the rows."""
    from hytrec.model.ulim import NewestQueryReadout

    torch.manual_seed(0)
    readout = NewestQueryReadout(8, ring)
    with torch.no_grad():
        readout.age.weight.normal_()
    x = torch.randn(3, 9, 8)
    lengths = torch.tensor([9, 5, 1])
    real = torch.arange(9)[None] < lengths[:, None]
    with torch.no_grad():
        every = readout.forward_every(x, real)
        offsets = torch.arange(9)[:, None] - torch.arange(ring - 1, -1, -1)  # [T, ring]
        valid = (offsets >= 0)[None] & real[:, :, None]
        rings = x[:, offsets.clamp(min=0)] * valid[..., None]  # [B, T, ring, d]
        each = readout(rings.view(-1, ring, 8), valid.view(-1, ring)).view(3, 9, 8)
    torch.testing.assert_close(every, each, rtol=0, atol=1e-5)
    assert (every[~real] == 0).all()


def test_cascade_scores_do_not_depend_on_the_chunking(monkeypatch):
    """The (user, item) pairs are scored in chunks; chunks of a few pairs (a slot's items
    split from its neighbours', the cross interest's dots user by user) give the same
    scores as one chunk, and the within-category
    form is the per-category log-softmax of the plain one."""
    from hytrec.model import ulim

    model, batch = model_of(), random_batch([10, 6, 3])
    with torch.no_grad():
        read = model.readout(batch)

        def variants():
            return [
                model.cascade_scores(read, top_k=2),
                model.cascade_scores(read, top_k=None, within_category=True),
                model.cascade_scores(read, top_k=3, within_category=True),
                model.cascade_scores(read, top_k=None, oracle=torch.tensor([1, 2, 3])),
            ]

        whole = variants()
        monkeypatch.setattr(ulim, "CASCADE_CHUNK", 5)
        monkeypatch.setattr(ulim, "CROSS_CHUNK", 1)  # one user at a time
        for a, b in zip(whole, variants(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        plain = model.cascade_scores(read, top_k=None, use_log_p=False, within_category=False)
        cats = model.item_category
        for c in cats[1:].unique().tolist():
            members = (cats == c).nonzero()[:, 0]
            members = members[members > 0]
            expected = plain[:, members].log_softmax(-1) + read.log_p[:, c : c + 1]
            torch.testing.assert_close(whole[1][:, members], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("negatives", [0, 16])
def test_joint_loss_is_finite_and_trains(negatives, head):
    cfg = replace(CFG, repeat_head=RepeatConfig(buffer_size=6)) if head else CFG
    model = model_of(cfg, seed=3).train()
    batch = random_batch([15, 9, 4, 2], seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        g = torch.Generator().manual_seed(0)
        loss, positions = model.training_loss(batch, negatives, g)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(float(loss))
    assert positions == 14 + 8 + 3 + 1
    assert losses[-1] < 0.8 * losses[0]


def test_evaluate_reports_next_category_metrics_and_the_baselines_rank_by_rule():
    """`evaluate` adds category_metrics for a model with a category head; the two category
    baselines rank exactly by their rules (checked against a loop over each user)."""
    from hytrec.model.evaluate import EvalConfig, evaluate, leave_one_out, rank_categories
    from hytrec.model.heuristics import category_baselines
    from hytrec.model.synthetic import SyntheticConfig, generate

    log = generate(
        SyntheticConfig(
            users=30, min_events=10, max_events=40, categories=6, items_per_category=10, seed=4
        )
    )
    split = leave_one_out(log)
    model = ULIM(
        ULIMConfig(num_items=len(log.items), num_categories=len(log.categories), d_model=16)
    ).eval()
    report = evaluate(model, log, split, "test", EvalConfig())
    metrics = report["category_metrics"]
    assert metrics["users"] == report["overall"]["users"] and 0 <= metrics["MRR"] <= 1
    assert metrics["HR@1"] <= metrics["HR@5"] <= metrics["HR@20"] == 1.0  # 5 categories
    baselines = category_baselines(log)
    last = rank_categories(baselines["repeat last category"], log, split, "test")
    frequent = rank_categories(baselines["most frequent categories"], log, split, "test")
    starts, targets = split.targets("test")
    for row, (a, z) in enumerate(zip(starts, targets, strict=True)):
        history, target = log.category[a:z], log.category[z]
        assert (last[row] == 0) == (history[-1] == target)
        cats, counts = np.unique(history, return_counts=True)
        newest = {c: max(np.flatnonzero(history == c)) for c in cats}
        order = sorted(cats, key=lambda c: (-counts[cats == c][0], -newest[c]))
        expected = order.index(target) if target in order else None
        if expected is not None:
            assert frequent[row] == expected, row
        else:  # an unseen category ties with every other unseen one, behind all
            assert frequent[row] == len(log.categories) - 2


def test_parity_breaks_when_the_slots_forget_a_category():
    """The parity figure can fail: a stream that drops the slots' counts is detected."""
    model = model_of()
    users = users_of(random_batch([17, 9], seed=4))
    assert stream_vs_parallel_max_abs(model, users, 1) <= 1e-5
    apply_events = model.apply_events

    def forgetful(state, slots, batch):
        apply_events(state, slots, batch)
        state.slot_count[slots] = state.slot_count[slots].clamp(max=1)

    model.apply_events = forgetful
    assert stream_vs_parallel_max_abs(model, users, 1) > 1e-3


def test_parity_report_meets_the_issue_thresholds():
    from hytrec.bench.ulim_parity import CONFIG, parity_report

    report = parity_report(cfg=replace(CONFIG, num_items=300, d_model=16), lengths=(1, 6, 40))
    assert report["fidelity"] == "reading"
    assert report["stream_vs_parallel_max_abs"] <= 1e-5
    assert report["p_of_c_sum_max_abs_error"] <= 1e-6
    for name in ("ulim", "ulim_without_pointer", "ulim_user_term_cross_interest"):
        assert report[name]["share_of_users_hitting_the_cap"] == 0.0
        assert report[name]["share_of_users_hitting_a_cap_of_8"] > 0.0


@pytest.mark.parametrize("top_k", [None, 2])
def test_the_merge_decides_what_the_cascade_ranks_by(top_k):
    """Without the head, ranking is the cascade under the config's merge: "joint" (the
    default) log P(c) P(x | c), a distribution over the items (its mass over the top K
    categories is P of them), "dot" log P(c) + u^c . e_x."""
    batch = random_batch([10, 6, 3])
    joint = model_of(replace(CFG, top_categories=top_k))
    dot = model_of(replace(CFG, top_categories=top_k, merge="dot"))
    with torch.no_grad():
        read = joint.readout(batch)
        mass = read.log_p.exp() if top_k is None else read.log_p.exp().topk(top_k, -1).values
        ranked = joint.rank_scores(batch)
        np.testing.assert_allclose(ranked.exp().sum(-1).numpy(), mass.sum(-1).numpy(), atol=1e-5)
        torch.testing.assert_close(ranked, joint.cascade_scores(read, top_k, within_category=True))
        by_dot = dot.rank_scores(batch)
        torch.testing.assert_close(by_dot, dot.cascade_scores(read, top_k, within_category=False))
        assert not torch.allclose(ranked[:, 1:], by_dot[:, 1:])
    with pytest.raises(ValueError, match="merge"):
        replace(CFG, merge="sum")


HEAD_CFG = replace(CFG, repeat_head=RepeatConfig(buffer_size=6))


def test_the_heads_explore_side_is_the_cascades_distribution():
    """With the head, the cascade's scores are log P(c) P(x | c): they sum to 1 over the
    items, to P(top K categories) when gated; the head's ranking sums to 1 too."""
    model, batch = model_of(HEAD_CFG), random_batch([12, 5, 1], HEAD_CFG)
    with torch.no_grad():
        read = model.readout(batch)
        full = model.cascade_scores(read, None, within_category=True).exp()
        np.testing.assert_allclose(full.sum(-1).numpy(), 1.0, atol=1e-5)
        gated = model.cascade_scores(read, 2, within_category=True).exp()
        top_mass = read.log_p.exp().topk(2, -1).values.sum(-1)
        np.testing.assert_allclose(gated.sum(-1).numpy(), top_mass.numpy(), atol=1e-5)
        # within a category the order is the dot merge's (the engine's searches rely on it)
        plain = model.cascade_scores(read, None, within_category=False)
        in_cat = model.item_category == 3
        assert torch.equal(
            full[:, in_cat].argsort(-1, descending=True),
            plain[:, in_cat].argsort(-1, descending=True),
        )
        np.testing.assert_allclose(model.rank_scores(batch).exp().sum(-1).numpy(), 1.0, atol=1e-5)


def test_the_sampled_within_category_estimate_is_exact_when_every_item_is_drawn_once():
    """log P(target | c*) from in-category draws with the log(n_c / S_c) shift equals the
    exact softmax over c*'s items when the draws are c*'s items, each once (the target's
    own draw masked); a wrong shift or mask breaks it."""
    model = model_of(HEAD_CFG)
    torch.manual_seed(1)
    u = torch.randn(3, HEAD_CFG.d_model)
    target = torch.tensor([5, 17, 40])
    category = model.item_category[target]
    exact = model._within_category_log_prob(u, target, category)
    for p in range(3):
        inside = (model.item_category == category[p]).nonzero()[:, 0]
        inside = inside[inside > 0][None]  # [1, n_c]: every item of c* once
        draws = (inside, inside == target[p], torch.tensor([inside.shape[1]]))
        estimate = model._within_category_log_prob(
            u[p : p + 1], target[p : p + 1], category[p : p + 1], draws
        )
        torch.testing.assert_close(estimate, exact[p : p + 1], atol=1e-5, rtol=0)
    assert (exact < 0).all()


@pytest.mark.parametrize("top_categories", [None, 2])
def test_the_head_reads_in_training_what_it_reads_in_ranking(top_categories):
    """The mixture's log P(target) at the last input position, from the training form (the
    head's loss), equals log P(target) of the ranking after the same events (no dropout,
    full softmax): train/serve parity of ULIM + head. Gated to the top K categories, the
    ranking leaves the others' items out without renormalising the rest (training's gate
    is learnt against the ungated explore side): equal for a target of the likeliest
    category."""
    cfg = replace(HEAD_CFG, dropout=0.0, top_categories=top_categories)
    model = model_of(cfg, seed=2)
    with torch.no_grad():
        model.repeat_head.gate[2].bias.fill_(0.4)
        model.repeat_head.copy_out.weight.normal_()
    batch = random_batch([14, 9, 6], cfg, seed=2)
    # each event of an item in the item's category (ranking reads the table's)
    batch = replace(batch, category=model.item_category[batch.item] * batch.mask)
    B, T = batch.item.shape
    if top_categories is not None:  # each target an item of the likeliest category
        for row in range(B):
            n = int(batch.lengths[row])
            with torch.no_grad():
                likeliest = model.category_scores(prefix(batch, row, n - 1))[0].argmax()
            batch.item[row, n - 1] = (model.item_category == likeliest).nonzero()[-1, 0]
            batch.category[row, n - 1] = likeliest
    real = torch.arange(T - 1)[None] < (batch.lengths - 1)[:, None]
    with torch.no_grad():
        out = model.forward_all(batch)
        u_target = model._target_interests(batch, out, real)[0]
        log_mix = model._mixture_log_prob(batch, out, real, u_target, None)
        flat_row = real.nonzero()[:, 0]
        for row in range(B):
            n = int(batch.lengths[row])
            last = (flat_row == row).nonzero()[-1, 0]  # position n - 2: predicts event n - 1
            ranked = model.rank_scores(prefix(batch, row, n - 1))[0]
            torch.testing.assert_close(
                log_mix[last], ranked[batch.item[row, n - 1]], atol=1e-4, rtol=0
            )
