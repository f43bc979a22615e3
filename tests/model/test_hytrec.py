"""The HyTRec network: shapes, causality, time features, state size, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.bench.parity import pad_batch, random_user
from hytrec.model.base import CheckpointError
from hytrec.model.events import Vocabulary
from hytrec.model.hytrec import (
    HyTRec,
    HyTRecConfig,
    TemporalDeltaMixer,
    WindowAttention,
    gap_bucket,
    sequence_gaps,
    shift_window,
)


def small_model(**overrides) -> HyTRec:
    torch.manual_seed(0)
    return HyTRec(HyTRecConfig(num_items=200, num_categories=12, **overrides))


def batch_of(model, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pad_batch([random_user(n, model.cfg, generator) for n in lengths])


def test_forward_shapes_and_scores():
    model = small_model().eval()
    batch = batch_of(model, [5, 12])
    u = model(batch)
    assert u.shape == (2, 12, model.cfg.d_model)
    scores = model.score(model.user_vector(batch))
    assert scores.shape == (2, 200) and torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_training_gradients_reach_every_parameter():
    model = small_model(fusion="moe", tie_item_embeddings=False).train()
    batch = batch_of(model, [30, 17])
    logits = model.score(model(batch))
    target = torch.randint(1, 200, batch.item.shape)
    loss = torch.nn.functional.cross_entropy(logits[batch.mask], target[batch.mask])
    loss.backward()
    without_grad = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert without_grad == []


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"long_window": 5, "short_window": 3},
        {"long_window": None},
        {"softmax_every": 0},
        {"softmax_every": 1, "long_layers": 1},
        {"use_short": False},
        {"short_layers": 2, "fusion": "moe"},
    ],
    ids=[
        "default",
        "small-windows",
        "window-all",
        "tadn-last",
        "one-softmax",
        "no-short",
        "two-short-moe",
    ],
)
def test_user_vector_is_the_forward_at_the_last_event(overrides):
    """user_vector forms only the last position's read-outs (the last layer's query, the
    short branch over the last K events): it equals forward's vector there, for rows
    shorter and longer than the windows, the blocked softmax path (T > 2 x window)
    included."""
    model = small_model(**overrides).eval()
    batch = batch_of(model, [1, 2, 4, 19, 70, 33])
    rows = torch.arange(len(batch.lengths))
    expected = model(batch)[rows, batch.lengths - 1]
    torch.testing.assert_close(model.user_vector(batch), expected, rtol=1e-5, atol=1e-5)


def test_user_vectors_are_causal():
    model = small_model().eval()
    batch = batch_of(model, [40])
    before = model(batch)
    batch.item[0, 30:] = 1  # rewrite the future
    batch.ts[0, 30:] += 10_000
    after = model(batch)
    torch.testing.assert_close(after[0, :30], before[0, :30], rtol=0, atol=1e-6)
    assert (after[0, 30:] - before[0, 30:]).abs().max() > 1e-3


TEMPORAL_SWITCHES = pytest.mark.parametrize(
    "erase_tau,state_decay",
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["tau+decay", "tau-only", "decay-only", "neither"],
)


@TEMPORAL_SWITCHES
def test_continuous_gaps_matter_only_through_the_decays(erase_tau, state_decay):
    """Gaps of 100,000 s and 101,000 s fall into the same bucket (log2 buckets): only the
    TADN decays can tell them apart, and each of them alone does (the erase gate's tau with
    the state decay off, and the other way round)."""
    model = small_model(
        erase_tau=erase_tau, state_decay=state_decay, use_short=False, softmax_every=0
    ).eval()
    vectors = []
    for gap in (100_000, 101_000):
        batch = batch_of(model, [20], seed=3)
        batch.ts = 1_500_000_000 + gap * torch.arange(20)[None]
        vectors.append(model.user_vector(batch))
    assert gap_bucket(torch.tensor([100_000]), torch.tensor([True]), 40) == gap_bucket(
        torch.tensor([101_000]), torch.tensor([True]), 40
    )
    difference = (vectors[0] - vectors[1]).abs().max().item()
    if erase_tau or state_decay:
        assert difference > 1e-4
    else:
        assert difference == 0.0


def documented_tadn_mixer(
    mixer: TemporalDeltaMixer, x: torch.Tensor, dt: torch.Tensor, weights: dict | None = None
):
    """The mixer's output computed from its weights (or from `weights` by the same names,
    to differentiate through them) by the module docstring's equations, in float64 with
    explicit matrices (no kernel, no shared helper):

        tau_t = exp(-dt_t / T)                          (1 when erase_tau is off)
        g_t   = alpha * sigmoid(W_g [h_t ; h_t - mean_{i<=t} h_i] + b) * tau_t
                + (1 - alpha) * g_static
        S_t   = exp(-dt_t / T_h) (I - g_t beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
                                                        (no exp(...) when state_decay is off)
        o_t   = S_t^T q_t,   then RMSNorm per head and the output projection."""
    cfg, H, dh = mixer.cfg, mixer.heads, mixer.head_dim
    if weights is None:
        weights = {n: t.detach() for n, t in mixer.state_dict().items()}
    w = {n: t.double() for n, t in weights.items()}
    h, dt = x.double()[0], dt.double()[0]  # [T, d], [T]
    T = h.shape[0]
    mean = h.cumsum(0) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    q = torch.nn.functional.normalize((h @ w["q_proj.weight"].T).view(T, H, dh), dim=-1)
    k = torch.nn.functional.normalize((h @ w["k_proj.weight"].T).view(T, H, dh), dim=-1)
    v = (h @ w["v_proj.weight"].T).view(T, H, dh)
    beta = torch.sigmoid(h @ w["beta_proj.weight"].T + w["beta_proj.bias"])  # [T, H]
    period = torch.nn.functional.softplus(w["period_raw"])  # [H, 2]: T, T_h
    alpha, g_static = torch.sigmoid(w["alpha_logit"]), torch.sigmoid(w["static_logit"])
    learned = torch.sigmoid(
        torch.cat([h, h - mean], dim=-1) @ w["gate_proj.weight"].T + w["gate_proj.bias"]
    )
    out = torch.zeros(T, H, dh, dtype=torch.float64)
    for head in range(H):
        S = torch.zeros(dh, dh, dtype=torch.float64)
        for t in range(T):
            tau = torch.exp(-dt[t] / period[head, 0]) if cfg.erase_tau else 1.0
            g = alpha[head] * learned[t, head] * tau + (1 - alpha[head]) * g_static[head]
            kt, vt, b = k[t, head], v[t, head], beta[t, head]
            erase = torch.eye(dh, dtype=torch.float64) - g * b * torch.outer(kt, kt)
            decay = torch.exp(-dt[t] / period[head, 1]) if cfg.state_decay else 1.0
            S = decay * erase @ S + b * torch.outer(kt, vt)
            out[t, head] = S.T @ q[t, head]
    normed = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    normed = normed * w["out_norm.weight"]
    return (normed.reshape(T, H * dh) @ w["o_proj.weight"].T)[None]


@TEMPORAL_SWITCHES
def test_tadn_mixer_computes_the_documented_equations(erase_tau, state_decay):
    """Each temporal term, switched on or off alone, is exactly the docstring's arithmetic:
    a gate that lost tau (or a state decay applied while switched off) fails here."""
    cfg = HyTRecConfig(
        num_items=10, d_model=16, long_heads=2, erase_tau=erase_tau, state_decay=state_decay
    )
    torch.manual_seed(0)
    mixer = TemporalDeltaMixer(cfg).eval()
    with torch.no_grad():  # weights far from their init, so every term moves the output
        mixer.gate_proj.weight.normal_(0, 0.5)
        mixer.beta_proj.weight.normal_(0, 0.5)
        mixer.alpha_logit.fill_(2.0)  # alpha ~0.88: the learned, tau-scaled part dominates
        mixer.period_raw.copy_(torch.tensor([[0.5, 1.0], [2.0, 3.0]]))  # T, T_h ~1-3 units
    x = torch.randn(1, 37, 16)
    dt = torch.rand(1, 37) * 4.0  # gaps up to 4 time units: tau from 1 down to ~0.02
    dt[0, 0] = 0.0
    expected = documented_tadn_mixer(mixer, x, dt)
    torch.testing.assert_close(mixer(x, dt).double(), expected, rtol=1e-4, atol=1e-5)


def test_tadn_mixer_gradients_are_those_of_the_documented_equations():
    """The fused projection (q, k, v, beta and both halves of the gate in one product, the
    causal mean entering through W_m) must pass every weight its true gradient: a weight
    block detached or mis-sliced in the fusion leaves the output right and fails here."""
    cfg = HyTRecConfig(num_items=10, d_model=16, long_heads=2)
    torch.manual_seed(1)
    mixer = TemporalDeltaMixer(cfg).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(1, 29, 16, dtype=torch.float64)
    dt = torch.rand(1, 29, dtype=torch.float64) * 4.0
    weights = torch.randn(1, 29, 16, dtype=torch.float64)
    (mixer(x, dt) * weights).sum().backward()
    fast = {n: p.grad for n, p in mixer.named_parameters()}
    params = {n: p.detach().clone().requires_grad_(True) for n, p in mixer.named_parameters()}
    (documented_tadn_mixer(mixer, x, dt, params) * weights).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_serving_keeps_the_mixer_constants_only_while_the_weights_are_unchanged():
    """The mixer keeps what it derives from its weights between serving steps (no autograd):
    an optimiser step or a loaded checkpoint (both in place), or a move to another device,
    must reach the next step all the same; while autograd records, nothing is kept."""
    mixer = TemporalDeltaMixer(HyTRecConfig(num_items=20, d_model=16))

    def fresh():
        return mixer._build_constants()

    with torch.no_grad():
        kept = mixer._constants()
        assert mixer._constants() is kept  # nothing changed: the same tensors
        mixer.k_proj.weight.mul_(-1.5)  # in place, as an optimiser step
        mixer.period_raw.add_(1.0)
        changed = mixer._constants()
        for name, value in fresh()._asdict().items():
            torch.testing.assert_close(getattr(changed, name), value, rtol=0, atol=0)
        assert not torch.equal(changed.weight, kept.weight)
        mixer.load_state_dict(TemporalDeltaMixer(mixer.cfg).state_dict())  # a checkpoint
        torch.testing.assert_close(mixer._constants().weight, fresh().weight, rtol=0, atol=0)
        mixer.double()  # new storage: a moved or converted model
        assert mixer._constants().weight.dtype == torch.float64
    assert mixer._constants().weight.requires_grad  # training: built with the graph


def test_state_size_is_documented_and_within_budget():
    model = HyTRec(HyTRecConfig())
    parts = model.new_state(1, "meta").bytes_by_part()
    assert model.state_bytes_per_user() == sum(parts.values()) <= 64 * 1024
    cfg = model.cfg
    dh = cfg.d_model // cfg.long_heads
    assert parts["tadn"] == 3 * cfg.long_heads * dh * dh * 4  # 3 TADN layers, fp32
    assert parts["kv"] == 2 * cfg.long_window * cfg.d_model * 4
    assert max(parts, key=parts.get) == "tadn"


def test_streaming_requires_eval_mode_and_bounded_window():
    model = small_model()
    with pytest.raises(RuntimeError, match="eval"):
        model.step(model.new_state(1), torch.tensor([0]), batch_of(model, [1]))
    with pytest.raises(ValueError, match="bounded long_window"):
        small_model(long_window=None).new_state(1)


@pytest.mark.parametrize(
    "bad",
    [
        dict(d_model=63),
        dict(fusion="sum"),
        dict(num_items=1),
        dict(long_window=0),
        dict(short_window=0),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="HyTRecConfig"):
        HyTRecConfig(**bad)


def test_checkpoint_round_trip(tmp_path):
    items = Vocabulary(str(i) for i in range(199))
    categories = Vocabulary(f"c{i}" for i in range(11))
    torch.manual_seed(0)
    model = HyTRec(HyTRecConfig(num_items=200, num_categories=12), items, categories).eval()
    model.item_category[1:] = torch.randint(1, 12, (199,))
    model.save(tmp_path / "ckpt", extra={"dataset": "unit"})
    loaded = HyTRec.load(tmp_path / "ckpt")
    assert loaded.version == model.version and loaded.cfg == model.cfg
    assert loaded.items == items and loaded.categories == categories
    assert loaded.checkpoint_extra == {"dataset": "unit"}
    batch = batch_of(model, [9])
    torch.testing.assert_close(loaded.user_vector(batch), model.user_vector(batch))
    assert (loaded.item_categories() == model.item_categories()).all()
    assert loaded.item_vectors().shape == (199, 64)


def test_checkpoint_refuses_mismatches(tmp_path):
    model = small_model()
    path = model.save(tmp_path / "ckpt")
    meta = json.loads((path / "checkpoint.json").read_text())

    def write(**changes):
        (path / "checkpoint.json").write_text(json.dumps({**meta, **changes}))

    write(format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99"):
        HyTRec.load(path)
    write(config={**meta["config"], "d_model": 32})
    with pytest.raises(CheckpointError, match="shape"):
        HyTRec.load(path)
    write(config={**meta["config"], "colour": "blue"})
    with pytest.raises(CheckpointError, match="unknown fields"):
        HyTRec.load(path)
    write(version="000000000000")
    with pytest.raises(CheckpointError, match="corrupt"):
        HyTRec.load(path)
    write(items=["a", "b"])
    with pytest.raises(CheckpointError, match="vocabulary has 3 entries"):
        HyTRec.load(path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HyTRec.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        HyTRec.load(path)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=-10, max_value=10**9), min_size=1, max_size=20),
    st.integers(min_value=3, max_value=64),
)
def test_gap_bucket_is_monotone_and_in_range(gaps, buckets):
    gaps_t = torch.tensor(sorted(gaps))
    out = gap_bucket(gaps_t, torch.ones_like(gaps_t, dtype=torch.bool), buckets)
    assert out.min() >= 1 and out.max() <= buckets - 1
    assert torch.all(out.diff() >= 0)
    assert torch.all(gap_bucket(gaps_t, torch.zeros_like(gaps_t, dtype=torch.bool), buckets) == 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.data())
def test_shift_window_keeps_the_newest_entries(W, M, data):
    lengths = data.draw(st.lists(st.integers(1, M), min_size=1, max_size=4))
    U = len(lengths)
    window = torch.arange(U * W).view(U, W)
    new = 1000 + torch.arange(U * M).view(U, M)
    out = shift_window(window, new, torch.tensor(lengths))
    for u, n in enumerate(lengths):
        expected = torch.cat([window[u], new[u, :n]])[-W:]
        assert torch.equal(out[u], expected)


@pytest.mark.parametrize("T,window", [(11, 5), (23, 5), (64, 8), (65, 32)])
def test_blocked_window_attention_equals_the_masked_form(T, window):
    torch.manual_seed(T)
    attention = WindowAttention(16, 2, window, dropout=0.0).eval()
    x = torch.randn(3, T, 16)
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    masked = attention._attend(q, k, v, attention.causal_mask(T, x.device))
    torch.testing.assert_close(attention.forward_blocked(x), masked, rtol=1e-5, atol=1e-6)


def _short_branch_outputs_and_grads(model, batch, form):
    """The short read-outs at every real position and the gradients of every parameter
    they reach, through `form` ("windowed": the reference; "banded": the fast one)."""
    model.zero_grad(set_to_none=True)
    gap_s, has_prev = sequence_gaps(batch.ts)
    events = model.embed(batch.item, batch.category, batch.behavior, gap_s, has_prev)
    if form == "windowed":
        short = model._short_readouts_windowed(batch, gap_s, has_prev)
    else:
        short = model._short_readouts(events, batch.ts)
    short = short[batch.mask]  # [real positions, d]
    weights = torch.randn(short.shape, generator=torch.Generator().manual_seed(7))
    (short * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return short.detach(), grads


@pytest.mark.parametrize(
    "K,lengths", [(20, [1, 7, 20, 21, 64, 130]), (3, [1, 2, 3, 4, 17]), (1, [1, 6])]
)
@pytest.mark.parametrize("heads", [1, 4])
def test_banded_short_branch_equals_the_windows_it_replaces(K, lengths, heads):
    """The banded short branch (every position's read-out without building its window)
    against the windowed form it replaces, values and the gradients of every parameter,
    with trained-looking weights (LayerNorm gain and bias, key and value biases away from
    their init, so each term of the decomposition matters) and random timestamps (ages
    over many buckets)."""
    model = small_model(short_window=K, short_heads=heads, dropout=0.0, d_model=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    batch = batch_of(model, lengths, seed=K)
    reference, reference_grads = _short_branch_outputs_and_grads(model, batch, "windowed")
    fast, fast_grads = _short_branch_outputs_and_grads(model, batch, "banded")
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=2e-5)
    assert fast_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(fast_grads[name], grad, rtol=0, atol=1e-4 * scale, msg=name)


def test_forward_takes_the_windowed_short_branch_for_several_short_layers():
    """Two short layers need every window position of the first: the windowed form runs,
    and the banded one is not used."""
    model = small_model(short_layers=2, dropout=0.0).eval()
    batch = batch_of(model, [3, 30])
    gap_s, has_prev = sequence_gaps(batch.ts)
    expected = model._fuse(
        model.long_norm(_long_branch(model, batch)),
        model._short_readouts_windowed(batch, gap_s, has_prev),
    )
    torch.testing.assert_close(model(batch)[batch.mask], expected[batch.mask])


def _long_branch(model, batch):
    gap_s, has_prev = sequence_gaps(batch.ts)
    x = model.embed(batch.item, batch.category, batch.behavior, gap_s, has_prev)
    dt = model._gap_units(gap_s, has_prev)
    for block in model.long_blocks:
        x = block(x, dt=dt) if isinstance(block.mixer, TemporalDeltaMixer) else block(x)
    return x
