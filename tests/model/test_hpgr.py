"""HPGR: sessions as `data.sessionize` cuts them, PGSA's selection against a brute force,
sparse vs dense, causality, the KV-cache stream against the parallel form, the pre-trained
relevance table, checkpoints and the registry line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.bench.hpgr_parity import (
    randomised,
    revisiting_users,
    selection_mismatches,
    sparse_with_k_at_least_T_vs_dense_max_abs,
)
from hytrec.bench.hstu_parity import future_events_move_earlier_outputs_max_abs, random_users
from hytrec.bench.parity import pad_batch, stream_vs_parallel_max_abs
from hytrec.model.data import sessionize
from hytrec.model.evaluate import history_batch
from hytrec.model.hpgr import HPGR, HPGRConfig, batch_sessions, preference_selection
from hytrec.model.hstu import HSTU, HSTUConfig
from hytrec.model.registry import describe, load_model, spec
from tests.test_data import log_of

# N = 8, w = 2, k = 3: histories of tens of events slide the window, and the random gaps (a
# second to two weeks) give sessions of a few events at a 3,000 s gap
SMALL = HPGRConfig(
    num_items=300, d_model=16, heads=2, max_len=8, top_k=3, recent=2, session_gap_s=3000
)


def small(**overrides) -> HPGR:
    return randomised(replace(SMALL, **overrides), seed=0)


def users_of(model: HPGR, lengths, seed: int = 0):
    return random_users(model.cfg, lengths, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- sessions


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 10_000), min_size=1, max_size=30).map(sorted),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 3_000),
)
def test_batch_sessions_equal_sessionize_on_the_log(histories, gap):
    log = log_of(histories)
    session, position = sessionize(log, gap)
    starts = np.r_[0, np.cumsum([len(h) for h in histories])[:-1]]
    stops = starts + [len(h) for h in histories]
    batch = history_batch(log, starts, stops)
    got_session, got_position, got_gap = batch_sessions(batch, gap)
    for row, (a, z) in enumerate(zip(starts, stops, strict=True)):
        n = z - a
        assert got_session[row, :n].tolist() == session[a:z].tolist()
        assert got_position[row, :n].tolist() == position[a:z].tolist()
        assert got_gap[row, :n].tolist() == [0, *np.diff(log.ts[a:z]).tolist()]


# ---------------------------------------------------------------------------- PGSA


def test_selection_equals_a_brute_force_top_k_with_ties_to_the_newest():
    model = small(max_len=12, top_k=3, recent=2)
    # 8 distinct items over 60 events: equal relevances everywhere
    users = revisiting_users(model.cfg, (1, 9, 30, 60), torch.Generator().manual_seed(3), 8)
    assert selection_mismatches(model, users) == 0
    assert selection_mismatches(small(top_k=None), users_of(model, (20,))) == 0


def test_ties_go_to_the_newest_key_and_only_candidates_are_chosen():
    relevance = torch.tensor([[[0.5, 0.9, 0.5, 0.5, 0.1]]])
    candidates = torch.tensor([[[True, True, True, True, False]]])
    chosen = preference_selection(relevance, candidates, 2)
    assert chosen[0, 0].tolist() == [False, True, False, True, False]
    assert preference_selection(relevance, candidates, 9).equal(candidates)


def test_each_query_keeps_its_last_w_events_and_k_more():
    model = small(max_len=12, top_k=3, recent=2)
    selected = model.selected_keys(pad_batch(users_of(model, (40,))))[0]
    counts = selected.sum(-1)
    assert counts[:6].tolist() == [1, 2, 3, 4, 5, 5] and (counts[5:] == 5).all()
    assert not selected.triu(1).any()  # never a later key
    rows = torch.arange(40)
    assert selected[rows, rows].all() and selected[rows[1:], rows[:-1]].all()


def test_sparse_with_k_at_least_the_history_equals_dense_attention():
    model = small(max_len=64)
    assert sparse_with_k_at_least_T_vs_dense_max_abs(model, users_of(model, (3, 17, 50))) <= 1e-6


def test_sparse_attention_differs_from_dense_when_it_drops_keys():
    model = small()
    users = users_of(model, (40,))
    dense = HPGR(replace(model.cfg, top_k=None)).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (model(pad_batch(users)) - dense(pad_batch(users))).abs().max() > 1e-3


def test_future_events_move_no_earlier_output():
    for model in (small(), small(top_k=None)):
        users = users_of(model, (2, 17, 40))
        assert future_events_move_earlier_outputs_max_abs(model, users) == 0.0


# ---------------------------------------------------------------------------- serving


@pytest.mark.parametrize("layers,top_k", [(1, 3), (2, 3), (2, None)])
def test_stream_one_event_at_a_time_and_in_micro_batches_equals_the_parallel_form(layers, top_k):
    model = small(layers=layers, top_k=top_k)
    users = users_of(model, (1, 5, 17, 40))
    assert stream_vs_parallel_max_abs(model, users, max_batch=1) <= 1e-5
    assert stream_vs_parallel_max_abs(model, users, max_batch=40, seed=1) <= 1e-5


@torch.no_grad()
def test_a_run_longer_than_the_cache_in_one_step_equals_the_parallel_form_and_keeps_sessions():
    model = small()
    user = users_of(model, (45,))[0]
    expected = model(pad_batch([user]))[0, -1]
    session, position, _ = batch_sessions(pad_batch([user]), model.cfg.session_gap_s)
    for runs in ((45,), (3, 20, 1, 21), (8, 8, 8, 8, 8, 5)):
        state, slot, start = model.new_state(3), torch.tensor([1]), 0
        for size in runs:
            vector = model.step(state, slot, pad_batch([user.run(start, start + size)]))
            start += size
        assert (vector[0] - expected).abs().max() <= 1e-5, runs
        assert torch.equal(state.items[1], user.item[-8:])
        assert torch.equal(state.sessions[1], session[0, -8:])
        assert int(state.session[1]) == int(session[0, -1])
        assert int(state.position[1]) == int(position[0, -1])


def test_without_the_session_module_the_stream_still_equals_the_parallel_form():
    model = small(session_module=False)
    assert model.position_emb is None and model.blocks[0].rel_session is None
    assert stream_vs_parallel_max_abs(model, users_of(model, (5, 40)), max_batch=7) <= 1e-5


# ---------------------------------------------------------------------------- pre-trained table


def test_a_pretrained_relevance_table_is_required_copied_and_frozen(tmp_path):
    model = HPGR(replace(SMALL, selection="pretrained"))
    batch = pad_batch(users_of(model, (12,)))
    with pytest.raises(RuntimeError, match="--init-from"):
        model(batch)
    source = HSTU(HSTUConfig(num_items=300, d_model=16, heads=2, max_len=8))
    model.start_from(source)
    assert torch.equal(model.item_emb.weight, source.item_emb.weight)
    assert torch.equal(model.relevance_table(), source.item_emb.weight)
    model.train()
    model(batch).sum().backward()
    assert "pretrained_items" not in dict(model.named_parameters())  # a buffer: never trained
    assert model.item_emb.weight.grad is not None
    loaded = load_model(model.save(tmp_path / "ckpt"))
    assert torch.equal(loaded.relevance_table(), source.item_emb.weight)
    with pytest.raises(ValueError, match="vocabulary or width"):
        model.start_from(HSTU(HSTUConfig(num_items=301, d_model=16, heads=2, max_len=8)))


def test_gradients_reach_the_session_bias_and_position_embedding():
    model = small()
    model.train()
    model(pad_batch(users_of(model, (30,)))).sum().backward()
    assert model.blocks[0].rel_session.grad.abs().sum() > 0
    assert model.position_emb.weight.grad.abs().sum() > 0


def test_registry_line_and_checkpoint_round_trip(tmp_path):
    line = spec("hpgr")
    assert line.fidelity == "reading" and line.streams and line.config is HPGRConfig
    assert {"name": "hpgr", "fidelity": "reading"}.items() <= next(
        d for d in describe() if d["name"] == "hpgr"
    ).items()
    model = small()
    loaded = load_model(model.save(tmp_path / "ckpt"))
    assert type(loaded) is HPGR and loaded.cfg == model.cfg and loaded.version == model.version


# ---------------------------------------------------------------------------- check parity


def test_parity_report_meets_the_issue_s_bounds_on_a_small_model():
    from hytrec.bench.hpgr_parity import parity_report

    report = parity_report(seed=1, cfg=SMALL, lengths=(1, 5, 17, 40))
    assert report["fidelity"] == "reading"
    assert report["stream_vs_parallel_max_abs"] <= 1e-4
    assert report["selection_vs_brute_force_mismatches"] == 0
    assert report["sparse_k_at_least_T_vs_dense_max_abs"] <= 1e-6
    assert report["future_events_move_earlier_outputs_max_abs"] == 0.0


def test_check_parity_model_hpgr_prints_and_writes_the_report(monkeypatch, tmp_path, capsys):
    import json

    from hytrec import cli
    from hytrec.bench import hpgr_parity

    monkeypatch.setattr(hpgr_parity, "parity_report", lambda seed: {"seed": seed})
    out = tmp_path / "parity.json"
    assert (
        cli.main(["check", "parity", "--model", "hpgr", "--seed", "3", "--output", str(out)]) == 0
    )
    assert json.loads(capsys.readouterr().out) == {"seed": 3}
    assert json.loads(out.read_text()) == {"seed": 3}
