"""RecGRELA: the kernel reuse, RoPE, the causal reading's invariances and streaming, and the
reference mode against an independent implementation of the authors' equations."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hytrec.bench.parity import pad_batch, random_user, stream_vs_parallel_max_abs
from hytrec.bench.recgrela_parity import (
    _randomised,
    authors_equations,
    kernel_vs_naive_linear_attention_max_abs,
    naive_linear_attention,
    reference_mode_vs_equations_max_abs,
)
from hytrec.kernels import Backend, tadn_parallel, tadn_step
from hytrec.model.batch import EventBatch
from hytrec.model.recgrela import RecGRELA, RecGRELAConfig, rotate

ABLATIONS = {
    "published": {},
    "no-gate": {"gate": False},
    "no-conv": {"conv": False},
    "no-rope": {"rope": False},
    "side-features": {"side_features": True},
    "one-layer": {"layers": 1},
}


def small(**overrides) -> RecGRELA:
    cfg = RecGRELAConfig(num_items=400, num_categories=30, d_model=32, heads=4, **overrides)
    return _randomised(cfg, seed=0)


def users_of(model, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [random_user(n, model.cfg, generator) for n in lengths]


def padded(batch: EventBatch, extra: int) -> EventBatch:
    return EventBatch(
        *(F.pad(getattr(batch, n), (0, extra)) for n in ("item", "category", "behavior", "ts")),
        lengths=batch.lengths,
    )


# ---------------------------------------------------------------------------- kernels


def test_every_torch_tadn_form_with_erase_0_decay_0_beta_1_is_causal_linear_attention():
    assert kernel_vs_naive_linear_attention_max_abs() <= 1e-5


def test_the_kernel_check_sees_a_wrong_numerator():
    q, k, v = (F.elu(torch.randn(1, 9, 2, 4)) + 1 for _ in range(3))
    ones, zeros = torch.ones(1, 9, 2), torch.zeros(1, 9, 2)
    decayed, _ = tadn_parallel(q, k, v, ones, zeros, zeros - 0.1, backend="torch")
    assert (decayed - naive_linear_attention(q, k, v)).abs().max() > 1e-2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("T", [1, 7, 33])
def test_triton_forms_are_causal_linear_attention(T):
    g = torch.Generator().manual_seed(T)
    q, k, v = (F.elu(torch.randn(2, T, 2, 8, generator=g)) + 1 for _ in range(3))
    ones, zeros = torch.ones(2, T, 2), torch.zeros(2, T, 2)
    expected = naive_linear_attention(q, k, v)
    chunked, _ = tadn_parallel(q, k, v, ones, zeros, zeros, chunk_size=16, backend="triton")
    stepped = tadn_step(
        torch.zeros(4, 2, 8, 8),
        torch.tensor([2, 0]),
        torch.full((2,), T),
        q,
        k,
        v,
        ones,
        zeros,
        zeros,
        backend=Backend.TRITON,
    )
    scale = expected.abs().max()
    assert (chunked - expected).abs().max() <= 1e-5 * scale
    assert (stepped - expected).abs().max() <= 1e-5 * scale


# ---------------------------------------------------------------------------- RoPE


def test_rope_depends_only_on_the_distance_between_positions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 50, 64, generator=g, dtype=torch.float64)
    m, n, c = (torch.randint(0, 100_000, (50,), generator=g) for _ in range(3))
    near = (rotate(a, m, 1e4) * rotate(b, n, 1e4)).sum(-1)
    far = (rotate(a, m + c, 1e4) * rotate(b, n + c, 1e4)).sum(-1)
    assert (near - far).abs().max() < 1e-9
    assert (rotate(a, m, 1e4) - a).abs().max() > 0.1  # it does rotate


def test_rope_turns_pair_2i_2i_plus_1_by_position_times_base_power_over_the_full_width():
    D, position = 16, 7
    x = torch.randn(1, D, dtype=torch.float64)
    got = rotate(x, torch.tensor([position]), 10_000.0)
    for i in range(D // 2):
        angle = position * 10_000.0 ** (-i / (D // 2))
        z = complex(x[0, 2 * i], x[0, 2 * i + 1]) * complex(math.cos(angle), math.sin(angle))
        assert got[0, 2 * i].item() == pytest.approx(z.real, abs=1e-12)
        assert got[0, 2 * i + 1].item() == pytest.approx(z.imag, abs=1e-12)


def test_rope_keeps_fp32_accuracy_at_positions_in_the_millions():
    x = torch.randn(4, 64)
    positions = torch.tensor([3_000_000, 12_345_678, 7, 999_999_999])
    exact = rotate(x.double(), positions, 1e4)
    assert (rotate(x, positions, 1e4).double() - exact).abs().max() < 1e-5


# ---------------------------------------------------------------------------- the model


@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_streaming_one_event_at_a_time_and_in_micro_batches_equals_the_parallel_form(overrides):
    model = small(**overrides)
    users = users_of(model, (1, 5, 17, 70))
    assert stream_vs_parallel_max_abs(model, users, max_batch=1) <= 1e-4
    assert stream_vs_parallel_max_abs(model, users, max_batch=40, seed=1) <= 1e-4


def test_the_ablations_change_the_model():
    users = users_of(small(), (30,))
    with torch.no_grad():
        base = small()(pad_batch(users))
        for name, overrides in ABLATIONS.items():
            if overrides:
                other = small(**overrides)(pad_batch(users))
                assert (other - base).abs().max() > 1e-3, name


def test_right_padding_changes_nothing_in_the_causal_form_and_does_in_the_reference_form():
    for causal, expect_equal in ((True, True), (False, False)):
        model = small(causal=causal)
        batch = pad_batch(users_of(model, (30, 12)))
        with torch.no_grad():
            base = model(batch)
            more = model(padded(batch, 17))[:, : base.shape[1]]
        gap = (more - base)[batch.mask].abs().max().item()
        assert (gap <= 1e-6) if expect_equal else (gap > 1e-3), (causal, gap)


def test_shifting_every_position_by_ten_thousand_changes_nothing():
    model = small()
    batch = pad_batch(users_of(model, (40, 9)))
    with torch.no_grad():
        gap = (model(batch, first_position=10_000) - model(batch))[batch.mask].abs().max()
    assert gap <= 1e-4
    without_rope_band_split = small()
    with torch.no_grad():  # a sanity check that positions matter to the rotation itself
        u = without_rope_band_split.blocks[0].in_proj(torch.randn(1, 5, 32))
        q = without_rope_band_split.blocks[0].mixer._features(u, torch.arange(5)[None])[2]
        q_far = without_rope_band_split.blocks[0].mixer._features(
            u, 10_000 + torch.arange(5)[None]
        )[2]
    assert (q - q_far).abs().max() > 1e-2


def test_the_reference_mode_computes_the_authors_equations():
    assert reference_mode_vs_equations_max_abs() <= 1e-6


def test_the_causal_reading_is_not_the_authors_form():
    torch.manual_seed(0)
    model = small(causal=True).double()
    batch = pad_batch(users_of(model, (32,)))
    with torch.no_grad():
        assert (model(batch) - authors_equations(model, batch)).abs().max() > 1e-2


def test_state_bytes_at_the_published_size():
    model = RecGRELA(RecGRELAConfig())
    # 4 layers x (4 heads x (16 x 16 + 16) + 3 x 64) fp32, plus count and last time
    assert model.state_bytes_per_user() == 4 * (4 * (16 * 16 + 16) + 3 * 64) * 4 + 16 == 20_496


def test_the_reference_form_refuses_to_stream_and_a_training_model_refuses_to_step():
    with pytest.raises(ValueError, match="cannot stream"):
        small(causal=False).new_state(2)
    model = small().train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model.step(model.new_state(2), torch.tensor([0]), pad_batch(users_of(model, (3,))))


def test_gradients_reach_every_parameter():
    model = small(side_features=True).train()
    batch = pad_batch(users_of(model, (20, 6)))
    out = model(batch)[batch.mask]
    model.score(out)[:, 1:].logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("name", ["hytrec", "recgrela"])
def test_check_parity_runs_the_named_models_report(name, monkeypatch, capsys, tmp_path):
    # the reports themselves are tested above and in test_parity; this is the dispatch
    from hytrec import cli
    from hytrec.bench import parity, recgrela_parity

    for module in (parity, recgrela_parity):
        monkeypatch.setattr(module, "parity_report", lambda seed, m=module: {"from": m.__name__})
    out = tmp_path / "parity.json"
    assert cli.main(["check", "parity", "--model", name, "--output", str(out)]) == 0
    expected = {"hytrec": parity, "recgrela": recgrela_parity}[name].__name__
    assert json.loads(capsys.readouterr().out) == {"from": expected}
    assert json.loads(out.read_text()) == {"from": expected}
