"""HPGR: HSTU with sessions, and attention restricted to the past events a frozen item space
finds relevant.

HPGR ("Hierarchical and Preference-aware Generative Recommender", arXiv 2603.00980, WWW '26,
Huawei AppGallery) is readable here only as its abstract; this file follows the reading of
`shared/design/WAVE2-MODELS.md` section 3 (fidelity "reading": what is the paper's and what
is inferred is said in the README). Its backbone is HSTU (`hstu.py`): the blocks here are
HSTU's sequential transduction units, with two additions.

Sessions (computed from the batch's timestamps, as `data.sessionize` does on a log): a
session starts at a user's first event and wherever the gap to the previous event exceeds
`session_gap_s` (30 min); sigma(t) is its id counted from the user's first session, pi(t)
the event's position in it. In a training window cut from a longer history the window's
first event starts a session (its earlier events are not read).

Session Enhancement Module (SEM, `session_module`), for event t of item i_t:

    x_t          = sqrt(d) E[i_t] + B[beh_t] + T[bucket(ts_t - ts_{t-1})] + P[min(pi(t), P_max)]
    logits_{t,s} = Q_t . K_s + rab_{t,s} + b_sess[h, clip(sigma(t) - sigma(s), -S_max, S_max)]

P and b_sess are the SEM (left out with `session_module=False`); B (behaviour) and T (the
gap to the previous event, HSTU's log buckets) are inputs of both variants.

Every input feature is fixed when its event arrives and the session term is relative, so
the KV cache stays exact (an embedding of "sessions so far" would change every past token).

Preference-Guided Sparse Attention (PGSA, `top_k`): with Ebar the relevance table (the frozen
pre-trained item table, `selection="pretrained"`; or the model's own table, detached,
`selection="own"`), query t may attend to

    Sel(t) = {s : t - w < s <= t}  U  TopK_{t - N < s <= t - w} cos(Ebar[i_t], Ebar[i_s])

k (= `top_k`) relevant events of its window plus the last w (= `recent`); ties go to the
newest event, so the selection is deterministic. HSTU's pointwise attention is then divided
by |Sel(t)| instead of N (`top_k=None`: dense, Sel(t) is the whole window and the divisor
is its count). The relevance is computed in float64 and rounded to float32.

Serving (`step`): per user and layer K and V of the last N events, as HSTU, plus their item
ids (the relevance look-ups), times and session ids, and the newest event's session and
position. A step selects over the same window with the same relevance, so it equals
`forward` over the whole history (`hytrec check parity --model hpgr`).

The pre-training (session-based masked item modelling, `pretrain.py`) runs the same blocks
without the causal mask (`encode(..., bidirectional plan)`), where negative session
distances occur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.model.batch import EventBatch, PackedRuns, shift_window
from hytrec.model.events import NUM_BEHAVIORS
from hytrec.model.hstu import (
    HSTU,
    HSTUConfig,
    HSTUState,
    SequentialTransductionUnit,
    cache_window,
    time_bucket,
)
from hytrec.model.repeat import push_runs

SELECTIONS = ("own", "pretrained")


@dataclass(frozen=True)
class HPGRConfig(HSTUConfig):
    """HSTU's sizes (d 64, 2 layers, 2 heads, dropout 0.2, N 200) plus the reading's
    defaults: 30-minute sessions, S_max 16, P_max 32, k 32, w 8."""

    session_gap_s: float = 1800.0
    session_module: bool = True  # SEM: the in-session position input and the session bias
    max_session_distance: int = 16  # S_max
    max_session_position: int = 32  # P_max
    top_k: int | None = 32  # k: relevant events kept per query; None = dense attention
    recent: int = 8  # w: the newest events every query keeps
    selection: str = "own"  # the relevance table: "own" (detached) or "pretrained" (frozen)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"HPGRConfig: selection in {SELECTIONS}, got {self.selection!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"HPGRConfig: top_k must be >= 0 or None, got {self.top_k}")
        if self.recent < 1:
            raise ValueError(f"HPGRConfig: recent (w) must be >= 1, got {self.recent}")
        if self.session_gap_s <= 0:
            raise ValueError(f"HPGRConfig: session_gap_s must be > 0, got {self.session_gap_s}")


def continue_sessions(
    ts: torch.Tensor,
    prev_ts: torch.Tensor,
    prev_session: torch.Tensor,
    prev_position: torch.Tensor,
    has_prev: torch.Tensor,
    gap_s: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sessions of runs of events ts [B, M] (right-padded) that follow each row's previous
    event (time, session id, position [B]; has_prev [B] False for a user's first event):
    (session id, position in the session, gap to the previous event, 0 without one), each
    [B, M] int64 (garbage at padded positions)."""
    M = ts.shape[1]
    previous = torch.cat([prev_ts[:, None], ts[:, :-1]], dim=1)  # [B, M]
    first = torch.zeros_like(ts, dtype=torch.bool)
    first[:, 0] = ~has_prev
    gap = (ts - previous).masked_fill(first, 0)
    new = first | (gap > gap_s)
    session = prev_session[:, None] + new.long().cumsum(1)
    index = torch.arange(M, device=ts.device)[None]
    last_new = torch.cummax(torch.where(new, index, -1), dim=1).values  # [B, M]
    position = torch.where(last_new >= 0, index - last_new, prev_position[:, None] + 1 + index)
    return session, position, gap


def batch_sessions(batch: EventBatch, gap_s: float):
    """`continue_sessions` of rows that start at a user's first event (or a window's)."""
    zeros = torch.zeros_like(batch.lengths)
    return continue_sessions(batch.ts, zeros, zeros - 1, zeros, zeros.bool(), gap_s)


def preference_selection(relevance: torch.Tensor, candidates: torch.Tensor, k: int):
    """bool [..., Tk]: per query the k candidate keys of highest relevance [..., Tk], ties to
    the newest (keys in time order: the highest column). All candidates when they are <= k."""
    candidates = candidates.expand_as(relevance)
    if k >= relevance.shape[-1]:
        return candidates
    score = relevance.masked_fill(~candidates, float("-inf")).flip(-1)  # newest key first
    newest_first = score.argsort(dim=-1, descending=True, stable=True)[..., :k]
    chosen = torch.zeros_like(candidates).scatter_(-1, relevance.shape[-1] - 1 - newest_first, True)
    return chosen & candidates


@dataclass
class KeyBlock:
    """The keys a block of queries reads (`HPGR.causal_plan`, `bidirectional_plan`), shared
    by the layers: queries [q0, q1) read keys [k0, k1) of the same rows."""

    queries: slice
    keys: slice
    offset: torch.Tensor  # [1, Tq, Tk] query index - key index
    gap: torch.Tensor  # [B, Tq, Tk] query time - key time
    allowed: torch.Tensor  # [B, Tq, Tk] bool
    distance: torch.Tensor  # [B, Tq, Tk] query session - key session

    @property
    def keys_seen(self) -> torch.Tensor:
        """[B, Tq, 1] the attention's divisor: keys each query reads (>= 1)."""
        return self.allowed.sum(-1, keepdim=True).clamp(min=1)


class SessionTransductionUnit(SequentialTransductionUnit):
    """HSTU's unit with the SEM's per-head bias on the relative session distance."""

    def __init__(self, cfg: HPGRConfig):
        super().__init__(cfg)
        S = cfg.max_session_distance
        self.rel_session = (
            nn.Parameter(torch.empty(cfg.heads, 2 * S + 1).normal_(std=0.02))
            if cfg.session_module
            else None
        )

    def session_bias(self, distance: torch.Tensor) -> torch.Tensor | None:
        """distance [B, Tq, Tk] -> b_sess [B, h, Tq, Tk], or None without SEM."""
        if self.rel_session is None:
            return None
        S = self.cfg.max_session_distance
        return self.rel_session[:, distance.clamp(-S, S) + S].movedim(0, 1)


@dataclass(kw_only=True)
class HPGRState(HSTUState):
    """HSTU's state (`HSTUState`) plus, per slot:

    items:    [P, N] int64 item ids of the cached events (the relevance look-ups)
    sessions: [P, N] int64 their session ids
    session:  [P]    int64 the newest event's session id
    position: [P]    int64 its position in that session
    """

    items: torch.Tensor
    sessions: torch.Tensor
    session: torch.Tensor
    position: torch.Tensor


class HPGR(HSTU):
    NAME = "hpgr"
    CONFIG = HPGRConfig
    UNIT = SessionTransductionUnit
    NEEDS_TIMESTAMPS = True  # `registry.build_model` refuses logs whose ts are positions

    def __init__(self, cfg: HPGRConfig, items=None, categories=None):
        super().__init__(cfg, items, categories)
        d = cfg.d_model
        self.behavior_emb = nn.Embedding(NUM_BEHAVIORS, d)
        self.gap_emb = nn.Embedding(cfg.time_buckets + 1, d)
        self.position_emb = (
            nn.Embedding(cfg.max_session_position + 1, d) if cfg.session_module else None
        )
        for emb in (self.behavior_emb, self.gap_emb, self.position_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        if cfg.selection == "pretrained":  # Ebar: filled by `start_from`, frozen
            self.register_buffer("pretrained_items", torch.zeros(cfg.num_items, d))
            self.register_buffer("has_pretrained", torch.tensor(False))

    # ------------------------------------------------------------------ pre-trained table

    @torch.no_grad()
    def start_from(self, pretrained: HSTU) -> None:
        """Take a pre-trained model's item table (`pretrain.py`) as the item embeddings to
        fine-tune and, with `selection="pretrained"`, as the frozen relevance table."""
        if pretrained.items != self.items or pretrained.item_emb.weight.shape != (
            self.item_emb.weight.shape
        ):
            raise ValueError(
                "the pre-trained checkpoint's item vocabulary or width differs from this "
                "model's (pre-train on the same dataset with the same d_model)"
            )
        self.item_emb.weight.copy_(pretrained.item_emb.weight)
        if self.cfg.selection == "pretrained":
            self.pretrained_items.copy_(pretrained.item_emb.weight)
            self.has_pretrained.fill_(True)

    def relevance_table(self) -> torch.Tensor:
        """[num_items, d] Ebar, no gradient."""
        if self.cfg.selection == "own":
            return self.item_emb.weight.detach()
        if not bool(self.has_pretrained):
            raise RuntimeError(
                "HPGR with selection='pretrained' has no pre-trained item table: train with "
                "--init-from a `hytrec pretrain mim` checkpoint"
            )
        return self.pretrained_items

    def relevance(self, query_items: torch.Tensor, key_items: torch.Tensor) -> torch.Tensor:
        """cos(Ebar[query], Ebar[key]): [B, Tq] x [B, Tk] -> [B, Tq, Tk]; in float64,
        rounded to float32, so that equal items tie exactly whatever the shapes the two
        forms compute them in (ties then go to the newest)."""
        table = self.relevance_table()
        q = F.normalize(table[query_items].double(), dim=-1)
        k = F.normalize(table[key_items].double(), dim=-1)
        return torch.einsum("bqd,bkd->bqk", q, k).float()

    def select(self, query_items, key_items, offset, window) -> torch.Tensor:
        """PGSA: bool [B, Tq, Tk], the window's last w keys and its k most relevant older
        ones; the whole window when dense (`top_k=None`)."""
        cfg = self.cfg
        if cfg.top_k is None:
            return window
        recent = offset < cfg.recent
        relevant = preference_selection(
            self.relevance(query_items, key_items), window & ~recent, cfg.top_k
        )
        return window & (recent | relevant)

    # ------------------------------------------------------------------ parallel form

    def embed_events(self, item_vectors, behavior, position, gap) -> torch.Tensor:
        """x_t of the SEM from item vectors [..., d] (E[i_t], or the [MASK] vector) and the
        event's behaviour, in-session position and gap to the previous event."""
        cfg = self.cfg
        x = item_vectors * math.sqrt(cfg.d_model) + self.behavior_emb(behavior)
        x = x + self.gap_emb(time_bucket(gap, cfg.time_buckets))
        if self.position_emb is not None:
            x = x + self.position_emb(position.clamp(0, cfg.max_session_position))
        return self.dropout(x)

    def causal_plan(self, batch: EventBatch, session: torch.Tensor) -> list[KeyBlock]:
        """Query t reads Sel(t) within its window t - N < s <= t; queries go in blocks of N
        (memory O(T N)), each with the keys its window reaches."""
        T, N, ts = batch.item.shape[1], self.cfg.max_len, batch.ts
        plan = []
        for start in range(0, T, N):
            stop, first = min(start + N, T), max(0, start - N + 1)
            queries = torch.arange(start, stop, device=ts.device)[:, None]
            offset = (queries - torch.arange(first, stop, device=ts.device)[None])[None]
            window = (offset >= 0) & (offset < N)  # [1, Tq, Tk]
            allowed = self.select(
                batch.item[:, start:stop], batch.item[:, first:stop], offset, window
            ).expand(len(ts), -1, -1)
            plan.append(
                KeyBlock(
                    slice(start, stop),
                    slice(first, stop),
                    offset,
                    ts[:, start:stop, None] - ts[:, None, first:stop],
                    allowed,
                    session[:, start:stop, None] - session[:, None, first:stop],
                )
            )
        return plan

    def bidirectional_plan(self, batch: EventBatch, session: torch.Tensor) -> list[KeyBlock]:
        """Every real event reads every real event of its row (pre-training; T <= N)."""
        T, ts = batch.item.shape[1], batch.ts
        if T > self.cfg.max_len:
            raise ValueError(f"bidirectional encoding reads at most N={self.cfg.max_len} events")
        index = torch.arange(T, device=ts.device)
        allowed = batch.mask[:, None, :].expand(-1, T, -1)  # [B, T, T]
        return [
            KeyBlock(
                slice(0, T),
                slice(0, T),
                (index[:, None] - index[None])[None],
                ts[:, :, None] - ts[:, None],
                allowed,
                session[:, :, None] - session[:, None],
            )
        ]

    def encode(self, x: torch.Tensor, batch: EventBatch, plan: list[KeyBlock]) -> torch.Tensor:
        """The blocks over inputs x [B, T, d] with the plan's keys: unit vectors [B, T, d]."""
        for block in self.blocks:
            u, v, q, k = block.project(x)
            out = [
                block.attend(
                    q[:, kb.queries],
                    k[:, kb.keys],
                    v[:, kb.keys],
                    kb.offset,
                    kb.gap,
                    kb.allowed,
                    bias=block.session_bias(kb.distance),
                    keys_seen=kb.keys_seen.to(x.dtype),
                )
                for kb in plan
            ]
            x = block.output(x, u, torch.cat(out, dim=1))
        return F.normalize(x, dim=-1, eps=self.cfg.eps)

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """Unit user vectors after every event: [B, T, d] (garbage at padded positions)."""
        session, position, gap = batch_sessions(batch, self.cfg.session_gap_s)
        x = self.embed_events(self.item_emb(batch.item), batch.behavior, position, gap)
        return self.encode(x, batch, self.causal_plan(batch, session))

    @torch.no_grad()
    def selected_keys(self, batch: EventBatch) -> torch.Tensor:
        """bool [B, T, T]: which keys each query reads (tests, and the FLOPs fraction)."""
        session = batch_sessions(batch, self.cfg.session_gap_s)[0]
        B, T = batch.item.shape
        out = torch.zeros(B, T, T, dtype=torch.bool, device=batch.item.device)
        for kb in self.causal_plan(batch, session):
            out[:, kb.queries, kb.keys] = kb.allowed
        return out

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> HPGRState:
        base = super().new_state(num_slots, device)

        def zeros(*shape):
            return torch.zeros(num_slots, *shape, dtype=torch.long, device=device)

        N = self.cfg.max_len
        return HPGRState(
            **{f.name: getattr(base, f.name) for f in fields(base)},
            items=zeros(N),
            sessions=zeros(N),
            session=zeros(),
            position=zeros(),
        )

    @torch.no_grad()
    def step(self, state: HPGRState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply each user's run of new events (batch rows, right-padded, in time order) to
        its slot of `state` in place; return the unit user vectors after each run [U, d]."""
        if self.training:
            raise RuntimeError("HPGR.step serves a trained model: call model.eval() first")
        N, (U, M) = self.cfg.max_len, batch.item.shape
        device, lengths = batch.item.device, batch.lengths
        runs = PackedRuns.of(lengths, M)
        count = state.count[slots]
        has_prev = count > 0
        session, position, gap = continue_sessions(
            batch.ts,
            state.last_ts[slots],
            torch.where(has_prev, state.session[slots], -1),
            state.position[slots],
            has_prev,
            self.cfg.session_gap_s,
        )  # [U, M] each
        cached = {name: getattr(state, name)[slots] for name in ("times", "items", "sessions")}
        # key columns: the cache (column j holds event count - N + j), then the run
        times = torch.cat([cached["times"], batch.ts], dim=1)  # [U, N + M]
        items = torch.cat([cached["items"], batch.item], dim=1)
        sessions = torch.cat([cached["sessions"], session], dim=1)
        offset, window = cache_window(count, N, M)
        allowed = self.select(batch.item, items, offset, window)
        keys_seen = allowed.sum(-1, keepdim=True).clamp(min=1)  # [U, M, 1]
        distance = session[:, :, None] - sessions[:, None]
        key_gap = batch.ts[:, :, None] - times[:, None]
        x = self.embed_events(
            self.item_emb(runs.pack(batch.item)),
            runs.pack(batch.behavior),
            runs.pack(position),
            runs.pack(gap),
        )  # [n, d]
        for block, key_pool, value_pool in zip(self.blocks, state.keys, state.values, strict=True):
            x = block.step(
                x,
                runs,
                slots,
                key_pool,
                value_pool,
                offset,
                key_gap,
                allowed,
                bias=block.session_bias(distance),
                keys_seen=keys_seen.to(x.dtype),
            )
        for name, new in (("times", batch.ts), ("items", batch.item), ("sessions", session)):
            getattr(state, name)[slots] = shift_window(cached[name], new, lengths)
        newest = (torch.arange(U, device=device), lengths - 1)
        state.count[slots] = count + lengths
        state.last_ts[slots] = batch.ts[newest]
        state.session[slots] = session[newest]
        state.position[slots] = position[newest]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        return F.normalize(x[runs.newest], dim=-1, eps=self.cfg.eps)


__all__ = [
    "HPGR",
    "HPGRConfig",
    "HPGRState",
    "KeyBlock",
    "batch_sessions",
    "continue_sessions",
    "preference_selection",
]
