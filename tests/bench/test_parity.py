"""Train/serve parity: the streaming step reproduces the parallel form's user vectors."""

from __future__ import annotations

import pytest
import torch

from hytrec.bench.parity import (
    chunked_vs_reference,
    parity_report,
    random_user,
    repeat_head_stream_vs_parallel_max_abs,
    revisiting_user,
    stream_vs_parallel_max_abs,
    streamed_user_vectors,
    with_repeat_head,
)
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.model.recgrela import RecGRELA, RecGRELAConfig
from hytrec.model.repeat import RepeatConfig
from hytrec.model.sasrec import SASRec, SASRecConfig

TOLERANCE = 1e-4  # fp32, max abs over every element of every user vector compared

VARIANTS = {
    "default": {},
    "moe-fusion": {"fusion": "moe"},
    "tadn-only": {"use_short": False, "softmax_every": 0},
    "softmax-only": {"softmax_every": 1, "long_layers": 2},
    "ratio-1to1": {"softmax_every": 2},
    "no-decay": {"state_decay": False, "erase_tau": False},
    "untied-short-window-3": {"tie_item_embeddings": False, "short_window": 3, "long_window": 5},
}


def model_for(overrides: dict, seed: int = 0) -> HyTRec:
    torch.manual_seed(seed)
    cfg = HyTRecConfig(num_items=400, num_categories=30, **overrides)
    model = HyTRec(cfg).eval()
    # trained-looking gates and periods, not just their initial values
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_logit", "static_logit", "period_raw")):
                p.add_(torch.randn_like(p))
    return model


def users(cfg: HyTRecConfig, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [random_user(n, cfg, generator) for n in lengths]


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_stream_equals_parallel_one_event_at_a_time(variant):
    model = model_for(VARIANTS[variant])
    history = users(model.cfg, [1, 2, 7, 31, 64, 150])
    assert stream_vs_parallel_max_abs(model, history, max_batch=1) <= TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("max_batch", [5, 64, 500])
def test_stream_equals_parallel_in_mixed_micro_batches(variant, max_batch):
    model = model_for(VARIANTS[variant])
    history = users(model.cfg, [1, 3, 20, 47, 120, 256], seed=max_batch)
    assert stream_vs_parallel_max_abs(model, history, max_batch, seed=max_batch) <= TOLERANCE


@pytest.mark.slow
def test_stream_equals_parallel_for_long_random_histories():
    """Histories of 1..600 events, random timestamps, behaviours and categories."""
    model = model_for({})
    generator = torch.Generator().manual_seed(11)
    lengths = [1, 600] + torch.randint(1, 601, (6,), generator=generator).tolist()
    history = users(model.cfg, lengths, seed=11)
    assert stream_vs_parallel_max_abs(model, history, max_batch=1, seed=1) <= TOLERANCE
    assert stream_vs_parallel_max_abs(model, history, max_batch=97, seed=2) <= TOLERANCE


def test_every_event_of_every_user_is_answered_once():
    model = model_for({})
    history = users(model.cfg, [5, 9, 13])
    streamed = streamed_user_vectors(model, history, max_batch=4)
    for user, vectors in zip(history, streamed, strict=True):
        assert max(vectors) == len(user) - 1  # the last answer follows the newest event


def test_parity_breaks_when_the_stream_forgets_state():
    """The parity check can fail: wiping a user's state mid-stream is detected."""
    model = model_for({})
    history = users(model.cfg, [40])
    state = model.new_state(2)
    slot = torch.tensor([0])
    from hytrec.bench.parity import pad_batch, parallel_user_vectors

    with torch.no_grad():
        model.step(state, slot, pad_batch([history[0].run(0, 20)]))
        state.reset(slot)
        last = model.step(state, slot, pad_batch([history[0].run(20, 40)]))
    expected = parallel_user_vectors(model, history)[0][-1]
    assert (last[0] - expected).abs().max() > 100 * TOLERANCE


def test_parity_report_keys_and_bounds():
    report = parity_report()
    assert report["stream_vs_parallel_max_abs"] <= TOLERANCE
    assert report["step_vs_reference_max_abs"] <= 1e-5
    assert report["chunked_vs_reference_max_abs_scaled"] <= 1e-5
    assert 600 in report["history_lengths"]
    assert report["state_bytes_per_user"] <= 64 * 1024
    assert report["repeat_head_stream_vs_parallel_max_abs"] <= TOLERANCE
    assert report["state_bytes_per_user"] < report["state_bytes_per_user_with_repeat_head"]
    assert report["state_bytes_per_user_with_repeat_head"] <= 64 * 1024


def test_chunked_vs_reference_figure_is_scaled_fp32_error():
    abs_err, scaled = chunked_vs_reference(lengths=(5, 70), chunk_sizes=(8,))
    assert 0 < scaled <= abs_err and scaled <= 1e-5


@pytest.mark.parametrize("kind", ["hytrec", "sasrec", "recgrela"])
@pytest.mark.parametrize("max_batch", [1, 64])
def test_the_repeat_heads_log_p_streamed_equals_the_offline_ranking(kind, max_batch):
    """log P(i) at the candidates (buffer items and the top 20), after every run of events
    served through `step` and the state's buffer, equals the offline forward's."""
    cfg = HyTRecConfig(num_items=400, num_categories=30)
    head = RepeatConfig(buffer_size=20)  # smaller than the users' 30 items: evictions
    torch.manual_seed(0)
    if kind == "hytrec":
        model = with_repeat_head(cfg, head=head)
    elif kind == "recgrela":
        model = RecGRELA(RecGRELAConfig(num_items=400, d_model=32, repeat_head=head)).eval()
    else:
        model = SASRec(SASRecConfig(num_items=400, max_len=64, repeat_head=head)).eval()
    generator = torch.Generator().manual_seed(max_batch)
    lengths = [1, 2, 17, 63]  # SASRec's offline form reads at most max_len events
    history = [revisiting_user(n, cfg, generator, distinct=30) for n in lengths]
    assert repeat_head_stream_vs_parallel_max_abs(model, history, max_batch) <= TOLERANCE
