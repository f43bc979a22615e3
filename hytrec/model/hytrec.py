"""HyTRec: a hybrid of temporal-aware linear attention and softmax attention for very long
user behaviour sequences, in one file.

Follows "HyTRec: A Hybrid Temporal-Aware Attention Architecture for Long Behavior Sequential
Recommendation" (the TADN long branch, the short softmax branch, gated / mixture-of-experts
fusion) and Gated DeltaNet (Yang et al., 2024) for the decayed delta rule.

The sequence of a user's events splits into a long-term branch over the whole history and a
short-term branch over the last K events:

    e_i   = item[i] + category[i] + behaviour[i] + gap_bucket(t_i - t_{i-1})
    long  = N pre-norm blocks over e: TADN mixers, every r-th a windowed softmax attention
    short = causal softmax attention over the last K events, each tagged with its recency
            rank and bucketed age (t_query - t_i); the read-out is the newest position
    user  = LayerNorm(fuse(long_t, short_t)),     score(item) = user . item_vector

With `repeat_head` set, ranking uses log P(i) of the repeat/explore mixture over the user's
recent distinct items instead of the scores alone (`repeat.py`).

TADN (Temporal-Aware Delta Network), per head with state S [K, V]:

    tau_t = exp(-(t_t - t_{t-1}) / T)                         the event's freshness
    g_t   = alpha * sigmoid(W_g [h_t ; h_t - mean_{i<=t} h_i] + b) * tau_t
            + (1 - alpha) * g_static
    S_t   = exp(-(t_t - t_{t-1}) / T_h) (I - g_t beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t   = S_t^T q_t

How this maps to the paper. The paper's tau = exp(-(t_now - t_t) / T) is measured against
the query time, which moves with every new event and would force the whole history to be
recomputed. Here (1) the erase gate uses the event's own freshness (the gap since the user's
previous event), known when the event is applied, and (2) a whole-state decay per step with
a learnable period T_h per head, applied in log space (log_decay = -dt / T_h), whose factors
telescope: an event i seen at query time t_now has been scaled by
prod_{s>i} exp(-(t_s - t_{s-1}) / T_h) = exp(-(t_now - t_i) / T_h), the paper's
tau(t_now - t_i) exactly. `state_decay=False` gives the paper's literal update (decay only
through the erase gate); `erase_tau=False` removes tau from the gate (ablations).

Both forms of every module share their arithmetic: `forward` runs whole sequences in
parallel (training, `kernels.tadn_parallel`), `step` applies micro-batches of events to a
pooled per-user `StreamState` (serving, `kernels.tadn_step`). `tests/model/test_parity.py`
proves they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.kernels import tadn_parallel, tadn_step
from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, PackedRuns, shift_window
from hytrec.model.dropout import Dropout, dropout
from hytrec.model.events import NUM_BEHAVIORS, Vocabulary
from hytrec.model.repeat import (
    RepeatConfig,
    RepeatHead,
    as_repeat_config,
    log2_bucket,
    new_recent,
    push_runs,
)
from hytrec.model.streaming import SlotState


@dataclass(frozen=True)
class HyTRecConfig:
    """Everything that fixes the network's shape and arithmetic; saved with each checkpoint."""

    num_items: int = 1000  # embedding rows, including the padding row 0
    num_categories: int = 100  # including the unknown row 0
    d_model: int = 64
    # long-term branch
    long_layers: int = 4
    softmax_every: int = 4  # every r-th long layer is softmax: 4 -> 3 TADN : 1 softmax; 0 = none
    long_heads: int = 2
    long_window: int | None = 32  # keys a long softmax layer sees; None = all (offline only)
    # short-term branch
    use_short: bool = True
    short_window: int = 20  # K, the last events the short branch attends over
    short_layers: int = 1
    short_heads: int = 2
    # temporal parts of TADN
    time_unit_s: float = 3600.0  # gaps are measured in this unit (1 h) for the decays
    erase_tau: bool = True  # tau_t in the erase gate
    erase_period: float = 24.0  # T, in time units
    state_decay: bool = True  # whole-state decay exp(-dt / T_h)
    state_decay_period: float = 168.0  # initial T_h, in time units
    learn_periods: bool = True
    gate_alpha: float = 0.5  # initial alpha (learned)
    gate_static: float = 0.1  # initial g_static (learned)
    time_buckets: int = 40  # log2-spaced buckets of gaps in seconds
    # fusion and scoring
    fusion: str = "gate"  # "gate" or "moe"
    # initial bias of the gate (g: the long branch's share): 0 starts at g = 0.5; > 0 starts
    # on the long branch (`benchmark long-range`: it learns the long-range task more often)
    fusion_gate_bias: float = 0.0
    moe_experts: int = 4
    moe_heads: int = 2
    tie_item_embeddings: bool = True
    ffn_mult: int = 4
    dropout: float = 0.1
    chunk_size: int = 64
    # the repeat/explore head over the user's recent distinct items (`repeat.py`); None = off
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"HyTRecConfig: {message}")

        need(
            self.num_items >= 2, f"num_items must be >= 2 (row 0 is padding), got {self.num_items}"
        )
        need(self.num_categories >= 1, "num_categories must be >= 1")
        need(self.d_model % self.long_heads == 0, "d_model must be divisible by long_heads")
        need(self.d_model % self.short_heads == 0, "d_model must be divisible by short_heads")
        need(self.long_layers >= 1, "long_layers must be >= 1")
        need(self.softmax_every >= 0, "softmax_every must be >= 0")
        need(self.long_window is None or self.long_window >= 1, "long_window must be >= 1 or None")
        need(self.short_window >= 1, "short_window must be >= 1")
        need(self.fusion in ("gate", "moe"), f"fusion must be 'gate' or 'moe', got {self.fusion!r}")
        need(
            self.fusion != "moe"
            or 2 * self.d_model % self.moe_heads == 0
            and self.d_model % self.moe_heads == 0,
            "d_model must be divisible by moe_heads",
        )
        need(self.time_buckets >= 3, "time_buckets must be >= 3")

    def is_softmax_layer(self, layer: int) -> bool:
        return self.softmax_every > 0 and (layer + 1) % self.softmax_every == 0


# ---------------------------------------------------------------------------- time features


def gap_bucket(gap_s: torch.Tensor, has_prev: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket 0 = no previous event; else 1 + floor(log2(1 + gap seconds)), capped."""
    bucket = 1 + log2_bucket(gap_s, buckets - 1)
    return torch.where(has_prev, bucket, torch.zeros_like(bucket))


def sequence_gaps(ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gap in seconds since each event's predecessor in the same row, and whether it has one."""
    gap = torch.zeros_like(ts)
    gap[:, 1:] = ts[:, 1:] - ts[:, :-1]
    has_prev = torch.ones_like(ts, dtype=torch.bool)
    has_prev[:, 0] = False
    return gap, has_prev


# ---------------------------------------------------------------------------- stream state


@dataclass
class StreamState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot.

    tadn[l]:     [P, H, dk, dv] fp32  delta-rule state of each TADN layer
    mean_sum[l]: [P, d]         fp32  running sum of the layer's inputs (for h - mean h)
    kv[l]:       [P, 2, W, d]   fp32  keys and values of the last W events, softmax layers
    window:      [P, K, 5]      int64 item, category, behaviour, gap bucket, ts of the last K
    count:       [P]            int64 events applied
    last_ts:     [P]            int64 time of the newest applied event
    recent:      [P, N, 6]      int64 the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2]       int64 its repeats and events; both None without a head
    """

    tadn: list[torch.Tensor]
    mean_sum: list[torch.Tensor]
    kv: list[torch.Tensor]
    window: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


# ---------------------------------------------------------------------------- layers


class FeedForward(nn.Module):
    def __init__(self, cfg: HyTRecConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.down = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class MixerConstants(NamedTuple):
    weight: torch.Tensor  # [3d + 3H, d] the fused projection
    bias: torch.Tensor  # [3d + 3H]
    period: torch.Tensor  # [H, 2] erase period T and state period T_h, in time units
    alpha: torch.Tensor  # [H] the learned gate's share of the erase strength
    static_erase: torch.Tensor  # [H] (1 - alpha) g_static


class TemporalDeltaMixer(nn.Module):
    """The TADN token mixer: projections and gates around `kernels.tadn_*`."""

    def __init__(self, cfg: HyTRecConfig):
        super().__init__()
        d, H = cfg.d_model, cfg.long_heads
        self.cfg, self.heads, self.head_dim = cfg, H, d // H
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.beta_proj = nn.Linear(d, H)
        self.gate_proj = nn.Linear(2 * d, H)  # W_g [h ; h - mean h] + b
        self.alpha_logit = nn.Parameter(torch.full((H,), _logit(cfg.gate_alpha)))
        self.static_logit = nn.Parameter(torch.full((H,), _logit(cfg.gate_static)))
        periods = torch.tensor([cfg.erase_period, cfg.state_decay_period]).repeat(H, 1)  # [H, 2]
        raw = periods.apply_(_inverse_softplus)
        if cfg.learn_periods:
            self.period_raw = nn.Parameter(raw)
        else:
            self.register_buffer("period_raw", raw)
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d, d, bias=False)
        self._cached_constants: tuple[tuple[int, ...], MixerConstants] | None = None

    def _constants(self) -> MixerConstants:
        """What the mixer derives from its parameters alone. Rebuilt on every call while
        autograd records (training) and under torch.compile (which cannot trace the cache's
        pointer check, and fuses the products into its graph anyway); while it does not
        (serving), kept until a parameter changes in place (an optimiser step,
        `load_state_dict`: both bump `_version`)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._build_constants()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())  # moved or changed
        if self._cached_constants is None or self._cached_constants[0] != key:
            self._cached_constants = (key, self._build_constants())
        return self._cached_constants[1]

    def _build_constants(self) -> MixerConstants:
        """The projection weight is everything the mixer reads from x [..., d] in one matrix
        product: q, k, v (d each), then the write strength's logit, the gate's x part and its
        mean part (H each). The gate splits as W_g [h ; h - m] = (W_x + W_m) h - W_m m, so the
        causal mean m enters through W_m's H outputs, not through a [d]-wide mean per
        position."""
        d = self.cfg.d_model
        w_x, w_m = self.gate_proj.weight.split(d, dim=1)  # [H, d] each
        weight = torch.cat(
            [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.beta_proj.weight]
            + [w_x + w_m, w_m]
        )  # [3d + 3H, d]
        zeros = self.beta_proj.bias.new_zeros(3 * d)
        bias = torch.cat([zeros, self.beta_proj.bias, self.gate_proj.bias, zeros[: self.heads]])
        alpha = torch.sigmoid(self.alpha_logit)
        return MixerConstants(
            weight=weight,
            bias=bias,
            period=F.softplus(self.period_raw),
            alpha=alpha,
            static_erase=(1 - alpha) * torch.sigmoid(self.static_logit),
        )

    def _inputs(
        self,
        proj: torch.Tensor,
        gate_of_mean: torch.Tensor,
        dt: torch.Tensor,
        constants: MixerConstants,
    ):
        """Kernel inputs from the projections [B, T, 3d + 3H] of x, W_m times the causal mean
        of x [B, T, H], and gaps dt [B, T] (time units)."""
        B, T, _ = proj.shape
        H, dh, d = self.heads, self.head_dim, self.cfg.d_model
        qkv, gates = proj.split([3 * d, 3 * H], dim=-1)
        qk, v = qkv.view(B, T, 3, H, dh).split([2, 1], dim=2)
        q, k = F.normalize(qk, dim=-1).unbind(2)  # [B, T, H, dh] each
        beta_logit, gate_of_x, _ = gates.split(H, dim=-1)  # [B, T, H] each
        beta = torch.sigmoid(beta_logit)
        period = constants.period  # [H, 2]: erase T, state T_h
        dt = dt[..., None]  # [B, T, 1]
        tau = torch.exp(-dt / period[:, 0]) if self.cfg.erase_tau else torch.ones_like(beta)
        learned = torch.sigmoid(gate_of_x - gate_of_mean)
        erase = constants.alpha * learned * tau + constants.static_erase
        log_decay = -dt / period[:, 1] if self.cfg.state_decay else torch.zeros_like(beta)
        return q, k, v.squeeze(2), beta, erase, log_decay

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        return self.o_proj(self.out_norm(o).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        T, H = x.shape[1], self.heads
        constants = self._constants()
        proj = F.linear(x, constants.weight, constants.bias)  # [B, T, 3d + 3H]
        count = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)
        gate_of_mean = proj[..., -H:].cumsum(1) / count[:, None]  # W_m mean_{i<=t} x_i
        # chunks of at most chunk_size, as equal as possible: the least padding
        chunks = -(-T // self.cfg.chunk_size)
        inputs = self._inputs(proj, gate_of_mean, dt, constants)
        o, _ = tadn_parallel(*inputs, chunk_size=-(-T // chunks))
        return self._output(o)

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor, dt: torch.Tensor):
        """forward's output at each row's last real position [B, d]: the recurrence still
        runs over every position before it."""
        return self(x, dt)[torch.arange(len(lengths), device=x.device), lengths - 1]

    def step(self, x, dt, runs, slots, count, tadn_pool, mean_pool) -> torch.Tensor:
        """x [N, d] and dt [N]: the new events, packed (see PackedRuns); count [U] events
        applied before them; mean_pool [P, d] each user's sum of x so far."""
        H = self.heads
        constants = self._constants()
        proj = runs.unpack(F.linear(x, constants.weight, constants.bias))  # [U, M, 3d + 3H]
        seen = count[:, None] + torch.arange(1, runs.max_len + 1, device=x.device)  # [U, M]
        # W_m times the running mean, as in forward: the sum before the run, then the run's
        prior = F.linear(mean_pool[slots], constants.weight[-H:])  # [U, H]
        gate_of_mean = (prior[:, None] + proj[..., -H:].cumsum(1)) / seen[..., None]
        inputs = self._inputs(proj, gate_of_mean, runs.unpack(dt), constants)  # [U, M, ...]
        o = tadn_step(tadn_pool, slots, runs.lengths, *inputs)  # [U, M, H, dh]
        owner = slots.repeat_interleave(runs.lengths, output_size=x.shape[0])  # [N]
        mean_pool.index_add_(0, owner, x)
        return self._output(runs.pack(o)[None])[0]  # [N, d]


class WindowAttention(nn.Module):
    """Causal multi-head softmax attention over the last `window` positions (None = all)."""

    def __init__(self, d_model: int, heads: int, window: int | None, dropout: float):
        super().__init__()
        self.heads, self.window, self.dropout = heads, window, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def _attend(self, q, k, v, allowed) -> torch.Tensor:
        """q [B, Tq, d], k/v [B, Tk, d], allowed [B or 1, Tq, Tk] -> [B, Tq, d]."""
        B, Tq, d = q.shape
        H = self.heads

        def split(x):
            return x.view(B, -1, H, d // H).transpose(1, 2)  # [B, H, T, dh]

        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=allowed[:, None], dropout_p=p
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, d))

    def causal_mask(self, T: int, device) -> torch.Tensor:
        i = torch.arange(T, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None:
            allowed &= i[None, :] > i[:, None] - self.window
        return allowed[None]  # [1, T, T]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d]; key_mask [B, T] marks real (non-pad) keys, if any."""
        if self.window is not None and key_mask is None and x.shape[1] > 2 * self.window:
            return self.forward_blocked(x)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        allowed = self.causal_mask(x.shape[1], x.device)
        if key_mask is not None:
            # a pad query may see no key at all: let it see itself, so it is not NaN
            allowed = (allowed & key_mask[:, None, :]) | torch.eye(
                x.shape[1], dtype=torch.bool, device=x.device
            )
        return self._attend(q, k, v, allowed)

    def forward_blocked(self, x: torch.Tensor) -> torch.Tensor:
        """The windowed causal attention in O(T W) instead of O(T^2): each block of W
        queries sees only its own block and the previous one."""
        B, T, d = x.shape
        W = self.window
        q, kv = self.qkv(x).split([d, 2 * d], dim=-1)
        q, _ = blocks_with_previous(q, W)  # [B, N, W, d]
        _, kv = blocks_with_previous(kv, W)  # [B, N, 2W, 2d]
        N = q.shape[1]
        i = torch.arange(W, device=x.device)[:, None]  # query at n*W + i ...
        j = torch.arange(2 * W, device=x.device)[None, :]  # ... key at (n-1)*W + j
        allowed = ((j <= W + i) & (j > i)).expand(N, W, 2 * W).clone()  # [N, W, 2W]
        allowed[0, :, :W] = False  # block 0 has no previous block
        k, v = kv.flatten(0, 1).chunk(2, dim=-1)  # [B*N, 2W, d] each
        out = self._attend(q.flatten(0, 1), k, v, allowed.expand(B, -1, -1, -1).flatten(0, 1))
        return out.view(B, N * W, d)[:, :T]

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """forward's output at each row's last real position [B, d]: that query alone, over
        the keys of its window."""
        W = x.shape[1] if self.window is None else min(self.window, x.shape[1])
        positions, valid = last_positions(lengths, W)  # [B, W]
        rows = torch.arange(len(lengths), device=x.device)[:, None]
        q, k, v = self.qkv(x[rows, positions]).chunk(3, dim=-1)  # [B, W, d] each
        return self._attend(q[:, -1:], k, v, valid[:, None, :])[:, 0]

    def step(self, x, runs, slots, count, kv_pool) -> torch.Tensor:
        """x [N, d] new events, packed (see PackedRuns); kv_pool [P, 2, W, d] holds the keys
        and values of each user's last W events, oldest first (slot i is event count - W + i)."""
        W, M, lengths = self.window, runs.max_len, runs.lengths
        q, k, v = runs.unpack(self.qkv(x)).chunk(3, dim=-1)  # [U, M, d] each
        cached = kv_pool[slots]  # [U, 2, W, d]
        keys = torch.cat([cached[:, 0], k], dim=1)  # [U, W + M, d]
        values = torch.cat([cached[:, 1], v], dim=1)
        j = torch.arange(M, device=x.device)[None, :, None]  # new event j ...
        i = torch.arange(W, device=x.device)[None, None, :]  # ... may see cached slot i
        old_ok = (i > j) & (i >= W - count[:, None, None])  # [U, M, W]
        new_ok = self.causal_mask(M, x.device).expand(len(slots), -1, -1)  # [U, M, M]
        out = self._attend(q, keys, values, torch.cat([old_ok, new_ok], dim=-1))
        kv_pool[slots] = torch.stack(
            [shift_window(cached[:, 0], k, lengths), shift_window(cached[:, 1], v, lengths)], dim=1
        )
        return runs.pack(out)


def blocks_with_previous(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, ...] cut into N = ceil(T / size) blocks (zeros pad the last one): the blocks
    [B, N, size, ...], and each block after the one before it [B, N, 2 size, ...] (zeros
    before the first), what a query of the block may see in windowed attention."""
    B, T = x.shape[:2]
    N = -(-T // size)
    features = [0, 0] * (x.dim() - 2)
    own = F.pad(x, [*features, 0, N * size - T]).view(B, N, size, *x.shape[2:])
    previous = F.pad(own, [*features, 0, 0, 1, 0])[:, :-1]
    return own, torch.cat([previous, own], dim=2)


def last_positions(lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last n positions up to its last real event, oldest first [B, n] (clamped
    to 0 before the row's first event), and which of them hold an event [B, n]."""
    positions = (lengths - n)[:, None] + torch.arange(n, device=lengths.device)
    return positions.clamp(min=0), positions >= 0


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(LN x), then x + FFN(LN x)."""

    def __init__(self, cfg: HyTRecConfig, mixer: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.mixer, self.ffn = mixer, FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, **mixer_args) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), **mixer_args))
        return x + self.ffn(self.norm2(x))

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor, **mixer_args):
        """forward's output at each row's last real position [B, d]; x [B, T, d]."""
        last = x[torch.arange(len(lengths), device=x.device), lengths - 1]  # [B, d]
        y = last + self.dropout(self.mixer.forward_last(self.norm1(x), lengths, **mixer_args))
        return y + self.ffn(self.norm2(y))

    def step(self, x: torch.Tensor, **mixer_args) -> torch.Tensor:
        """x [N, d]: a micro-batch's new events, packed (see PackedRuns)."""
        x = x + self.dropout(self.mixer.step(self.norm1(x), **mixer_args))
        return x + self.ffn(self.norm2(x))


class Fusion(nn.Module):
    """Fuse the long and short read-outs: a learned gate, or a multi-head mixture of experts
    (each head routes [long ; short] over E linear experts)."""

    def __init__(self, cfg: HyTRecConfig):
        super().__init__()
        d = cfg.d_model
        self.kind = cfg.fusion
        if cfg.fusion == "gate":
            self.gate = nn.Linear(2 * d, d)
        else:
            self.heads, self.experts = cfg.moe_heads, cfg.moe_experts
            self.router = nn.Linear(2 * d, cfg.moe_heads * cfg.moe_experts)
            self.expert_weight = nn.Parameter(
                torch.randn(cfg.moe_heads, cfg.moe_experts, 2 * d, d // cfg.moe_heads)
                / math.sqrt(2 * d)
            )
            self.out = nn.Linear(d, d)

    def forward(self, long: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        both = torch.cat([long, short], dim=-1)  # [..., 2d]
        if self.kind == "gate":
            g = torch.sigmoid(self.gate(both))
            return g * long + (1 - g) * short
        lead = both.shape[:-1]
        route = self.router(both).view(*lead, self.heads, self.experts).softmax(-1)
        # [..., H, E, d/H]: every expert of every head applied to [long ; short]
        expert_out = torch.einsum("...i,heio->...heo", both, self.expert_weight)
        mixed = (route[..., None] * expert_out).sum(-2)  # [..., H, d/H]
        return self.out(mixed.reshape(*lead, -1))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------- the model


class HyTRec(SequentialModel):
    NAME = "hytrec"
    CONFIG = HyTRecConfig

    def __init__(
        self,
        cfg: HyTRecConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
    ):
        super().__init__(cfg, items, categories)
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.category_emb = nn.Embedding(cfg.num_categories, d, padding_idx=0)
        self.behavior_emb = nn.Embedding(NUM_BEHAVIORS, d, padding_idx=0)
        self.gap_emb = nn.Embedding(cfg.time_buckets, d)
        self.dropout = Dropout(cfg.dropout)
        self.long_blocks = nn.ModuleList(
            Block(
                cfg,
                WindowAttention(d, cfg.long_heads, cfg.long_window, cfg.dropout)
                if cfg.is_softmax_layer(i)
                else TemporalDeltaMixer(cfg),
            )
            for i in range(cfg.long_layers)
        )
        self.long_norm = nn.LayerNorm(d)
        if cfg.use_short:
            self.age_emb = nn.Embedding(cfg.time_buckets, d)  # bucketed t_query - t_i
            self.recency_emb = nn.Embedding(cfg.short_window, d)  # 0 = newest
            self.short_blocks = nn.ModuleList(
                Block(cfg, WindowAttention(d, cfg.short_heads, None, cfg.dropout))
                for _ in range(cfg.short_layers)
            )
            self.short_norm = nn.LayerNorm(d)
            self.fusion = Fusion(cfg)
        self.user_norm = nn.LayerNorm(d)
        if not cfg.tie_item_embeddings:
            self.item_out = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.repeat_head = RepeatHead(cfg.repeat_head, d) if cfg.repeat_head is not None else None
        self.apply(self._init_weights)
        if cfg.use_short and cfg.fusion == "gate":
            nn.init.constant_(self.fusion.gate.bias, cfg.fusion_gate_bias)

    # ------------------------------------------------------------------ shared pieces

    def embed(self, item, category, behavior, gap_s, has_prev) -> torch.Tensor:
        """Event embeddings [..., d] from ids and the gap since the previous event."""
        bucket = gap_bucket(gap_s, has_prev, self.cfg.time_buckets)
        return (
            self.item_emb(item)
            + self.category_emb(category)
            + self.behavior_emb(behavior)
            + self.gap_emb(bucket)
        )

    def _gap_units(self, gap_s: torch.Tensor, has_prev: torch.Tensor) -> torch.Tensor:
        gap = gap_s.clamp(min=0).to(torch.float64) / self.cfg.time_unit_s
        return torch.where(has_prev, gap, torch.zeros_like(gap)).float()

    def _short_readout(self, window: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """window [N, K, 5] (item, category, behaviour, gap bucket, ts; oldest first, newest
        at K-1) with valid [N, K] -> short-term read-out [N, d] of the newest event."""
        K = self.cfg.short_window
        item, category, behavior, bucket, ts = window.unbind(-1)
        query_ts = ts[:, -1:]  # the newest event is the query time
        age = gap_bucket(query_ts - ts, valid, self.cfg.time_buckets)
        recency = torch.arange(K - 1, -1, -1, device=window.device)
        x = (
            self.item_emb(item)
            + self.category_emb(category)
            + self.behavior_emb(behavior)
            + self.gap_emb(bucket)
            + self.age_emb(age)
            + self.recency_emb(recency)
        )
        x = self.dropout(x)
        for block in self.short_blocks:
            x = block(x, key_mask=valid)
        return self.short_norm(x[:, -1])

    def _fuse(self, long: torch.Tensor, short: torch.Tensor | None) -> torch.Tensor:
        return self.user_norm(long if short is None else self.fusion(long, short))

    # ------------------------------------------------------------------ training form

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """User vectors after every event: [B, T, d] (garbage at padded positions)."""
        events, dt, gap_s, has_prev = self._events(batch)
        x = self.dropout(events)
        for block in self.long_blocks:
            x = block(x, **self._mixer_args(block, dt))
        long = self.long_norm(x)  # [B, T, d]
        if not self.cfg.use_short:
            return self._fuse(long, None)
        if len(self.short_blocks) == 1:
            return self._fuse(long, self._short_readouts(events, batch.ts))
        return self._fuse(long, self._short_readouts_windowed(batch, gap_s, has_prev))

    @torch.no_grad()
    def user_vector(self, batch: EventBatch) -> torch.Tensor:
        """forward's user vector after each row's last real event [B, d] (what ranking and a
        recomputing server read), forming only what that position needs: the long layers but
        the last run at every position (the next layer reads them all); the last one's mixer
        reads that query alone (a softmax layer: over its window of keys), and its FFN, the
        short branch (over the last K events) and the fusion run once per row."""
        events, dt, gap_s, has_prev = self._events(batch)
        x = self.dropout(events)
        *every_position, last_block = self.long_blocks
        for block in every_position:
            x = block(x, **self._mixer_args(block, dt))
        x = last_block.forward_last(x, batch.lengths, **self._mixer_args(last_block, dt))
        long = self.long_norm(x)  # [B, d]
        if not self.cfg.use_short:
            return self._fuse(long, None)
        positions, valid = last_positions(batch.lengths, self.cfg.short_window)  # [B, K]
        rows = torch.arange(len(positions), device=positions.device)[:, None]
        windows = self._window_features(batch, gap_s, has_prev)[rows, positions]  # [B, K, 5]
        return self._fuse(long, self._short_readout(windows * valid[..., None], valid))

    def _events(self, batch: EventBatch):
        """The event embeddings [B, T, d], gaps in time units [B, T], and the gaps in seconds
        and whether each event has a previous one ([B, T] each)."""
        gap_s, has_prev = sequence_gaps(batch.ts)
        events = self.embed(batch.item, batch.category, batch.behavior, gap_s, has_prev)
        return events, self._gap_units(gap_s, has_prev), gap_s, has_prev

    @staticmethod
    def _mixer_args(block: Block, dt: torch.Tensor) -> dict:
        return {"dt": dt} if isinstance(block.mixer, TemporalDeltaMixer) else {}

    def _window_features(self, batch: EventBatch, gap_s, has_prev) -> torch.Tensor:
        """What `_short_readout` reads of each event [B, T, 5]: item, category, behaviour,
        gap bucket, time."""
        bucket = gap_bucket(gap_s, has_prev, self.cfg.time_buckets)
        return torch.stack([batch.item, batch.category, batch.behavior, bucket, batch.ts], -1)

    def _short_readouts_windowed(self, batch: EventBatch, gap_s, has_prev) -> torch.Tensor:
        """The short branch's read-out after every event [B, T, d]: `_short_readout` of every
        position's window (events t-K+1 .. t, oldest first), built as [B, T, K] copies. Any
        number of short layers; O(T K) memory and O(T K^2) work."""
        B, T = batch.item.shape
        K = self.cfg.short_window
        raw = self._window_features(batch, gap_s, has_prev)
        # position t's window ends at t: the last K positions of a row of length t + 1
        index, valid = last_positions(torch.arange(1, T + 1, device=raw.device), K)  # [T, K]
        valid = valid[None].expand(B, -1, -1)  # [B, T, K]
        windows = raw[:, index] * valid[..., None]  # [B, T, K, 5]
        short = self._short_readout(windows.view(B * T, K, 5), valid.reshape(B * T, K))
        return short.view(B, T, -1)

    def _short_readouts(self, events: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """The short branch's read-out after every event [B, T, d], from the event
        embeddings [B, T, d] and times [B, T], for one short layer: what
        `_short_readouts_windowed` gives (tests/model/test_hytrec.py), without its windows.

        Query t reads window events j = t - m (m = 0..K-1) as x_tj = e_j + age[b_tj] +
        rec[m], b_tj the bucket of t_t - t_j. LayerNorm centres each term on its own
        (centring is linear); with c(.) the centred terms and g, beta its gain and bias,

            LN(x_tj) = s_tj g * (c(e_j) + c(age[b_tj]) + c(rec[m])) + beta
            d / s_tj^2 = |c(e_j)|^2 + |c(age_b) + c(rec_m)|^2
                         + 2 c(e_j).c(age_b) + 2 c(e_j).c(rec_m)          (+ d eps)

        so every key and value is s_tj times a sum of three projected vectors (one per
        event, one per age bucket, one per recency) plus a constant: the attention needs
        [T, K] scalars and per-event vectors, never a [T, K, d] tensor, and the key's
        constant drops out of the softmax. Only the newest position of a window is read out,
        so the output projection and the FFN run once per event instead of K times. Queries
        go in blocks of K that see their own block and the one before (as
        `WindowAttention.forward_blocked`), so the products are batched matrix products.
        Dropout falls on each event's embedding (one mask for every window that holds it)
        and on the attention weights; the windowed form draws a mask per window position.
        """
        cfg, d = self.cfg, self.cfg.d_model
        K, buckets = cfg.short_window, cfg.time_buckets
        (block,) = self.short_blocks
        attn, norm = block.mixer, block.norm1
        H = attn.heads
        dh = d // H
        B, T, _ = events.shape
        device = events.device
        e = self.dropout(events)
        # the query is its window's newest event: the age of a zero gap, recency 0
        zero_gap = gap_bucket(
            ts.new_zeros(1), torch.ones(1, dtype=torch.bool, device=device), buckets
        )
        x_query = e + self.age_emb(zero_gap) + self.recency_emb.weight[0]  # [B, T, d]
        w_q, w_k, w_v = attn.qkv.weight.split(d)
        b_q, _, b_v = attn.qkv.bias.split(d)
        q = F.linear(norm(x_query), w_q, b_q)  # [B, T, d]

        def centred(x):
            return x - x.mean(-1, keepdim=True)

        c_event, c_age = centred(e), centred(self.age_emb.weight)  # [B, T, d], [buckets, d]
        c_rec = centred(self.recency_emb.weight)  # [K, d]
        w_kv = torch.cat([w_k, w_v]) * norm.weight  # [2d, d]: LayerNorm's gain folded in
        kv_age, kv_rec = F.linear(c_age, w_kv), F.linear(c_rec, w_kv)  # [buckets|K, 2d]
        v_const = F.linear(norm.bias, w_v, b_v)  # [d]
        per_event = torch.cat(
            [
                F.linear(c_event, w_kv),  # keys and values of the events' own terms
                c_event @ c_age.T,  # [B, T, buckets]
                c_event @ c_rec.T,  # [B, T, K]
                c_event.pow(2).sum(-1, keepdim=True),  # [B, T, 1]
            ],
            dim=-1,
        )
        # pairs: query t = nK + i, key j = (n-1)K + jj (jj < 2K), window offset m = t - j
        q_blocks, _ = blocks_with_previous(q, K)  # [B, N, K, d]
        _, key_blocks = blocks_with_previous(per_event, K)  # [B, N, 2K, 2d + buckets + K + 1]
        ts_query, ts_key = blocks_with_previous(ts, K)  # [B, N, K], [B, N, 2K]
        N = q_blocks.shape[1]
        k_event, v_event, event_age, event_rec, event_sq = key_blocks.split(
            [d, d, buckets, K, 1], dim=-1
        )
        i = torch.arange(K, device=device)[:, None]
        jj = torch.arange(2 * K, device=device)[None, :]
        offset = K + i - jj  # [K, 2K]
        valid = ((offset >= 0) & (offset < K)).expand(N, K, 2 * K).clone()  # [N, K, 2K]
        valid[0, :, :K] = False  # block 0 has no previous block
        m = offset.clamp(0, K - 1).expand(N, K, 2 * K)
        age = gap_bucket(ts_query[..., None] - ts_key[..., None, :], valid, buckets)  # [B,N,K,2K]

        def pick(table, column):
            """table [B, N, 2K, X] at each pair's key and column [B|1, N, K, 2K]."""
            X = table.shape[-1]
            rows = torch.arange(N * 2 * K, device=device).view(N, 1, 2 * K) * X
            flat = (rows + column).expand(B, N, K, 2 * K).reshape(B, -1)
            return table.reshape(B, -1).gather(1, flat).view(B, N, K, 2 * K)

        age_rec = (c_age[:, None] + c_rec[None]).pow(2).sum(-1)  # [buckets, K]
        var = event_sq.transpose(-1, -2) + age_rec[age, m]  # [B, N, K, 2K]
        var = var + 2 * (pick(event_age, age) + pick(event_rec, m))
        scale = torch.rsqrt(var / d + norm.eps)[:, None]  # [B, 1, N, K, 2K]: s_tj

        def heads(x):  # [..., rows, d] -> [..., H, rows, dh]
            return x.unflatten(-1, (H, dh)).transpose(-2, -3)

        qh = heads(q_blocks).transpose(1, 2)  # [B, H, N, K, dh]
        # [H, 1, rows, dh] each: broadcast over the batch and the blocks
        k_age, v_age = kv_age.view(buckets, 2, H, 1, dh).permute(1, 2, 3, 0, 4).unbind(0)
        k_rec, v_rec = kv_rec.view(K, 2, H, 1, dh).permute(1, 2, 3, 0, 4).unbind(0)
        pairs = (B, H, N, K, 2 * K)
        age_h, m_h = age[:, None].expand(pairs), m.expand(pairs)
        score = qh @ heads(k_event).transpose(1, 2).transpose(-1, -2)  # [B, H, N, K, 2K]
        score = score + (qh @ k_age.transpose(-1, -2)).gather(-1, age_h)
        score = score + (qh @ k_rec.transpose(-1, -2)).gather(-1, m_h)
        mask = torch.zeros(N, K, 2 * K, device=device).masked_fill_(~valid, float("-inf"))
        p = (score * scale * dh**-0.5 + mask).softmax(-1)
        p = dropout(p, attn.dropout, self.training)
        weight = p * scale  # [B, H, N, K, 2K]
        out = weight @ heads(v_event).transpose(1, 2)  # [B, H, N, K, dh]
        by_age = weight.new_zeros(B, H, N, K, buckets).scatter_add(-1, age_h, weight)
        key_at_offset = (K + i - torch.arange(K, device=device)).expand(B, H, N, K, K)
        by_offset = weight.gather(-1, key_at_offset)  # [B, H, N, K, K(m)]
        out = (
            out
            + by_age @ v_age
            + by_offset @ v_rec
            + p.sum(-1, keepdim=True) * v_const.view(H, 1, 1, dh)
        )
        out = out.permute(0, 2, 3, 1, 4).reshape(B, N * K, d)[:, :T]
        y = x_query + block.dropout(attn.o_proj(out))
        return self.short_norm(y + block.ffn(block.norm2(y)))

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> StreamState:
        cfg, d = self.cfg, self.cfg.d_model
        dh = d // cfg.long_heads
        if any(cfg.is_softmax_layer(i) for i in range(cfg.long_layers)) and cfg.long_window is None:
            raise ValueError("streaming needs a bounded long_window for the long softmax layers")
        tadn = [b for b in self.long_blocks if isinstance(b.mixer, TemporalDeltaMixer)]
        softmax = [b for b in self.long_blocks if isinstance(b.mixer, WindowAttention)]

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(num_slots, *shape, dtype=dtype, device=device)

        head = cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return StreamState(
            tadn=[zeros(cfg.long_heads, dh, dh) for _ in tadn],
            mean_sum=[zeros(d) for _ in tadn],
            kv=[zeros(2, cfg.long_window, d) for _ in softmax],
            window=zeros(cfg.short_window if cfg.use_short else 0, 5, dtype=torch.long),
            count=zeros(dtype=torch.long),
            last_ts=zeros(dtype=torch.long),
            recent=recent[0],
            recent_counts=recent[1],
        )

    def recent_items(self, state: StreamState, slots: torch.Tensor, n: int) -> torch.Tensor:
        """[U, min(n, K)] the items of these users' last n events, oldest first (0: none)."""
        return state.window[slots, -n:, 0]

    @torch.no_grad()
    def step(self, state: StreamState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply each user's run of new events (batch rows, right-padded, in time order) to
        its slot of `state` in place; return the user vectors after each run [U, d]."""
        if self.training:
            raise RuntimeError("HyTRec.step serves a trained model: call model.eval() first")
        U, M = batch.item.shape
        lengths, count = batch.lengths, state.count[slots]
        # gaps: within the run, and from the user's last applied event for the first one
        gap_s, has_prev = sequence_gaps(batch.ts)
        gap_s[:, 0] = batch.ts[:, 0] - state.last_ts[slots]
        has_prev[:, 0] = count > 0
        runs = PackedRuns.of(lengths, M)
        ids = (batch.item, batch.category, batch.behavior, gap_s, has_prev)
        x = self.embed(*(runs.pack(t) for t in ids))  # [N, d]
        dt = self._gap_units(runs.pack(gap_s), runs.pack(has_prev))  # [N]
        tadn_i = softmax_i = 0
        for block in self.long_blocks:
            if isinstance(block.mixer, TemporalDeltaMixer):
                x = block.step(
                    x,
                    dt=dt,
                    runs=runs,
                    slots=slots,
                    count=count,
                    tadn_pool=state.tadn[tadn_i],
                    mean_pool=state.mean_sum[tadn_i],
                )
                tadn_i += 1
            else:
                x = block.step(x, runs=runs, slots=slots, count=count, kv_pool=state.kv[softmax_i])
                softmax_i += 1
        last = lengths - 1
        rows = torch.arange(U, device=x.device)
        long = self.long_norm(x[runs.newest])  # [U, d]
        short = None
        if self.cfg.use_short:
            bucket = gap_bucket(gap_s, has_prev, self.cfg.time_buckets)
            raw = torch.stack([batch.item, batch.category, batch.behavior, bucket, batch.ts], -1)
            window = shift_window(state.window[slots], raw, lengths)  # [U, K, 5]
            state.window[slots] = window
            K = self.cfg.short_window
            valid = torch.arange(K, device=x.device)[None] >= K - (count + lengths)[:, None]
            short = self._short_readout(window, valid)
        state.count[slots] = count + lengths
        state.last_ts[slots] = batch.ts[rows, last]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        return self._fuse(long, short)

    # ------------------------------------------------------------------ scoring

    def item_table(self) -> torch.Tensor:
        """[num_items, d] output item vectors (row 0 is padding)."""
        return self.item_emb.weight if self.cfg.tie_item_embeddings else self.item_out.weight
