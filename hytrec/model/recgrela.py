"""RecGRELA: gated rotary-enhanced linear attention for sequential recommendation, in one file.

Follows "Rotary-Enhanced Linear Attention with Gated Rank Selector" (RecGRELA, arXiv
2506.13315) as its authors' code has it (GitHub TBI805/RecGRELA, `model/RecGRELA.py` at
608a39b; read, not copied), which in turn follows MLLA's linear attention (Han et al., 2024).
Notation: events t = 0..T-1 of one user, D = d_model, h heads of d_h = D / h columns.

    H^0  = LayerNorm(Dropout(E[item_t]))                   no position table at all
    GRELA block, input H:
      X  = LN1(H)
      G  = SiLU(X W_act + b_act)                            "gated rank selector"
      U  = X W_in + b_in
      Y  = (RELA(U) * G) W_out + b_out
      H' = H + DropPath(Y),    H_out = H' + MLP(LN2(H'))    MLP: D -> 4D, GELU, -> D
      (with a single layer the reference keeps no residual: H_out = MLP(LN2(DropPath(Y))))
    RELA(U), with phi(x) = ELU(x) + 1 and V = U (no value projection):
      [Q | K] = U W_qk + b_qk,   q_t = phi(Q_t),  k_t = phi(K_t)
      R_t     = RoPE rotation at position t over the full D, BEFORE the head split: the pair
                (2i, 2i+1) turns by t * theta_i, theta_i = base^(-i / (D/2)), so head j gets
                the frequency band i in [j d_h/2, (j+1) d_h/2)
      per head (causal, the form served here):
        S_t = S_{t-1} + (R_t k_t) v_t^T            z_t = z_{t-1} + k_t
        A_t = (R_t q_t)^T S_t / (q_t . z_t + eps (t+1))
      C_t     = SiLU(sum_{j<4} w_j * v_{t-3+j} + b)         causal depthwise conv, k = 4
      RELA(U)_t = concat_heads(A_t) + C_t
    user vector after event t: H^L_t;   score(item) = H^L_t . E[item]

The authors' form is not causal: its sums run over the whole padded window of N positions,
S = (1/N) sum_m ..., z = (1/N) sum_m k_m and the normaliser is q . z + 1e-6, so position t
sees later events and pads (quirks 1-2 of ../shared/design/WAVE2-MODELS.md section 2.2).
`causal=False` reproduces that form exactly and exists to prove this file implements the
published equations; the causal reading above keeps every equation but makes the sums
prefix sums over real events (its eps (t+1) is the reference's 1e-6 after the same 1/N
cancellation, with N = t + 1 events). Then the whole model is a recurrence with a
constant-size per-user state, which `step` serves:

    per layer: S [h, d_h, d_h] and z [h, d_h] (fp32), the last 3 values of U for the conv;
    per user:  the number of events applied (the next RoPE position) and the last time.

The numerator is the TADN recurrence with erase 0, log-decay 0 and beta 1, so it runs on
`hytrec.kernels` (reference, chunked, step and Triton forms) instead of a kernel of its own.
RoPE angles come from the absolute int64 event index (no table bounded by a max length);
because (R_t a) . (R_s b) depends only on t - s, shifting every position by a constant
changes nothing, so a training window that starts at 0 and a history served from its first
event compute the same function.

With `repeat_head` set (not in the paper), ranking uses log P(i) of the repeat/explore
mixture over the user's recent distinct items (`repeat.py`), as for HyTRec and SASRec; the
state then also holds the head's buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.kernels import tadn_parallel, tadn_step
from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, PackedRuns, shift_window
from hytrec.model.dropout import Dropout
from hytrec.model.events import NUM_BEHAVIORS, Vocabulary
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config, new_recent, push_runs
from hytrec.model.streaming import SlotState


@dataclass(frozen=True)
class RecGRELAConfig:
    """The published size by default (config/RecGRELA.yaml: D 64, 4 heads, 4 layers)."""

    num_items: int = 1000  # embedding rows, including the padding row 0
    num_categories: int = 1  # read only with side_features
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    dropout: float = 0.1  # embedding and MLP
    drop_path: float = 0.1  # stochastic depth on every block's mixer output
    conv_kernel: int = 4
    rope_base: float = 10000.0
    eps: float = 1e-6  # normaliser, per event
    causal: bool = True  # False: the authors' non-causal form (not servable)
    # ablations named by the paper's summary
    gate: bool = True  # False: G = 1
    conv: bool = True  # False: C = 0
    rope: bool = True  # False: R_t = I
    side_features: bool = False  # add category and behaviour embeddings to the item's
    chunk_size: int = 64
    # the repeat/explore head over the user's recent distinct items (`repeat.py`); None = off
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))
        if self.num_items < 2:
            raise ValueError(f"RecGRELAConfig: num_items must be >= 2, got {self.num_items}")
        if self.d_model % (2 * self.heads):
            raise ValueError(
                f"RecGRELAConfig: d_model ({self.d_model}) must be divisible by 2 * heads "
                f"({2 * self.heads}): RoPE turns pairs of columns inside each head"
            )
        if self.layers < 1 or self.conv_kernel < 1:
            raise ValueError("RecGRELAConfig: layers and conv_kernel must be >= 1")


# ---------------------------------------------------------------------------- pieces


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE over the last dimension of x [..., T, D] at int64 positions [..., T]: the pair
    (2i, 2i+1) turns by position * base^(-i / (D/2)). Angles are formed in float64 and
    reduced modulo 2 pi, so positions in the millions keep fp32 accuracy."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angle = torch.remainder(positions.to(torch.float64)[..., None] * theta, 2 * math.pi)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # [..., T, D/2]
    a, b = x.unflatten(-1, (half, 2)).unbind(-1)  # [..., T, D/2] each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole sample's branch with probability p, scale the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class MLP(nn.Sequential):
    def __init__(self, d: int, dropout: float):
        super().__init__(
            nn.Linear(d, 4 * d),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(4 * d, d),
            Dropout(dropout),
        )


class RELA(nn.Module):
    """Rotary-enhanced linear attention plus the causal depthwise conv shortcut."""

    def __init__(self, cfg: RecGRELAConfig):
        super().__init__()
        D = cfg.d_model
        self.cfg, self.heads, self.head_dim = cfg, cfg.heads, D // cfg.heads
        self.qk = nn.Linear(D, 2 * D)
        self.conv = nn.Conv1d(D, D, cfg.conv_kernel, groups=D)  # depthwise; padded by hand

    def _features(self, u: torch.Tensor, positions: torch.Tensor):
        """u [B, T, D] -> phi(q), phi(k), their rotations (each [B, T, h, d_h]) and V."""
        q, k = (F.elu(t) + 1.0 for t in self.qk(u).chunk(2, dim=-1))  # [B, T, D]
        if self.cfg.rope:
            q_rot, k_rot = (rotate(t, positions, self.cfg.rope_base) for t in (q, k))
        else:
            q_rot, k_rot = q, k

        def heads(t):
            return t.unflatten(-1, (self.heads, self.head_dim))  # [B, T, h, d_h]

        return heads(q), heads(k), heads(q_rot), heads(k_rot), heads(u)

    def _shortcut(self, v_padded: torch.Tensor) -> torch.Tensor:
        """SiLU(depthwise conv) of values [B, K-1+T, D] whose first K-1 rows are the context
        before the first output: [B, T, D]."""
        if not self.cfg.conv:
            return v_padded.new_zeros(
                v_padded.shape[0], v_padded.shape[1] - self.cfg.conv_kernel + 1, v_padded.shape[2]
            )
        return F.silu(self.conv(v_padded.transpose(1, 2))).transpose(1, 2)

    def forward(self, u: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """u [B, T, D] (right-padded; RoPE positions first_position + 0..T-1) -> [B, T, D]."""
        B, T, D = u.shape
        positions = first_position + torch.arange(T, device=u.device).expand(B, T)
        q, k, q_rot, k_rot, v = self._features(u, positions)
        if self.cfg.causal:
            ones = q.new_ones(B, T, self.heads)
            zeros = q.new_zeros(B, T, self.heads)
            num, _ = tadn_parallel(
                q_rot, k_rot, v, ones, zeros, zeros, chunk_size=self.cfg.chunk_size
            )
            seen = torch.arange(1, T + 1, device=u.device, dtype=u.dtype)[:, None]  # [T, 1]
            den = (q * k.cumsum(1)).sum(-1) + self.cfg.eps * seen  # [B, T, h]
            attended = num / den[..., None]
        else:  # the authors' form: sums over all N = T positions, pads included
            z = 1.0 / (torch.einsum("bthd,bhd->bth", q, k.mean(1)) + 1e-6)  # [B, T, h]
            kv = torch.einsum("bthk,bthv->bhkv", k_rot * T**-0.5, v * T**-0.5)
            attended = torch.einsum("bthk,bhkv->bthv", q_rot, kv) * z[..., None]
        v_padded = F.pad(u, (0, 0, self.cfg.conv_kernel - 1, 0))  # zeros before event 0
        return attended.flatten(2) + self._shortcut(v_padded)

    def step(self, u, runs: PackedRuns, slots, count, s_pool, z_pool, conv_pool) -> torch.Tensor:
        """u [N, D]: a micro-batch's new events, packed; count [U] events applied before them;
        pools: S [P, h, d_h, d_h], z [P, h, d_h], conv [P, K-1, D] (the last values, oldest
        first). Updates the pools in place; returns [N, D]."""
        M, lengths = runs.max_len, runs.lengths
        positions = runs.pack(count[:, None] + torch.arange(M, device=u.device)[None])  # [N]
        q, k, q_rot, k_rot, v = self._features(u[None], positions[None])  # [1, N, h, d_h]
        N, H = u.shape[0], self.heads
        ones, zeros = u.new_ones(len(slots), M, H), u.new_zeros(len(slots), M, H)
        num = runs.pack(
            tadn_step(
                s_pool,
                slots,
                lengths,
                runs.unpack(q_rot[0]),
                runs.unpack(k_rot[0]),
                runs.unpack(v[0]),
                ones,
                zeros,
                zeros,
            )
        )  # [N, h, d_h]
        z = z_pool[slots][:, None] + runs.unpack(k[0]).cumsum(1)  # [U, M, h, d_h]
        z_pool[slots] = z[torch.arange(len(slots), device=u.device), lengths - 1]
        seen = (positions + 1).to(u.dtype)[:, None]  # [N, 1]
        den = (q[0] * runs.pack(z)).sum(-1) + self.cfg.eps * seen  # [N, h]
        attended = (num / den[..., None]).reshape(N, -1)
        window = conv_pool[slots]  # [U, K-1, D]
        new = runs.unpack(u)  # [U, M, D]
        conv_pool[slots] = shift_window(window, new, lengths)
        shortcut = runs.pack(self._shortcut(torch.cat([window, new], dim=1)))
        return attended + shortcut


class GRELABlock(nn.Module):
    def __init__(self, cfg: RecGRELAConfig):
        super().__init__()
        D = cfg.d_model
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(D, eps=1e-12)
        self.norm2 = nn.LayerNorm(D, eps=1e-12)
        self.act_proj, self.in_proj, self.out_proj = (nn.Linear(D, D) for _ in range(3))
        self.mixer = RELA(cfg)
        self.mlp = MLP(D, cfg.dropout)
        self.drop_path = DropPath(cfg.drop_path)

    def _around(self, h: torch.Tensor, mix) -> torch.Tensor:
        """The block around its mixer; `mix(U)` runs RELA in either form."""
        x = self.norm1(h)
        gate = F.silu(self.act_proj(x)) if self.cfg.gate else 1.0
        y = self.drop_path(self.out_proj(mix(self.in_proj(x)) * gate))
        if self.cfg.layers == 1:  # the reference's single-layer form has no residual
            return self.mlp(self.norm2(y))
        h = h + y
        return h + self.mlp(self.norm2(h))

    def forward(self, h: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        return self._around(h, lambda u: self.mixer(u, first_position))

    def step(self, h: torch.Tensor, **state) -> torch.Tensor:
        return self._around(h, lambda u: self.mixer.step(u, **state))


# ---------------------------------------------------------------------------- stream state


@dataclass
class RecGRELAState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot.

    kv[l]:   [P, h, d_h, d_h] fp32  sum of (R_t k_t) v_t^T of layer l
    ksum[l]: [P, h, d_h]      fp32  sum of k_t (the normaliser)
    conv[l]: [P, K-1, D]      fp32  the layer's last K-1 values, oldest first
    count:   [P]              int64 events applied (the next RoPE position)
    last_ts: [P]              int64 time of the newest applied event
    recent:  [P, N, 6]        int64 the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2]     int64 its repeats and events; both None without a head
    """

    kv: list[torch.Tensor]
    ksum: list[torch.Tensor]
    conv: list[torch.Tensor]
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


# ---------------------------------------------------------------------------- the model


class RecGRELA(SequentialModel):
    NAME = "recgrela"
    CONFIG = RecGRELAConfig

    def __init__(
        self,
        cfg: RecGRELAConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
    ):
        super().__init__(cfg, items, categories)
        D = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items, D, padding_idx=0)
        if cfg.side_features:
            self.category_emb = nn.Embedding(cfg.num_categories, D, padding_idx=0)
            self.behavior_emb = nn.Embedding(NUM_BEHAVIORS, D, padding_idx=0)
        self.emb_norm = nn.LayerNorm(D, eps=1e-12)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GRELABlock(cfg) for _ in range(cfg.layers))
        self.repeat_head = (
            RepeatHead(cfg.repeat_head, cfg.d_model) if cfg.repeat_head is not None else None
        )
        self.apply(self._init_weights)

    def embed(self, item, category, behavior) -> torch.Tensor:
        x = self.item_emb(item)
        if self.cfg.side_features:
            x = x + self.category_emb(category) + self.behavior_emb(behavior)
        return self.emb_norm(self.dropout(x))  # the reference's order: dropout, then norm

    def forward(self, batch: EventBatch, first_position: int = 0) -> torch.Tensor:
        """User vectors after every event: [B, T, D] (garbage at padded positions). RoPE
        positions start at `first_position` (the outputs do not depend on it, up to
        rounding: see the module docstring)."""
        h = self.embed(batch.item, batch.category, batch.behavior)
        for block in self.blocks:
            h = block(h, first_position)
        return h

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> RecGRELAState:
        if not self.cfg.causal:
            raise ValueError("the non-causal reference form cannot stream: use causal=True")
        cfg, H = self.cfg, self.cfg.heads
        dh = cfg.d_model // H

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(num_slots, *shape, dtype=dtype, device=device)

        head = cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return RecGRELAState(
            kv=[zeros(H, dh, dh) for _ in range(cfg.layers)],
            ksum=[zeros(H, dh) for _ in range(cfg.layers)],
            conv=[zeros(cfg.conv_kernel - 1, cfg.d_model) for _ in range(cfg.layers)],
            count=zeros(dtype=torch.long),
            last_ts=zeros(dtype=torch.long),
            recent=recent[0],
            recent_counts=recent[1],
        )

    @torch.no_grad()
    def step(self, state: RecGRELAState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply each user's run of new events (batch rows, right-padded, in time order) to
        its slot of `state` in place; return the user vectors after each run [U, D]."""
        if self.training:
            raise RuntimeError("RecGRELA.step serves a trained model: call model.eval() first")
        runs = PackedRuns.of(batch.lengths, batch.item.shape[1])
        count = state.count[slots]
        h = self.embed(*(runs.pack(t) for t in (batch.item, batch.category, batch.behavior)))
        for layer, block in enumerate(self.blocks):
            h = block.step(
                h,
                runs=runs,
                slots=slots,
                count=count,
                s_pool=state.kv[layer],
                z_pool=state.ksum[layer],
                conv_pool=state.conv[layer],
            )
        rows = torch.arange(len(slots), device=h.device)
        state.count[slots] = count + batch.lengths
        state.last_ts[slots] = batch.ts[rows, batch.lengths - 1]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        return h[runs.newest]
