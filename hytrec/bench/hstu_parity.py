"""HSTU's parity figures (`hytrec check parity --model hstu`): the KV-cache stream against the
parallel form, causality, padding, and one block against a second, independent
implementation of the HSTU equations.

`block_equations` is written from the equations in `hstu.py`'s docstring, event by event and
key by key with Python loops and hand-written norms and SiLU, not with the block's batched
einsums, windows of query blocks or `F.layer_norm`, so that the two agreeing means the block
computes those equations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hytrec.bench.parity import (
    pad_batch,
    random_user,
    stream_vs_parallel_max_abs,
    streamed_user_vectors,
)
from hytrec.model.batch import EventBatch
from hytrec.model.hstu import HSTU, HSTUConfig, SequentialTransductionUnit
from hytrec.model.hytrec import HyTRecConfig

HISTORY_LENGTHS = (1, 2, 17, 64, 333, 600)


def random_users(cfg: HSTUConfig, lengths, generator: torch.Generator):
    """`random_user`s of these lengths with HSTU's items (it reads no categories)."""
    shape = HyTRecConfig(num_items=cfg.num_items, num_categories=50)
    return [random_user(n, shape, generator) for n in lengths]


def randomised(cfg: HSTUConfig, seed: int) -> HSTU:
    """A model in eval mode whose position and time biases and output biases are far from
    their near-zero initial values, so that a wrong offset or bucket shows."""
    torch.manual_seed(seed)
    model = HSTU(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.rel_pos, block.rel_time, block.o.bias):
                p.normal_(std=0.5)
    return model


# ---------------------------------------------------------------------------- the equations


def _layer_norm(row: torch.Tensor, eps: float) -> torch.Tensor:
    mean = sum(row.tolist()) / len(row)
    var = sum((x - mean) ** 2 for x in row.tolist()) / len(row)
    return (row - mean) / math.sqrt(var + eps)


def _silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def block_equations(block: SequentialTransductionUnit, x: torch.Tensor, ts: list[int]):
    """One sequential transduction unit over one user's events from its equations (eval
    mode: no dropout): x [T, d], ts T ints -> Y [T, d]."""
    cfg = block.cfg
    N, d, dh = cfg.max_len, cfg.d_model, cfg.d_model // cfg.heads
    T = x.shape[0]
    projected = [_silu(block.uvqk.weight @ _layer_norm(x[t], cfg.eps)) for t in range(T)]
    u, v, q, k = ([p[i * d : (i + 1) * d] for p in projected] for i in range(4))
    out = []
    for t in range(T):
        heads = []
        for h in range(cfg.heads):
            cols = slice(h * dh, (h + 1) * dh)
            o_th = torch.zeros(dh, dtype=x.dtype)
            for s in range(max(0, t - N + 1), t + 1):
                gap = max(abs(ts[t] - ts[s]), 1)
                bucket = min(max(int(math.log(gap) / 0.301), 0), cfg.time_buckets)
                rab = block.rel_pos[N - 1 - (t - s)] + block.rel_time[bucket]
                o_th = o_th + _silu(q[t][cols] @ k[s][cols] + rab) / N * v[s][cols]
            heads.append(o_th)
        gated = u[t] * _layer_norm(torch.cat(heads), cfg.eps)
        out.append(x[t] + block.o.weight @ gated + block.o.bias)
    return torch.stack(out)


@torch.no_grad()
def block_vs_independent_equations_max_abs(seed: int = 0) -> float:
    """Each block of a two-layer model (fp64, random weights and biases, N = 8, d = 16, two
    heads) against `block_equations`, on histories shorter and longer than N (the window
    slides) with time gaps from a second to two weeks."""
    cfg = HSTUConfig(num_items=60, d_model=16, heads=2, max_len=8)
    model = randomised(cfg, seed).double()
    generator = torch.Generator().manual_seed(seed)
    batch = pad_batch(random_users(cfg, (21, 8, 3), generator))
    x = torch.randn(*batch.item.shape, cfg.d_model, generator=generator, dtype=torch.float64)
    worst = 0.0
    for block in model.blocks:
        y = block(x, batch.ts)
        for b, n in enumerate(batch.lengths.tolist()):
            expected = block_equations(block, x[b, :n], batch.ts[b, :n].tolist())
            worst = max(worst, (y[b, :n] - expected).abs().max().item())
        x = y
    return worst


# ---------------------------------------------------------------------------- the model


@torch.no_grad()
def future_events_move_earlier_outputs_max_abs(model: HSTU, users, seed: int = 0) -> float:
    """Replace every event from the middle of each history on (item and time) and compare
    the outputs before it: any difference means a query saw a later key."""
    batch = pad_batch(users)
    generator = torch.Generator().manual_seed(seed)
    cut = (batch.lengths // 2)[:, None]  # [B, 1]
    later = torch.arange(batch.item.shape[1])[None] >= cut  # [B, T]
    other_items = torch.randint(1, model.cfg.num_items, batch.item.shape, generator=generator)
    other_gaps = torch.randint(0, 10**6, batch.ts.shape, generator=generator)
    changed = EventBatch(
        torch.where(later, other_items, batch.item),
        batch.category,
        batch.behavior,
        torch.where(later, batch.ts + other_gaps, batch.ts),
        batch.lengths,
    )
    earlier = ~later & batch.mask
    return (model(changed) - model(batch))[earlier].abs().max().item()


@torch.no_grad()
def pad_invariance_max_abs(model: HSTU, users) -> float:
    """The same histories right-padded by 17 more positions."""
    batch = pad_batch(users)
    longer = EventBatch(
        *(F.pad(getattr(batch, n), (0, 17)) for n in ("item", "category", "behavior", "ts")),
        lengths=batch.lengths,
    )
    base = model(batch)
    return (model(longer)[:, : base.shape[1]] - base)[batch.mask].abs().max().item()


@torch.no_grad()
def stream_vs_last_window_forward_max_abs(model: HSTU, users, every: int = 7) -> float:
    """The vectors served one event at a time against `forward` over only the last N events
    before each (every `every`-th event and the last): equal for one layer (positions are
    relative); from two layers on the cached keys reach further back (see `hstu.py`)."""
    served = streamed_user_vectors(model, users, max_batch=1)
    N, worst = model.cfg.max_len, 0.0
    for user, after in zip(users, served, strict=True):
        for t in sorted({*range(0, len(user), every), len(user) - 1}):
            window = user.run(max(0, t - N + 1), t + 1)
            expected = model(pad_batch([window]))[0, -1]
            worst = max(worst, (after[t] - expected).abs().max().item())
    return worst


def parity_report(seed: int = 0) -> dict:
    cfg = HSTUConfig(num_items=5000)
    model = randomised(cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    users = random_users(cfg, HISTORY_LENGTHS, generator)
    one_at_a_time = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
    micro_batches = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
    window_users = random_users(cfg, (150, 450), generator)
    one_layer = randomised(HSTUConfig(num_items=5000, layers=1), seed)
    return {
        "model": "hstu",
        "fidelity": "code",
        "stream_vs_parallel_max_abs": max(one_at_a_time, micro_batches),
        "stream_vs_parallel_one_event_at_a_time_max_abs": one_at_a_time,
        "stream_vs_parallel_micro_batches_max_abs": micro_batches,
        "future_events_move_earlier_outputs_max_abs": future_events_move_earlier_outputs_max_abs(
            model, users, seed
        ),
        "block_vs_independent_equations_max_abs": block_vs_independent_equations_max_abs(seed),
        "pad_invariance_max_abs": pad_invariance_max_abs(model, users),
        # the served vector against forward over only the last N events: exact for one
        # layer; two layers reach 2 (N - 1) + 1 events back, so this is not a bound
        "one_layer_stream_vs_last_max_len_events_max_abs": stream_vs_last_window_forward_max_abs(
            one_layer, window_users
        ),
        "two_layers_stream_vs_last_max_len_events_max_abs": stream_vs_last_window_forward_max_abs(
            model, window_users
        ),
        "state_bytes_per_user": model.state_bytes_per_user(),
        "state_bytes_by_part": model.new_state(1, "meta").bytes_by_part(),
        "max_len": cfg.max_len,
        "history_lengths": list(HISTORY_LENGTHS),
        "dtype": "float32 (block vs equations: float64)",
        "seed": seed,
    }
