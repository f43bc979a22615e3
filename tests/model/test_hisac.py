"""HiSAC (`model/hisac.py`): activation against a brute force written from the rule (a
valid tree cut), routing weights that sum to 1, hard routing as the mean of the agent's own
behaviours, the serving map against the training form, the cap, the multi-interest max,
and a codebook of another vocabulary refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.bench.hisac_parity import codebook_for, randomised, users_for
from hytrec.bench.parity import pad_batch, streamed_user_vectors
from hytrec.model.codebook import SemanticIdsError, vocabulary_hash
from hytrec.model.events import Vocabulary
from hytrec.model.hisac import HiSAC, HiSACConfig, HiSACMulti, HiSACMultiConfig, activate
from hytrec.model.repeat import RepeatConfig

N = 200


@pytest.fixture(scope="module")
def codebook():
    return codebook_for(N, sizes=(5, 3, 3), route_top=3, seed=0)


def brute_force_agents(votes: dict, parent: dict, level: dict, beams, n_min) -> set:
    """The rule, with sets and sorted(): top-B_1 voted level-1 nodes with n >= n_min (none:
    the most voted), then each active node's top-B_l children with n >= n_min; agents are
    the active nodes without an active child."""

    def top(nodes, b):
        return sorted(nodes, key=lambda p: (-votes[p], p))[:b]

    seen = [p for p in votes if votes[p] > 0]
    first = [p for p in seen if level[p] == 1]
    active = set(top([p for p in first if votes[p] >= n_min], beams[0]))
    if not active and first:
        active = set(top(first, 1))
    for lv in range(2, len(beams) + 1):
        for q in [p for p in active if level[p] == lv - 1]:
            children = [p for p in seen if parent[p] == q and votes[p] >= n_min]
            active |= set(top(children, beams[lv - 1]))
    return {p for p in active if not any(parent[c] == p for c in active)}


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 12)),
    beams=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    n_min=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_activation_matches_the_brute_force_and_is_a_tree_cut(sizes, beams, n_min, seed):
    rng = np.random.default_rng(seed)
    level, parent, start = {}, {}, 0
    previous: list[int] = []
    for lv, size in enumerate(sizes, 1):
        for p in range(start, start + size):
            level[p] = lv
            parent[p] = int(rng.choice(previous)) if previous else -1
        previous = list(range(start, start + size))
        start += size
    votes = {p: int(rng.integers(0, 5)) for p in level}
    node = torch.tensor([list(votes)])
    count = torch.tensor([[votes[p] for p in votes]])
    node_level = torch.tensor([level[p] for p in sorted(level)])
    node_parent = torch.tensor([parent[p] for p in sorted(parent)])
    mask = activate(node, count, count > 0, node_level, node_parent, beams, n_min)
    got = {int(p) for p in node[mask]}
    assert got == brute_force_agents(votes, parent, level, beams, n_min)
    # a tree cut: no agent is another's ancestor, every agent's ancestors have votes
    for p in got:
        q = parent[p]
        while q >= 0:
            assert q not in got and votes[q] > 0
            q = parent[q]


def model_of(cls, cfg_cls, codebook, **overrides):
    return randomised(cls(cfg_cls(num_items=N, d_model=16, **overrides), codebook=codebook))


@pytest.mark.parametrize("cls,cfg_cls", [(HiSAC, HiSACConfig), (HiSACMulti, HiSACMultiConfig)])
def test_stream_matches_the_training_form_under_the_cap(cls, cfg_cls, codebook):
    model = model_of(cls, cfg_cls, codebook, beams=(3, 2, 2), node_cap=512)
    users = users_for(model, (1, 3, 12, 40), seed=1)
    parallel = model(pad_batch(users))
    for max_batch in (1, 16):
        state_check = {}

        def readout(state, slots, vectors, seen=state_check):
            seen["evictions"] = int(state.evictions.sum())
            return vectors

        streamed = streamed_user_vectors(model, users, max_batch, seed=2, readout=readout)
        worst = max(
            (vector - parallel[u, t]).abs().max().item()
            for u in range(len(users))
            for t, vector in streamed[u].items()
        )
        assert worst <= 1e-5 and state_check["evictions"] == 0


def test_routing_weights_sum_to_one_and_hard_routing_is_the_mean_of_own_behaviours(codebook):
    soft = model_of(HiSAC, HiSACConfig, codebook)
    users = users_for(soft, (5, 30), seed=3)
    batch = pad_batch(users)
    route = soft.routing(batch)
    sums = route.alpha.sum(-1)
    present = route.agents >= 0
    assert present.any() and (sums[present] - 1).abs().max() <= 1e-6
    assert (sums[~present] == 0).all()
    # soft routing reaches behaviours outside the agent's own subtree (other routes)
    hard = model_of(HiSAC, HiSACConfig, codebook, routing="hard")
    assert hard.cfg.route_top == 1
    h_route = hard.routing(batch)
    assert torch.equal(h_route.agents, route.agents)  # votes do not depend on routing
    b, t = 1, len(users[1]) - 1
    items = batch.item[b, : t + 1]
    outside = 0  # soft weight on behaviours outside the agent's own subtree
    for m, p in enumerate(h_route.agents[b, t].tolist()):
        if p < 0:
            continue
        level = int(hard.node_level[p]) - 1
        own = hard.item_routes[items, level, 0] == p  # the behaviours of p's subtree
        assert torch.allclose(h_route.alpha[b, t, m, : t + 1], own / own.sum(), atol=1e-6)
        # soft: exp(<mu(p), s_i> / tau) over the behaviours with p among their routes
        routes, logits = soft.item_routes[items, level], soft.item_route_logit[items, level]
        reach = (routes == p).any(1)
        x = torch.where(routes == p, logits, 0.0).sum(1) / soft.cfg.temperature
        want = torch.where(reach, (x - x[reach].max()).exp(), 0.0)
        assert torch.allclose(route.alpha[b, t, m, : t + 1], want / want.sum(), atol=1e-6)
        outside += int((reach & ~own).sum())
    assert outside > 0


def test_a_small_cap_evicts_and_counts_it(codebook):
    model = model_of(HiSAC, HiSACConfig, codebook, node_cap=8)
    users = users_for(model, (40,), seed=4)
    state = model.new_state(1)
    model.step(state, torch.tensor([0]), pad_batch(users))
    assert int(state.evictions[0]) > 0 and int((state.node_key[0] > 0).sum()) == 8


def capped_map_by_hand(model: HiSAC, items: list[int], cap: int) -> tuple[list, int]:
    """The map's rule in plain Python: ([(node, votes) per entry, None when empty],
    evictions). Per event, the routes to nodes the map holds count first (an own route, the
    first of its level, adds a vote); then each new node, in route order, takes the first
    empty entry, else evicts the least voted (the first of them)."""
    entries, evictions = [None] * cap, 0
    for item in items:
        routes = model.item_routes[item].tolist()  # [levels][R]
        flat = [(node, r == 0) for level in routes for r, node in enumerate(level) if node >= 0]
        held = {e[0]: at for at, e in enumerate(entries) if e is not None}
        new = []
        for node, own in flat:
            if node in held:
                entries[held[node]] = (node, entries[held[node]][1] + own)
            else:
                new.append((node, own))
        for node, own in new:
            empty = [at for at, e in enumerate(entries) if e is None]
            at = empty[0] if empty else min(range(cap), key=lambda a: (entries[a][1], a))
            evictions += not empty
            entries[at] = (node, int(own))
    return entries, evictions


@pytest.mark.parametrize("cap", [8, 20, 64])
def test_a_capped_map_keeps_and_evicts_the_nodes_the_rule_says(codebook, cap):
    model = model_of(HiSAC, HiSACConfig, codebook, node_cap=cap)
    users = users_for(model, (40, 25, 3), seed=cap)
    state = model.new_state(3)
    for m in range(0, 40, 7):  # runs of up to 7 events per call, as micro-batches bring them
        run = pad_batch([u.run(m, m + 7) for u in users])
        if int(run.lengths.max()) > 0:
            model.apply_events(state, torch.arange(3), run)
    for row, user in enumerate(users):
        entries, evictions = capped_map_by_hand(model, user.item.tolist(), cap)
        keys = [(-1 if e is None else e[0]) for e in entries]
        votes = [(0 if e is None else e[1]) for e in entries]
        assert (state.node_key[row] - 1).tolist() == keys
        assert state.node_votes[row].tolist() == votes
        assert int(state.evictions[row]) == evictions
    assert int(state.evictions[0]) > 0 or cap == 64  # the long user overflows the small caps


def test_multi_interest_scores_are_the_max_over_agents(codebook):
    model = model_of(HiSACMulti, HiSACMultiConfig, codebook)
    batch = pad_batch(users_for(model, (6, 25), seed=5))
    scores = model.rank_scores(batch)
    read = model.readout(batch)[0]
    assert scores.shape == (2, N) and read.vectors.shape == (2, model.cfg.max_agents, 16)
    table = model.item_table()
    for row in range(2):
        agents = read.vectors[row][read.present[row]]
        want = (agents @ table.T).amax(0)
        assert torch.allclose(scores[row, 1:], want[1:], atol=1e-5)
    assert scores[:, 0].eq(float("-inf")).all()


def test_a_codebook_of_another_vocabulary_is_refused(codebook):
    items = Vocabulary(f"i{i}" for i in range(1, N))
    codebook.meta["items_hash"] = vocabulary_hash(["<pad>", "other"])
    try:
        with pytest.raises(SemanticIdsError, match="another item vocabulary"):
            HiSAC(HiSACConfig(num_items=N), items, codebook=codebook)
    finally:
        del codebook.meta["items_hash"]


@pytest.mark.parametrize("name,head", [("hisac", False), ("hisac", True), ("hisacmulti", False)])
def test_both_variants_train_and_rank_through_the_harness(name, head, codebook, tmp_path):
    from hytrec.model.evaluate import EvalConfig, leave_one_out, rank_targets
    from hytrec.model.registry import spec
    from hytrec.model.train import TrainConfig, train
    from tests.model.test_registry import tiny_log

    log = tiny_log(users=12, length=15, items=N)
    codebook.save(tmp_path / "sids")
    cfg = spec(name).config(d_model=8, semantic_ids=str(tmp_path / "sids"))
    if head:
        cfg = replace(cfg, repeat_head=RepeatConfig(buffer_size=8))
    split = leave_one_out(log)
    result = train(
        cfg, log, split, TrainConfig(epochs=2, batch_size=4, negatives=16), progress=False
    )
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert result.model.cfg.num_nodes == codebook.num_nodes  # read from the directory
    ranked = rank_targets(result.model, log, split, "test", EvalConfig(), "cpu")
    assert len(ranked["rank"]) == 12 and ranked["rank"].min() >= 0 and ranked["rank"].max() < N


def test_parity_report_meets_the_issue_thresholds():
    from hytrec.bench.hisac_parity import parity_report

    report = parity_report(num_items=300, lengths=(1, 6, 30))
    assert report["fidelity"] == "reading"
    assert report["stream_vs_parallel_max_abs"] <= 1e-5
    assert report["routing_weights_sum_max_abs_error"] <= 1e-6
    for name in ("hisac", "hisac_mi"):
        assert report[name]["share_of_users_hitting_the_cap"] == 0.0
        assert report[name]["share_of_users_hitting_a_cap_of_64"] > 0.0


def test_last_events_keeps_each_rows_newest_events_right_padded():
    from hytrec.model.hisac import last_events

    users = users_for(model_of(HiSAC, HiSACConfig, None), (3, 9, 14), seed=6)
    cropped = last_events(pad_batch(users), 5)
    assert cropped.lengths.tolist() == [3, 5, 5]
    for row, user in enumerate(users):
        n = min(5, len(user))
        assert cropped.item[row, :n].tolist() == user.item[-n:].tolist()
        assert cropped.ts[row, :n].tolist() == user.ts[-n:].tolist()
        assert (cropped.item[row, n:] == 0).all()


def test_the_one_route_at_a_time_path_gives_the_same_state(codebook, monkeypatch):
    model = model_of(HiSAC, HiSACConfig, codebook, node_cap=256)
    batch = pad_batch(users_for(model, (7, 33), seed=7))
    slots = torch.arange(2)
    fast = model.new_state(2)
    model.apply_events(fast, slots, batch)
    free_slots = HiSAC._free_slots

    def never_room(*args):
        slot, new, room = free_slots(*args)
        return slot, new, torch.zeros_like(room)

    monkeypatch.setattr(HiSAC, "_free_slots", staticmethod(never_room))
    slow = model.new_state(2)
    model.apply_events(slow, slots, batch)
    assert int(fast.evictions.sum()) == int(slow.evictions.sum()) == 0
    for name, tensor in fast.parts().items():
        assert torch.allclose(tensor.float(), slow.parts()[name].float(), atol=1e-6), name
