"""HSTU: the hierarchical sequential transduction unit of generative recommenders, in one file.

Follows "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations" (Zhai et al., ICML 2024) as its authors' research code has it
(GitHub facebookresearch/generative-recommenders, commit 2e81fab,
`generative_recommenders/research/modeling/sequential/hstu.py` and its ML-1M config; read,
not copied). Notation: events t = 0..T-1 of one user (item i_t, time ts_t in seconds),
d = d_model, h heads of d_h = d / h columns, N = max_len (N_max: the window, the cache size).

    x_t^0 = sqrt(d) E[i_t]                                   (dropout in training)
    block l (a sequential transduction unit), input X [T, d]:
      X^           = LayerNorm(X)                            no affine weights, eps 1e-6
      [U, V, Q, K] = SiLU(X^ W_uvqk)                         one fused projection, no bias;
                                                             each h x d_h wide, in that order
      per head:
        A_{t,s}    = SiLU(Q_t . K_s + rab_{t,s}) / N         for t - N < s <= t, else 0
        rab_{t,s}  = p[N - 1 - (t - s)] + b[bucket(|ts_t - ts_s|)]
        bucket(g)  = floor(ln(max(g, 1)) / 0.301) clipped to [0, 128]   (computed in fp64)
        O_t        = sum_s A_{t,s} V_s
      Y            = X + W_o Dropout(U * LayerNorm(concat_heads O))      LayerNorm: no affine
    user vector after event t:  u_t = x_t^L / ||x_t^L||
    score(item)               = u_t . E[item] / (||E[item]|| tau)        tau = 0.05

Each layer learns its own p (2N - 1 entries: p[N - 1 + s - t]; a causal model reads the
N with s <= t, the others are there for a bidirectional encoder) and b (129 entries), shared
by its heads. Attention is pointwise (SiLU, no softmax) and normalised by the constant N.

Where this differs from the reference, and why:
  - The reference reads at most N events, so its causal mask is the window above. Over a
    longer history the window slides: query t sees the keys t - N < s <= t of its layer.
    With T <= N the two are the same function.
  - Its /n is the padded length of its batches, always N (its mask's size); the same here,
    so neither padding nor where a window sits changes an output.
  - Its time-gap bias measures from the timestamp of the NEXT event (its data loader writes
    the target's time into the sequence); here from the query event's own time, because a
    stream does not know when a user's next event will come.
  - Its input adds a learned absolute position embedding (the position from the window's
    start). Left out: it would change every cached key whenever the window slides, and the
    relative position is already in rab.
  - The reference's L2-normalised user and item vectors with temperature 0.05 (its
    `l2_norm`, `item_l2_norm`, `temperature`) are kept: `item_table` returns E / (||E|| tau),
    so training logits are the reference's and the index ranks by cosine.

Streaming, exact: `step` keeps, per user and layer, K and V of the last N events, and per
user their timestamps and the number of events applied. Positions count events from the
user's first, 0-based: cache row j (oldest first) holds event count - N + j, and a new event
c sees it through the offset c - (count - N + j) only. rab depends on offsets and time gaps
only, /N is constant, and every layer's window is N wide in both forms, so a step equals
`forward` over the whole history. It equals `forward` over the LAST N events only with one
layer: from the second layer on, a cached key summarises its own event's window, so an
L-layer stack reaches back L (N - 1) + 1 events, as any windowed transformer with a KV cache
does. The model therefore exposes no `max_len` bound: the harness evaluates it over each
user's whole history (in O(T N)), which is what the stream serves.

With `repeat_head` set (not in the paper), ranking uses log P(i) of the repeat/explore
mixture over the user's recent distinct items (`repeat.py`), as for the other models; the
stream state then carries the head's buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, PackedRuns, shift_window
from hytrec.model.dropout import Dropout
from hytrec.model.events import Vocabulary
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config, new_recent, push_runs
from hytrec.model.streaming import SlotState


@dataclass(frozen=True)
class HSTUConfig:
    """The size the wave-2 design reads for HPGR's backbone: d 64, 2 layers, 2 heads,
    dropout 0.2, N 200 (the reference's ML-1M config: d 50, 2 layers, 1 head, N 200)."""

    num_items: int = 1000  # embedding rows, including the padding row 0
    d_model: int = 64
    layers: int = 2
    heads: int = 2  # Q, K, U, V each heads x (d_model / heads) wide
    max_len: int = 200  # N: keys each query sees, the cache size, the 1/N of the attention
    dropout: float = 0.2  # on the input and on U * LayerNorm(O)
    time_buckets: int = 128
    temperature: float = 0.05  # logits are cosines / temperature
    eps: float = 1e-6  # the layer norms and the L2 norms
    # the repeat/explore head over the user's recent distinct items (`repeat.py`); None = off
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))
        if self.num_items < 2:
            raise ValueError(f"HSTUConfig: num_items must be >= 2, got {self.num_items}")
        if self.d_model % self.heads:
            raise ValueError(
                f"HSTUConfig: d_model ({self.d_model}) must be divisible by heads ({self.heads})"
            )
        if self.layers < 1 or self.max_len < 1 or self.time_buckets < 1:
            raise ValueError("HSTUConfig: layers, max_len and time_buckets must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"HSTUConfig: temperature must be > 0, got {self.temperature}")


def time_bucket(gap: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """The reference's log buckets of int64 time gaps in seconds: floor(ln(max(|gap|, 1)) /
    0.301), clipped to [0, num_buckets]."""
    log_gap = torch.log(gap.abs().clamp(min=1).double()) / 0.301
    return log_gap.long().clamp(0, num_buckets)


def cache_window(count: torch.Tensor, N: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a run of M new events looks in a KV cache of N: key columns are the cache
    (column j holds event count - N + j) then the run (new event m is event count + m).
    Returns (offset [1, M, N + M]: how far back each column is from each new event, window
    [U, M, N + M]: the columns each new event may attend to, the last N events up to
    itself; a user with fewer than N events has empty columns at the front)."""
    columns = torch.arange(N + M, device=count.device)
    offset = (torch.arange(M, device=count.device)[:, None] + N - columns[None])[None]
    holds_event = columns[None] >= (N - count)[:, None]  # [U, N + M]
    return offset, (offset >= 0) & (offset < N) & holds_event[:, None]


class SequentialTransductionUnit(nn.Module):
    """One HSTU block: the parallel form (`forward`) and the cached serving form (`step`)
    share the projection, the attention and the output."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        d, N = cfg.d_model, cfg.max_len
        self.cfg, self.heads, self.head_dim = cfg, cfg.heads, d // cfg.heads
        self.uvqk = nn.Linear(d, 4 * d, bias=False)
        self.o = nn.Linear(d, d)
        self.rel_pos = nn.Parameter(torch.empty(2 * N - 1).normal_(std=0.02))  # p
        self.rel_time = nn.Parameter(torch.empty(cfg.time_buckets + 1).normal_(std=0.02))  # b
        self.dropout = Dropout(cfg.dropout)

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., d] -> U, V, Q, K, each [..., h, d_h]."""
        normed = F.layer_norm(x, (self.cfg.d_model,), eps=self.cfg.eps)
        uvqk = F.silu(self.uvqk(normed))  # [..., 4 d]
        return [t.unflatten(-1, (self.heads, self.head_dim)) for t in uvqk.chunk(4, dim=-1)]

    def attend(self, q, k, v, offset, gap, allowed, bias=None, keys_seen=None) -> torch.Tensor:
        """O = (SiLU(Q K^T + rab) / N * allowed) V for q [B, Tq, h, d_h] and k, v [B, Tk, h,
        d_h]; offset [1 or B, Tq, Tk] int64 (query index - key index), gap [B, Tq, Tk] int64
        (query time - key time), allowed [1 or B, Tq, Tk] bool -> [B, Tq, h, d_h]. HPGR adds
        a bias [B, h, Tq, Tk] to the logits and divides by its queries' key counts
        keys_seen [B, Tq, 1] instead of N."""
        N = self.cfg.max_len
        rab = (  # offsets outside the window are masked below: clamped only to stay in range
            self.rel_pos[N - 1 - offset.clamp(1 - N, N - 1)]
            + self.rel_time[time_bucket(gap, self.cfg.time_buckets)]
        )  # [B, Tq, Tk]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) + rab[:, None]  # [B, h, Tq, Tk]
        if bias is not None:
            logits = logits + bias
        norm = N if keys_seen is None else keys_seen[:, None]
        weights = F.silu(logits) / norm * allowed[:, None]
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)

    def output(self, x: torch.Tensor, u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Y = X + W_o Dropout(U * LayerNorm(O)); x [..., d], u and o [..., h, d_h]."""
        normed = F.layer_norm(o.flatten(-2), (self.cfg.d_model,), eps=self.cfg.eps)
        return x + self.o(self.dropout(u.flatten(-2) * normed))

    def forward(self, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], ts [B, T] -> [B, T, d]; query t sees the keys t - N < s <= t. Queries
        go in blocks of N (memory O(T N)), each block with the keys its window reaches."""
        T, N = x.shape[1], self.cfg.max_len
        u, v, q, k = self.project(x)
        out = []
        for start in range(0, T, N):
            stop, first = min(start + N, T), max(0, start - N + 1)
            queries = torch.arange(start, stop, device=x.device)[:, None]
            offset = (queries - torch.arange(first, stop, device=x.device)[None])[None]
            allowed = (offset >= 0) & (offset < N)  # [1, Tq, Tk]
            gap = ts[:, start:stop, None] - ts[:, None, first:stop]  # [B, Tq, Tk]
            out.append(
                self.attend(
                    q[:, start:stop], k[:, first:stop], v[:, first:stop], offset, gap, allowed
                )
            )
        return self.output(x, u, torch.cat(out, dim=1))

    def step(self, x, runs: PackedRuns, slots, key_pool, value_pool, offset, gap, allowed, **extra):
        """x [n, d]: a micro-batch's new events, packed; key_pool, value_pool [P, N, h, d_h]:
        each user's cached K and V, oldest first; offset, gap, allowed (and `attend`'s extra
        bias and keys_seen): over the keys [cached N, then the run's M] (see `HSTU.step`).
        Updates the pools in place; returns [n, d]."""
        u, v, q, k = self.project(x)  # [n, h, d_h] each
        new_k, new_v = runs.unpack(k), runs.unpack(v)  # [U, M, h, d_h]
        cached_k, cached_v = key_pool[slots], value_pool[slots]  # [U, N, h, d_h]
        o = self.attend(
            runs.unpack(q),
            torch.cat([cached_k, new_k], dim=1),
            torch.cat([cached_v, new_v], dim=1),
            offset,
            gap,
            allowed,
            **extra,
        )  # [U, M, h, d_h]
        key_pool[slots] = shift_window(cached_k, new_k, runs.lengths)
        value_pool[slots] = shift_window(cached_v, new_v, runs.lengths)
        return self.output(x, u, runs.pack(o))


# ---------------------------------------------------------------------------- stream state


@dataclass
class HSTUState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot.

    keys[l]:   [P, N, h, d_h] K of layer l for the user's last N events, oldest first
    values[l]: [P, N, h, d_h] V of layer l, the same events
    times:     [P, N] int64   their timestamps (the time-gap bias)
    count:     [P]    int64   events applied: row j holds event count - N + j (none if < 0)
    last_ts:   [P]    int64   time of the newest applied event
    recent:    [P, R, 6] int64 the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2] int64 its repeats and events; both None without a head
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    times: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


# ---------------------------------------------------------------------------- the model


class HSTU(SequentialModel):
    NAME = "hstu"
    CONFIG = HSTUConfig
    UNIT = SequentialTransductionUnit  # HPGR's blocks add the session bias

    def __init__(
        self,
        cfg: HSTUConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
    ):
        super().__init__(cfg, items, categories)
        self.item_emb = nn.Embedding(cfg.num_items, cfg.d_model, padding_idx=0)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(self.UNIT(cfg) for _ in range(cfg.layers))
        self.repeat_head = (
            RepeatHead(cfg.repeat_head, cfg.d_model) if cfg.repeat_head is not None else None
        )
        self.apply(self._init_weights)
        for block in self.blocks:  # the reference's init of W_o
            nn.init.xavier_uniform_(block.o.weight)

    def embed(self, item: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.item_emb(item) * math.sqrt(self.cfg.d_model))

    def item_table(self) -> torch.Tensor:
        """[num_items, d]: E / (||E|| tau), so that u . row = cosine / tau."""
        unit = F.normalize(self.item_emb.weight, dim=-1, eps=self.cfg.eps)
        return unit / self.cfg.temperature

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """Unit user vectors after every event: [B, T, d] (garbage at padded positions)."""
        x = self.embed(batch.item)
        for block in self.blocks:
            x = block(x, batch.ts)
        return F.normalize(x, dim=-1, eps=self.cfg.eps)

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> HSTUState:
        cfg = self.cfg
        rows = (cfg.max_len, cfg.heads, cfg.d_model // cfg.heads)
        dtype = self.item_emb.weight.dtype

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(num_slots, *shape, dtype=dtype, device=device)

        head = cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return HSTUState(
            keys=[zeros(*rows, dtype=dtype) for _ in range(cfg.layers)],
            values=[zeros(*rows, dtype=dtype) for _ in range(cfg.layers)],
            times=zeros(cfg.max_len),
            count=zeros(),
            last_ts=zeros(),
            recent=recent[0],
            recent_counts=recent[1],
        )

    @torch.no_grad()
    def step(self, state: HSTUState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply each user's run of new events (batch rows, right-padded, in time order) to
        its slot of `state` in place; return the unit user vectors after each run [U, d]."""
        if self.training:
            raise RuntimeError("HSTU.step serves a trained model: call model.eval() first")
        N, (U, M) = self.cfg.max_len, batch.item.shape
        device, lengths = batch.item.device, batch.lengths
        runs = PackedRuns.of(lengths, M)
        count = state.count[slots]
        cached_times = state.times[slots]  # [U, N]
        times = torch.cat([cached_times, batch.ts], dim=1)  # [U, N + M]: the cache, then the run
        offset, allowed = cache_window(count, N, M)
        gap = batch.ts[:, :, None] - times[:, None]  # [U, M, N + M]
        x = self.embed(runs.pack(batch.item))  # [n, d]
        for block, key_pool, value_pool in zip(self.blocks, state.keys, state.values, strict=True):
            x = block.step(x, runs, slots, key_pool, value_pool, offset, gap, allowed)
        state.times[slots] = shift_window(cached_times, batch.ts, lengths)
        state.count[slots] = count + lengths
        state.last_ts[slots] = batch.ts[torch.arange(U, device=device), lengths - 1]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        return F.normalize(x[runs.newest], dim=-1, eps=self.cfg.eps)
