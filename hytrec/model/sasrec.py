"""SASRec, the reference point for sequential recommendation, in one small file.

Follows "Self-Attentive Sequential Recommendation" (Kang and McAuley, ICDM 2018): item
embeddings plus learned positions, a stack of causal softmax self-attention blocks, and
scores as dot products with the (shared) item embeddings:

    x_t   = item[i_t] + pos[t]                            t = 0 .. T-1, T <= max_len
    h     = L pre-norm blocks: x + Attn(LN x), then x + FFN(LN x), attention causal
    u_t   = LN(h_t),      score(item) = u_t . item

It reads only item ids (no categories, behaviours or time), and at most `max_len` events:
the harness feeds it each user's last `max_len`. Served, it keeps each user's last `max_len`
item ids and recomputes the whole window for every micro-batch (`step`): exact, and the
cost a softmax model pays per event that a recurrent state avoids. With `repeat_head` set,
ranking uses log P(i) of the repeat/explore mixture over the user's recent distinct items
(`repeat.py`; the head reads the stages and times of the same events). Scoring, checkpoints and
vocabularies come from `base.SequentialModel`, as for every registered model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, shift_window
from hytrec.model.dropout import Dropout
from hytrec.model.events import Vocabulary
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config, new_recent, push_runs
from hytrec.model.streaming import SlotState


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int = 1000  # including the padding row 0
    d_model: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50  # learned positions: the longest input it reads
    ffn_mult: int = 4
    dropout: float = 0.1
    # the repeat/explore head over the user's recent distinct items (`repeat.py`); None = off
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))


@dataclass
class SASRecState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot.

    window:  [P, max_len] int64  the last max_len item ids, oldest first, newest at the end
    count:   [P]          int64  events applied
    last_ts: [P]          int64  time of the newest applied event
    recent:  [P, N, 6]    int64  the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2] int64  its repeats and events; both None without a head
    """

    window: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (
            t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, dh]
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        # right padding: a real position never sees a later (pad) one, so a causal mask is all
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * d, d),
            Dropout(cfg.dropout),
        )
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.ffn(self.ln2(x))


class SASRec(SequentialModel):
    NAME = "sasrec"
    CONFIG = SASRecConfig

    def __init__(
        self,
        cfg: SASRecConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
    ):
        super().__init__(cfg, items, categories)
        self.item_emb = nn.Embedding(cfg.num_items, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.repeat_head = (
            RepeatHead(cfg.repeat_head, cfg.d_model) if cfg.repeat_head is not None else None
        )
        self.apply(self._init_weights)

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """User vectors after every event: [B, T, d] (garbage at padded positions)."""
        T = batch.item.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(
                f"SASRec reads at most {self.cfg.max_len} events, got {T}: feed the last max_len"
            )
        pos = torch.arange(T, device=batch.item.device)
        x = self.dropout(self.item_emb(batch.item) + self.pos_emb(pos))  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> SASRecState:
        def zeros(*shape):
            return torch.zeros(num_slots, *shape, dtype=torch.long, device=device)

        head = self.cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return SASRecState(
            window=zeros(self.cfg.max_len),
            count=zeros(),
            last_ts=zeros(),
            recent=recent[0],
            recent_counts=recent[1],
        )

    def recent_items(self, state: SASRecState, slots: torch.Tensor, n: int) -> torch.Tensor:
        """[U, min(n, max_len)] the items of these users' last n events, oldest first."""
        return state.window[slots, -n:]

    @torch.no_grad()
    def step(self, state: SASRecState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Append each user's run of new events to its window and recompute the user vector
        over the window: [U, d], equal to `forward` over the user's last max_len events."""
        if self.training:
            raise RuntimeError("SASRec.step serves a trained model: call model.eval() first")
        W, lengths = self.cfg.max_len, batch.lengths
        window = shift_window(state.window[slots], batch.item, lengths)  # [U, W], newest last
        count = state.count[slots] + lengths
        n = count.clamp(max=W)  # real events in the window, right-aligned
        offsets = torch.arange(W, device=window.device)[None]  # [1, W]
        real = offsets < n[:, None]
        left = window.gather(1, ((W - n)[:, None] + offsets).clamp(max=W - 1)) * real
        zeros = torch.zeros_like(left)
        u = self(EventBatch(left, zeros, zeros, zeros, lengths=n))  # [U, W, d]
        rows = torch.arange(len(slots), device=u.device)
        state.window[slots] = window
        state.count[slots] = count
        state.last_ts[slots] = batch.ts[rows, lengths - 1]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        return u[rows, n - 1]
