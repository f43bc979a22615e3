"""HSTU: the KV-cache stream against the parallel form, causality, the window and the cache's
eviction, one block against an independent implementation of its equations, gradients, and
its registry line and zoo row."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hytrec.bench.accuracy import model_zoo
from hytrec.bench.hstu_parity import (
    block_vs_independent_equations_max_abs,
    future_events_move_earlier_outputs_max_abs,
    pad_invariance_max_abs,
    random_users,
    randomised,
    stream_vs_last_window_forward_max_abs,
)
from hytrec.bench.parity import pad_batch, stream_vs_parallel_max_abs
from hytrec.model.batch import EventBatch
from hytrec.model.evaluate import context_length
from hytrec.model.hstu import HSTU, HSTUConfig, time_bucket
from hytrec.model.registry import describe, spec


def small(**overrides) -> HSTU:
    """N = 8, so that histories of tens of events slide the window and evict."""
    cfg = HSTUConfig(num_items=300, d_model=16, heads=2, max_len=8)
    return randomised(replace(cfg, **overrides), seed=0)


def users_of(model: HSTU, lengths, seed: int = 0):
    return random_users(model.cfg, lengths, torch.Generator().manual_seed(seed))


@torch.no_grad()
def served(model: HSTU, user, runs) -> tuple[torch.Tensor, object]:
    """One user's events applied to slot 1 of a fresh state in runs of these sizes: the
    vector after the last run and the state."""
    state, slot, start = model.new_state(3), torch.tensor([1]), 0
    for size in runs:
        vector = model.step(state, slot, pad_batch([user.run(start, start + size)]))
        start += size
    assert start == len(user)
    return vector[0], state


# ---------------------------------------------------------------------------- stream vs parallel


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_streaming_one_event_at_a_time_and_in_micro_batches_equals_the_parallel_form(layers):
    model = small(layers=layers)
    users = users_of(model, (1, 5, 17, 40))  # two histories longer than N = 8
    assert stream_vs_parallel_max_abs(model, users, max_batch=1) <= 1e-5
    assert stream_vs_parallel_max_abs(model, users, max_batch=40, seed=1) <= 1e-5


def test_a_run_longer_than_the_cache_in_one_step_equals_the_parallel_form():
    model = small()
    user = users_of(model, (45,))[0]
    with torch.no_grad():
        expected = model(pad_batch([user]))[0, -1]
    for runs in ((45,), (3, 20, 1, 21), (8, 8, 8, 8, 8, 5)):
        vector, _ = served(model, user, runs)
        assert (vector - expected).abs().max() <= 1e-5, runs


# ---------------------------------------------------------------------------- window and cache


def test_the_cache_holds_the_last_max_len_events_keys_values_and_times():
    model = small()
    user = users_of(model, (20,))[0]
    _, state = served(model, user, (6, 1, 13))
    assert int(state.count[1]) == 20 and int(state.last_ts[1]) == int(user.ts[-1])
    assert torch.equal(state.times[1], user.ts[-8:])
    with torch.no_grad():  # layer 0's keys and values depend on their own event only
        _, v, _, k = model.blocks[0].project(model.embed(user.item[-8:]))
    assert (state.keys[0][1] - k).abs().max() <= 1e-6
    assert (state.values[0][1] - v).abs().max() <= 1e-6
    assert not state.keys[0][0].any() and not state.count[0]  # other slots untouched


def test_an_event_beyond_the_reach_of_the_cache_moves_nothing_and_one_within_it_does():
    # two layers of window N = 8: the vector after event 19 reads events 19 - 2 * 7 = 5..19
    model = small()
    user = users_of(model, (20,))[0]
    base, _ = served(model, user, (1,) * 20)
    for event, moves in ((4, False), (5, True)):
        changed = user.run(0, 20)
        changed.item = user.item.clone()
        changed.item[event] = user.item[event] % 299 + 1
        vector, _ = served(model, changed, (1,) * 20)
        gap = (vector - base).abs().max().item()
        # two hops at the window's edge carry little (7e-6 here), but exactly 0 is no reach
        assert (gap > 1e-6) if moves else (gap == 0.0), (event, gap)


def test_with_one_layer_the_served_vector_is_forward_over_the_last_max_len_events():
    model = small(layers=1)
    assert stream_vs_last_window_forward_max_abs(model, users_of(model, (30, 19)), every=1) <= 1e-5


def test_with_two_layers_the_served_vector_reaches_past_the_last_max_len_events():
    model = small()
    assert stream_vs_last_window_forward_max_abs(model, users_of(model, (30,)), every=1) > 1e-3


# ---------------------------------------------------------------------------- the equations


def test_each_block_computes_the_hstu_equations():
    assert block_vs_independent_equations_max_abs() <= 1e-6


def test_changing_later_events_moves_no_earlier_output():
    model = small()
    users = users_of(model, (30, 9, 2, 17))
    assert future_events_move_earlier_outputs_max_abs(model, users) == 0.0


def test_right_padding_changes_nothing():
    model = small()
    assert pad_invariance_max_abs(model, users_of(model, (30, 9, 2))) <= 1e-6


def test_only_time_gaps_matter_not_the_clock():
    model = small()
    batch = pad_batch(users_of(model, (25, 7)))
    later = EventBatch(batch.item, batch.category, batch.behavior, batch.ts + 10**9, batch.lengths)
    with torch.no_grad():
        assert torch.equal(model(later)[batch.mask], model(batch)[batch.mask])


def test_time_buckets_are_the_references_log_buckets():
    gaps = torch.tensor([0, 1, 2, -2, 60, 3_600, 86_400, 10**17])
    # floor(ln(max(|g|, 1)) / 0.301): ln 2 = 0.693, ln 60 = 4.094, ln 3600 = 8.189,
    # ln 86400 = 11.367; 10^17 s is past bucket 128
    assert time_bucket(gaps, 128).tolist() == [0, 0, 2, 2, 13, 27, 37, 128]


def test_user_vectors_are_unit_and_scores_are_cosines_over_the_temperature():
    model = small()
    batch = pad_batch(users_of(model, (12, 3)))
    with torch.no_grad():
        norms = model(batch)[batch.mask].norm(dim=-1)
    assert (norms - 1).abs().max() <= 1e-6
    u = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    table = model.item_emb.weight
    cosines = u @ torch.nn.functional.normalize(table, dim=-1).T
    assert torch.allclose(model.score(u)[:, 1:], cosines[:, 1:] / 0.05, atol=1e-5)


def test_gradients_reach_every_parameter_and_no_bias_of_a_later_key():
    model = small().train()
    batch = pad_batch(users_of(model, (20, 6)))
    out = model(batch)[batch.mask]
    model.score(out)[:, 1:].logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    N = model.cfg.max_len
    for block in model.blocks:  # p[N - 1 + s - t]: s > t is never read by a causal model
        assert block.rel_pos.grad[:N].all() and not block.rel_pos.grad[N:].any()


# ---------------------------------------------------------------------------- interface


def test_state_bytes_at_the_default_size():
    # 2 layers x (K and V) x 200 events x 64 fp32, their 200 timestamps, count and last time
    assert HSTU(HSTUConfig()).state_bytes_per_user() == 2 * 2 * 200 * 64 * 4 + 200 * 8 + 16
    assert HSTU(HSTUConfig()).state_bytes_per_user() == 206_416


def test_a_training_model_refuses_to_step():
    model = small().train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model.step(model.new_state(2), torch.tensor([0]), pad_batch(users_of(model, (3,))))


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="divisible by heads"):
        HSTUConfig(d_model=10, heads=3)
    with pytest.raises(ValueError, match="temperature"):
        HSTUConfig(temperature=0.0)


def test_hstu_is_registered_streams_one_vector_and_sits_in_the_zoo():
    line = spec("hstu")
    assert line.model is HSTU and line.config is HSTUConfig
    assert line.streams and line.query == "single" and line.fidelity == "code"
    assert {row["name"]: row for row in describe()}["hstu"]["fidelity"] == "code"
    assert model_zoo(d_model=32, max_len=77)["HSTU"] == HSTUConfig(d_model=32, max_len=77)
    # no bound of its own: the harness evaluates it over the whole history, as it is served
    assert context_length(small(), None) is None and context_length(small(), 500) == 500


def test_check_parity_runs_the_hstu_report(monkeypatch, capsys, tmp_path):
    from hytrec import cli
    from hytrec.bench import hstu_parity

    monkeypatch.setattr(hstu_parity, "parity_report", lambda seed: {"seed": seed})
    out = tmp_path / "parity.json"
    assert (
        cli.main(["check", "parity", "--model", "hstu", "--seed", "3", "--output", str(out)]) == 0
    )
    assert json.loads(capsys.readouterr().out) == {"seed": 3}
    assert json.loads(out.read_text()) == {"seed": 3}
