"""RecGRELA's parity figures (`hytrec check parity --model recgrela`): the kernel reuse, the
streaming form, the causal reading's invariances, and the reference mode against a second,
independent implementation of the authors' equations.

`authors_equations` is written the way the authors' code is (complex-number RoPE over a
table of exactly N positions, a conv padded by K-1 and truncated, per-head matrix products
with the 1/sqrt(N) scalings), not the way `recgrela.py` is, so that the two agreeing means
the model computes the published forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hytrec.bench.parity import pad_batch, random_user, stream_vs_parallel_max_abs
from hytrec.kernels import naive_tadn, tadn_parallel, tadn_step
from hytrec.model.batch import EventBatch
from hytrec.model.recgrela import RecGRELA, RecGRELAConfig

KERNEL_LENGTHS = (1, 7, 63, 65, 257)


def naive_linear_attention(q, k, v) -> torch.Tensor:
    """o_t = sum_{s<=t} (q_t . k_s) v_s for [B, T, H, K|V] inputs, as one masked product."""
    T = q.shape[1]
    scores = torch.einsum("bthk,bshk->bhts", q, k)  # [B, H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.einsum("bhts,bshv->bthv", scores * causal, v)


def _numerators(B: int, T: int, H: int, d: int) -> dict:
    """Each TADN form as a numerator q, k, v -> sum_{s<=t} (q_t . k_s) v_s (beta 1, erase 0,
    log-decay 0), and the naive masked product."""
    ones, zeros = torch.ones(B, T, H), torch.zeros(B, T, H)
    return {
        "naive": naive_linear_attention,
        "reference": lambda q, k, v: naive_tadn(q, k, v, ones, zeros, zeros)[0],
        "chunked": lambda q, k, v: tadn_parallel(
            q, k, v, ones, zeros, zeros, chunk_size=64, backend="torch"
        )[0],
        "step": lambda q, k, v: tadn_step(
            torch.zeros(B + 3, H, d, d),  # a pool of slots, two of them used
            torch.arange(B) * 2 + 1,
            torch.full((B,), T),
            q,
            k,
            v,
            ones,
            zeros,
            zeros,
            backend="torch",
        ),
    }


def kernel_vs_naive_linear_attention_max_abs(lengths=KERNEL_LENGTHS, seed: int = 0) -> float:
    """RELA-causal's normalised read-out A_t = num_t / (phi(q_t) . sum_s phi(k_s) + eps t)
    with the numerator from each TADN form (reference, chunked, pooled step) against the
    naive masked product: fp32 outputs and the gradients of q, k and v (the serving step
    runs without autograd: outputs only). The worst absolute difference."""
    generator = torch.Generator().manual_seed(seed)
    B, H, d = 2, 4, 16
    worst = 0.0
    for T in lengths:
        raw = [torch.randn(B, T, H, d, generator=generator) for _ in range(3)]
        weights = torch.randn(B, T, H, d, generator=generator)
        seen = torch.arange(1, T + 1, dtype=torch.float32)[:, None]  # [T, 1]
        results = {}
        for name, numerator in _numerators(B, T, H, d).items():
            leaves = [(F.elu(x) + 1).detach().requires_grad_(name != "step") for x in raw]
            q, k, v = leaves
            out = numerator(q, k, v) / ((q * k.cumsum(1)).sum(-1) + 1e-6 * seen)[..., None]
            results[name] = [out]
            if name != "step":
                (out * weights).sum().backward()
                results[name] += [x.grad for x in leaves]
        for got in results.values():
            for a, b in zip(got, results["naive"], strict=False):
                worst = max(worst, (a - b).abs().max().item())
    return worst


def authors_equations(model: RecGRELA, batch: EventBatch) -> torch.Tensor:
    """The authors' non-causal forward pass over the whole padded window: [B, N, D]."""
    cfg = model.cfg
    B, N = batch.item.shape
    D, H = cfg.d_model, cfg.heads
    half = D // 2
    theta = 1.0 / cfg.rope_base ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(N, dtype=torch.float64), theta)  # [N, D/2]
    table = torch.polar(torch.ones_like(angles), angles)  # e^{i n theta}

    def rope(x):  # rotate pairs as complex numbers, over the full D
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], half, 2).contiguous())
        return torch.view_as_real(z * table).flatten(-2).to(x.dtype)

    x = F.layer_norm(
        model.item_emb.weight[batch.item], (D,), model.emb_norm.weight, model.emb_norm.bias, 1e-12
    )
    for block in model.blocks:
        h = x
        y = F.layer_norm(h, (D,), block.norm1.weight, block.norm1.bias, 1e-12)
        act = F.silu(F.linear(y, block.act_proj.weight, block.act_proj.bias))
        u = F.linear(y, block.in_proj.weight, block.in_proj.bias)
        qk = F.linear(u, block.mixer.qk.weight, block.mixer.qk.bias).reshape(B, N, 2, D)
        q, k = F.elu(qk[:, :, 0]) + 1.0, F.elu(qk[:, :, 1]) + 1.0

        def split(t):
            return t.reshape(B, N, H, D // H).permute(0, 2, 1, 3)  # [B, H, N, d_h]

        q_rope, k_rope = split(rope(q)), split(rope(k))
        qh, kh, vh = split(q), split(k), split(u)
        z = 1 / (qh @ kh.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)  # [B, H, N, 1]
        kv = (k_rope.transpose(-2, -1) * N**-0.5) @ (vh * N**-0.5)  # [B, H, d_h, d_h]
        attended = (q_rope @ kv * z).transpose(1, 2).reshape(B, N, D)
        conv = block.mixer.conv
        k_size = conv.weight.shape[-1]
        local = F.conv1d(u.transpose(1, 2), conv.weight, conv.bias, padding=k_size - 1, groups=D)
        mixed = attended + F.silu(local[..., :N]).transpose(1, 2)
        out = F.linear(mixed * act, block.out_proj.weight, block.out_proj.bias)
        if cfg.layers == 1:
            x = _feed_forward(block, out)
        else:
            h = h + out
            x = h + _feed_forward(block, h)
    return x


def _feed_forward(block, x: torch.Tensor) -> torch.Tensor:
    """MLP(LN2(x)) of a GRELA block (eval mode: no dropout)."""
    D = x.shape[-1]
    x = F.layer_norm(x, (D,), block.norm2.weight, block.norm2.bias, 1e-12)
    x = F.gelu(F.linear(x, block.mlp[0].weight, block.mlp[0].bias))
    return F.linear(x, block.mlp[3].weight, block.mlp[3].bias)


def _randomised(cfg: RecGRELAConfig, seed: int) -> RecGRELA:
    """A model in eval mode whose every weight and bias (LayerNorm biases included, which
    the padding quirk needs) is random."""
    torch.manual_seed(seed)
    model = RecGRELA(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def reference_mode_vs_equations_max_abs(seed: int = 0) -> float:
    """causal=False against `authors_equations`, float64, hand-set weights, T = D = 32 (not
    the published 64), non-zero LayerNorm biases, two layers and one layer."""
    worst = 0.0
    generator = torch.Generator().manual_seed(seed)
    for layers in (2, 1):
        cfg = RecGRELAConfig(
            num_items=300, num_categories=20, d_model=32, heads=4, layers=layers, causal=False
        )
        model = _randomised(cfg, seed).double()
        users = [random_user(n, cfg, generator) for n in (32, 20, 5)]
        batch = pad_batch(users)  # N = 32 = D, pads included as the reference has them
        with torch.no_grad():
            worst = max(worst, (model(batch) - authors_equations(model, batch)).abs().max().item())
    return worst


def parity_report(seed: int = 0) -> dict:
    cfg = RecGRELAConfig(num_items=5000, num_categories=200)
    model = _randomised(cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    users = [random_user(n, cfg, generator) for n in (1, 2, 17, 64, 333, 600)]
    one_at_a_time = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
    micro_batches = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
    batch = pad_batch(users)
    longer = EventBatch(
        *(F.pad(getattr(batch, n), (0, 17)) for n in ("item", "category", "behavior", "ts")),
        lengths=batch.lengths,
    )
    real = batch.mask
    with torch.no_grad():
        base = model(batch)
        pad = (model(longer)[:, : base.shape[1]] - base)[real].abs().max().item()
        shift = (model(batch, first_position=10_000) - base)[real].abs().max().item()
    return {
        "model": "recgrela",
        "fidelity": "code",
        "kernel_vs_naive_linear_attention_max_abs": kernel_vs_naive_linear_attention_max_abs(
            seed=seed
        ),
        "stream_vs_parallel_max_abs": max(one_at_a_time, micro_batches),
        "stream_vs_parallel_one_event_at_a_time_max_abs": one_at_a_time,
        "stream_vs_parallel_micro_batches_max_abs": micro_batches,
        "pad_invariance_max_abs": pad,
        "shift_invariance_max_abs": shift,
        "reference_mode_vs_equations_max_abs": reference_mode_vs_equations_max_abs(seed),
        "state_bytes_per_user": model.state_bytes_per_user(),
        "state_bytes_by_part": model.new_state(1, "meta").bytes_by_part(),
        "history_lengths": [len(u) for u in users],
        "kernel_lengths": list(KERNEL_LENGTHS),
        "dtype": "float32 (reference mode: float64)",
        "seed": seed,
    }
