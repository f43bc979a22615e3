"""ULIM: category-aware dual interests, a pointer-generator over categories, and the
category-to-item cascade (a READING of arXiv 2507.10097, RecSys '25; only its abstract is
readable here: `../shared/design/WAVE2-MODELS.md` section 5 gives the reading followed).

Read from the abstract: the history is split into per-category subsequences, each with a
long- and a short-term interest learned jointly; a Pointer-Generator Interest Network
(PGIN) predicts the next category by copying one from the history or generating a new
one; items are retrieved only inside the top-K predicted categories. Everything below is
inferred from the prior work it names (the pointer-generator of See et al. 2017):

    x_i   = E[item_i] + B[beh_i] + T[bucket(t_i - t_{i-1})]               an event
    slot c: the user's last L_c = 50 events of category c, their count n_c, last time, stage
    l^c   = softmax-attention with query C[c] W_q over { sink(C[c]) } + the slot's events
            (the sink, C[c]'s own key and value, makes a category the user never touched
            well defined: the cascade must search generated categories too)
    s^c   = attention over the slot's last m = 5 events, the newest event as the query
    g^c   = sigmoid(W_g [l^c ; s^c] + b),   u^c = LN(g^c l^c + (1 - g^c) s^c)
    s     = the same read-out over the user's last K = 20 events (any category)
    h_c   = W_1 [C[c] ; u^c ; log(1 + n_c) ; B[stage_c]] + A[bucket(t_now - t_last^c)]
    a_c   = softmax_c( v . tanh(W_h h_c + W_s s + b) )        over the user's slots
    h*    = sum_c a_c h_c
    P_gen = softmax( W_o [s ; h*] . C + b_c )                  over all categories
    p_gen = sigmoid( w . [h* ; s ; C[c_now]] + b )             (pointer=False: p_gen = 1)
    P(c)  = p_gen P_gen(c) + (1 - p_gen) a_c                   (a_c = 0 off the user's slots)

Loss at every position, for the next event (item i*, category c*):

    L = CE(u^{c*} . E, i*) + beta (CE(l^{c*} . E, i*) + CE(s^{c*} . E, i*)) - lambda log P(c*)

with beta = 0.25, lambda = 1; a sampled CE draws the shared uniform negatives of the
harness plus up to 64 items of c* (in-category negatives: the cascade ranks inside c*).

The user term (`user_term`, off by default; not in the reading): every category's interest,
wherever it scores items, is v^c = u^c + W_u s, W_u from 0 (the reading's model at the
start). Without it the items of a category the user never touched are ranked by the sink
alone, the same for every user, and those of a touched one by that category's few events;
where most next events change category (ML-100K's genre sets: the next event repeats the
last one's 7.6 % of the time) the ranking inside the predicted categories then knows little
of the user. Below, u^{c*} in the item losses and u^{cat(x)} in the cascade are v^c when it
is on.

The cross interest (`cross_interest`, off by default; not in the reading) adds to v^c what the
user's last K events say about category c, whatever their own categories:

    a^c = softmax-attention with query W_q C[c] over the user's last K events x (keys and
          values one map W_kv x),        v^c = u^c + W_u s + W_x a^c,   W_x from 0

W_u s is the same for every category; a^c reads the recent events that bear on c (a comedy
watched after three thrillers), where u^c knows only c's own few events. In training a^{c*}
is formed at every position over the band of its last K events with the next category's
query; serving forms it from the user's window, one [C, K] attention per user.

Cascade (`cascade_scores`): for items whose category is among the top K of P (K = None:
every category), -inf elsewhere,

    score(x) = log P(cat(x)) + log P(x | cat(x)),   P(x | c) = softmax_{x' in c}(u^c . e_{x'})[x]

the log of a distribution over the items, P(c) P(x | c) (`merge` "joint"). The abstract says
only that items are retrieved inside the top categories; the merge by log P(c) + u^c . e_x
(`merge` "dot", the design's reading, WAVE2-MODELS.md 5.2) adds logits of different
scales: each category's dot products carry their own normaliser, and the item losses'
softmax over all items already prices the category in. The joint merge ranks better on
ML-100K and Taobao (README, ULIM). Within a category both order the items by u^c . e_x, so
the engine still makes one search per category and adds a per-category offset
(`merge_offset`).

With the repeat head (`repeat_head`; not in the reading, `repeat.py`): its explore side is
the cascade as a distribution over items,

    P_explore(x) = P(cat(x)) softmax_{x' in cat(x)}(u^{cat(x)} . e_{x'})[x]

inside the top K categories and 0 outside them, not renormalised over them: training learns
the gate against the ungated distribution, so ranking leaves the other categories' items
out without inflating the rest by 1 / P(top K); its user vector is u^{c_t}, the interest of
the category just touched. Training replaces the loss's first item term by the
mixture's -log P(i*), with P(i* | c*) over the in-category draws, their logits shifted by
log(n_c / S_c) (exact under the full softmax). Within a category P_explore orders items as
u^c . e_x does, so the engine's per-category searches still find its explore candidates.

Forms. The training form (`forward_all`) forms l^c after every event at once: the slot's
events all share the category's query, so each event's logit is formed once and a slot is
a mask over the [T, T] events (same category, among its last L_c up to t); the pointer runs
over (position, slot) pairs with the slots', ages' and users' maps formed once. The serving form
(`new_state`, `step`, `read_state`) keeps the slots per user (a ring of the last L_c events
of each, the key category + 1, 0 = empty) and updates one slot per event; each slot's u^c
is kept beside it and formed again only when the slot has taken events since. Both give the same
u^c and P(c) while a user has at most `slots` categories (tested); beyond, the stream evicts
the least frequent slot (ties: least recent) and counts it in `evictions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.model.base import SequentialModel, full_softmax_log_prob
from hytrec.model.batch import EventBatch, shift_window
from hytrec.model.dropout import Dropout
from hytrec.model.events import NUM_BEHAVIORS, Vocabulary
from hytrec.model.hytrec import gap_bucket, sequence_gaps
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config, new_recent, push_runs
from hytrec.model.streaming import SlotState

# log P_explore's floor: a target whose category P(c) gives no mass (the unknown category
# without the pointer) must not make the head's mixture -inf
LOG_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class ULIMConfig:
    num_items: int = 1000  # including the padding row 0
    num_categories: int = 100  # including the unknown row 0
    d_model: int = 64
    slots: int = 64  # M_max: category slots per user
    slot_len: int = 50  # L_c: events kept per slot (the long-term subsequence)
    short_len: int = 5  # m: the slot's newest events the short-term read-out sees
    window: int = 20  # K: the user's last events (any category) behind s
    time_buckets: int = 40  # log2-spaced buckets of gaps in seconds
    dropout: float = 0.1
    pointer: bool = True  # False: p_gen = 1 (generator only: "ULIM without the pointer")
    aux_weight: float = 0.25  # beta: the long- and short-term parts' own item losses
    category_weight: float = 1.0  # lambda: the next-category loss
    category_negatives: int = 64  # in-category negatives per position (sampled softmax)
    top_categories: int | None = 10  # K of the cascade; None = every category
    # the cascade's merge: "joint" ranks by log P(c) P(x | c), P(x | c) the softmax of
    # u^c . e over c's items; "dot" by log P(c) + u^c . e_x (module docstring)
    merge: str = "joint"
    # u^c + W_u s: every category's interest also reads the user's last K events (not in
    # the reading; module docstring; "ULIM + user term" in the accuracy files)
    user_term: bool = False
    # + W_x a^c: attention over the user's last K events with c's query (not in the
    # reading; module docstring; "ULIM + user term + cross interest" in the accuracy files)
    cross_interest: bool = False
    # the repeat/explore head over the user's recent distinct items (`repeat.py`; not in
    # the reading), mixed with the cascade as a distribution (module docstring)
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))
        if self.num_items < 2 or self.num_categories < 1:
            raise ValueError("ULIMConfig: num_items >= 2 and num_categories >= 1")
        if not 1 <= self.short_len <= self.slot_len or self.slots < 1 or self.window < 1:
            raise ValueError("ULIMConfig: 1 <= short_len <= slot_len, slots >= 1, window >= 1")
        if self.top_categories is not None and self.top_categories < 1:
            raise ValueError("ULIMConfig: top_categories >= 1 or None")
        if self.merge not in ("joint", "dot"):
            raise ValueError(f"ULIMConfig: merge is 'joint' or 'dot', not {self.merge!r}")


@dataclass
class ULIMState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot (user).

    slot_key:   [P, M]    int64  category + 1 of each category slot, 0 = empty
    slot_item, slot_behavior, slot_bucket: [P, M, L] int64  the slot's last L events
                (item, stage, gap bucket), oldest first, newest at L - 1
    slot_count: [P, M]    int64  events of the category applied (also those no longer held)
    slot_last_ts: [P, M]  int64  time of the category's newest event
    slot_interest: [P, M, d] fp32  u^c of each slot as of its last read (`read_state`): a
                read computes it again only for the slots that took events since
    slot_stale: [P, M]    bool   the slot took events since its interest was computed
    window_item, window_behavior, window_bucket: [P, K] int64  the user's last K events
    last_category: [P]    int64  category of the newest event
    evictions:  [P]       int64  slots this user lost to the cap
    count:      [P]       int64  events applied
    last_ts:    [P]       int64  time of the newest applied event
    recent:     [P, R, 6] int64  the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2] int64  its repeats and events; both None without a head
    """

    slot_key: torch.Tensor
    slot_item: torch.Tensor
    slot_behavior: torch.Tensor
    slot_bucket: torch.Tensor
    slot_count: torch.Tensor
    slot_last_ts: torch.Tensor
    slot_interest: torch.Tensor
    slot_stale: torch.Tensor
    window_item: torch.Tensor
    window_behavior: torch.Tensor
    window_bucket: torch.Tensor
    last_category: torch.Tensor
    evictions: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


@dataclass
class Readout:
    """What the model reads after an event: log P(c) over every category [N, C], the
    interest of each of the user's slots [N, M, d] (without the user term) with its category
    [N, M] (-1 = none), the user term W_u s [N, d] every category's interest adds and, with
    the cross interest, the user's window as its keys and values [N, K, 2d] with the events
    held [N, K]."""

    log_p: torch.Tensor
    slot_category: torch.Tensor
    slot_interest: torch.Tensor
    user_term: torch.Tensor
    window_key_value: torch.Tensor | None = None
    window_valid: torch.Tensor | None = None


@dataclass
class CascadePlan:
    """A serving read-out for the engine: each user's top K categories [U, K] by log P(c),
    their log P(c) [U, K] and interests u^c [U, K, d]; with the repeat head, its user vector
    [U, d] and the cascade's log P_explore [U, num_items] (`ULIM._head_inputs`)."""

    categories: torch.Tensor
    log_p: torch.Tensor
    interests: torch.Tensor
    head_user: torch.Tensor | None = None
    explore: torch.Tensor | None = None


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax of logits [..., J] over the entries keep [..., J] allows; a row that allows
    none reads 0 (not nan)."""
    some = keep.any(-1, keepdim=True)
    return logits.masked_fill(~keep & some, float("-inf")).softmax(-1) * keep


def _band(T: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(age, band) [T(t), T(j)]: t - j, and whether j is among t's last `length` positions
    (t itself included)."""
    pos = torch.arange(T, device=device)
    age = pos[:, None] - pos[None, :]
    return age, (age >= 0) & (age < length)


class NewestQueryReadout(nn.Module):
    """One attention read-out over a ring of events (oldest first, newest last): the newest
    event is the query, every valid event a key, each tagged with its age (0 = newest). An
    empty ring reads 0."""

    def __init__(self, d: int, length: int):
        super().__init__()
        self.age = nn.Embedding(length, d)
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [N, L, d], valid [N, L] -> [N, d]."""
        L, d = x.shape[1], x.shape[2]
        x = x + self.age(torch.arange(L - 1, -1, -1, device=x.device))
        q = self.query(x[:, -1])  # [N, d]
        k, v = self.key_value(x).chunk(2, dim=-1)  # [N, L, d] each
        weights = _masked_softmax(torch.einsum("nld,nd->nl", k, q) / math.sqrt(d), valid)
        some = valid.any(1, keepdim=True)  # [N, 1]
        return self.out(torch.einsum("nl,nld->nd", weights, v)) * some

    def forward_every(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`forward` after every position t of rows x [B, T, d] (real [B, T], padding on the
        right) over its ring of the last L events t-L+1..t, at once: [B, T, d]. A key or
        value is W (x_j + age[t - j]) + b, so the events and the L ages are mapped once
        and the rings are a band of a [T, T] attention, never [B, T, L, d] copies."""
        L, d, T = self.age.num_embeddings, x.shape[-1], x.shape[1]
        q = self.query(x + self.age.weight[0])  # [B, T, d]: each ring's newest event
        k, v = self.key_value(x).chunk(2, dim=-1)  # [B, T, d] each, with the bias
        k_age, v_age = F.linear(self.age.weight, self.key_value.weight).chunk(2, dim=-1)  # [L, d]
        age, ring = _band(T, L, x.device)  # [T, T] each
        logits = q @ k.transpose(1, 2) + (q @ k_age.T).gather(
            2, age.clamp(0, L - 1).expand(len(x), T, T)
        )  # [B, T, T]
        some = real[..., None]  # [B, T, 1]: a real newest event (itself in its ring)
        weights = _masked_softmax(logits / math.sqrt(d), ring & some)
        # the weight on each age a: that of event t - a (none before the row's start)
        pos, ages = torch.arange(T, device=x.device), torch.arange(L, device=x.device)
        at = pos[:, None] - ages[None, :]  # [T, L]
        by_age = weights.gather(2, at.clamp(min=0).expand(len(x), T, L)) * (at >= 0)
        return self.out(weights @ v + by_age @ v_age) * some


# (user, item) pairs per chunk of `ULIM.cascade_scores`: its [pairs, d] gathers then fit in
# the cache (one large gather costs more in fresh memory than in reads: 2^18 pairs 3x 2^14's)
CASCADE_CHUNK = 1 << 14
# (user, window event, item) triples per chunk of the cross interest's dots (`_cross_dots`)
CROSS_CHUNK = 1 << 22


def _segment_logsumexp(x: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """log sum exp of x [P] within each group (group [P] in 0..groups-1): [groups], -inf for
    a group without a finite member."""
    top = x.new_full((groups,), float("-inf")).scatter_reduce(
        0, group, x.detach(), "amax", include_self=True
    )
    top = torch.where(torch.isfinite(top), top, 0.0)
    return top + x.new_zeros(groups).index_add(0, group, (x - top[group]).exp()).log()


def category_logsumexp(
    x: torch.Tensor, item_category: torch.Tensor, categories: int
) -> torch.Tensor:
    """log sum exp of x [U, N] over each category's items (item_category [N]): [U, categories],
    -inf for a category without a finite member (e.g. log P(c) from log P(x))."""
    U = x.shape[0]
    group = (torch.arange(U, device=x.device)[:, None] * categories + item_category).view(-1)
    return _segment_logsumexp(x.reshape(-1), group, U * categories).view(U, categories)


def _segment_softmax(logits: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Softmax of logits [P] within each group (group [P] in 0..groups-1)."""
    return (logits - _segment_logsumexp(logits, group, groups)[group]).exp()


class ULIM(SequentialModel):
    NAME = "ulim"
    NEEDS_CATEGORIES = True  # `registry.build_model` refuses logs without item categories
    CONFIG = ULIMConfig

    def __init__(
        self,
        cfg: ULIMConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
    ):
        super().__init__(cfg, items, categories)
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.category_emb = nn.Embedding(cfg.num_categories, d)
        self.behavior_emb = nn.Embedding(NUM_BEHAVIORS, d, padding_idx=0)
        self.gap_emb = nn.Embedding(cfg.time_buckets, d)
        self.dropout = Dropout(cfg.dropout)
        # dual interest per category
        self.long_query = nn.Linear(d, d)
        self.long_key_value = nn.Linear(d, 2 * d)
        self.short = NewestQueryReadout(d, cfg.short_len)
        self.gate = nn.Linear(2 * d, d)
        self.interest_norm = nn.LayerNorm(d)
        # PGIN
        self.user_short = NewestQueryReadout(d, cfg.window)
        self.slot_features = nn.Linear(3 * d + 1, d)
        self.slot_age = nn.Embedding(cfg.time_buckets, d)
        self.attend_slot = nn.Linear(d, d, bias=False)
        self.attend_user = nn.Linear(d, d)
        self.attend_score = nn.Linear(d, 1, bias=False)
        self.generator = nn.Linear(2 * d, d)
        self.category_bias = nn.Parameter(torch.zeros(cfg.num_categories))
        self.copy_switch = nn.Linear(3 * d, 1)
        self.apply(self._init_weights)
        # W_u, from 0: training starts at the reading's u^c
        self.user_to_interest = nn.Linear(d, d, bias=False) if cfg.user_term else None
        if self.user_to_interest is not None:
            nn.init.zeros_(self.user_to_interest.weight)
        # W_q, W_kv and W_x, the last from 0 likewise
        self.cross_query = self.cross_key_value = self.cross_to_interest = None
        if cfg.cross_interest:
            self.cross_query = nn.Linear(d, d)
            self.cross_key_value = nn.Linear(d, 2 * d)
            self.cross_to_interest = nn.Linear(d, d, bias=False)
            for module in (self.cross_query, self.cross_key_value):
                self._init_weights(module)
            nn.init.zeros_(self.cross_to_interest.weight)
        # after `apply`: the head initialises its own priors (`repeat.py`)
        self.repeat_head = RepeatHead(cfg.repeat_head, d) if cfg.repeat_head else None

    # ------------------------------------------------------------------ shared pieces

    def embed(self, item, behavior, bucket) -> torch.Tensor:
        return self.item_emb(item) + self.behavior_emb(behavior) + self.gap_emb(bucket)

    def interest(
        self,
        category: torch.Tensor,
        key_value: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, l, s) [N, d] of categories [N] over their slots' events (oldest first, newest
        at L - 1): key_value [N, L, 2d] their `long_key_value`, recent [N, m, d] the newest
        m events' embeddings (m = short_len), valid [N, L]; None: empty slots (l = the
        sink's value, s = 0). The serving form; training forms l over every event at once
        (`forward_all`) from the same pieces."""
        query, sink_logit, sink_value = self._category_query(category)
        if key_value is None:
            long, short = sink_value, torch.zeros_like(sink_value)
        else:
            key, value = key_value.chunk(2, dim=-1)  # [N, L, d]
            logits = torch.einsum("nld,nd->nl", key, query) / math.sqrt(query.shape[-1])
            logits = torch.cat([sink_logit, logits.masked_fill(~valid, float("-inf"))], 1)
            weights = logits.softmax(-1)  # [N, 1 + L]
            long = weights[:, :1] * sink_value + torch.einsum("nl,nld->nd", weights[:, 1:], value)
            short = self.short(recent, valid[:, -recent.shape[1] :])
        return self._fuse(long, short)

    def _category_query(
        self, category: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The long-term attention's query [N, d] of categories [N], and its sink's logit
        [N, 1] and value [N, d] (what an empty slot reads)."""
        c = self.category_emb(category)
        query = self.long_query(c)
        sink_key, sink_value = self.long_key_value(c).chunk(2, dim=-1)
        sink_logit = (sink_key * query).sum(-1, keepdim=True) / math.sqrt(c.shape[-1])
        return query, sink_logit, sink_value

    def _fuse(
        self, long: torch.Tensor, short: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, l, s): the learned gate between the long- and short-term parts."""
        g = torch.sigmoid(self.gate(torch.cat([long, short], -1)))
        return self.interest_norm(g * long + (1 - g) * short), long, short

    def user_term(self, user: torch.Tensor) -> torch.Tensor:
        """W_u s [..., d] from the user's read-outs s [..., d]; 0 with `user_term` off."""
        if self.user_to_interest is None:
            return torch.zeros_like(user)
        return self.user_to_interest(user)

    def _cross_weights(
        self, category: torch.Tensor, key: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """The cross interest's attention weights [N, Q, J] of queries of categories [N, Q]
        over keys [N, J, d] (`cross_key_value`'s first half), keep [N, Q or 1, J] the events
        each query sees; a query that sees none weighs 0."""
        query = self.cross_query(self.category_emb(category))  # [N, Q, d]
        return _masked_softmax(query @ key.transpose(1, 2) / math.sqrt(key.shape[-1]), keep)

    def cross_every(self, x: torch.Tensor, real: torch.Tensor, category: torch.Tensor):
        """W_x a^c [B, T, d] after every position t of rows x [B, T, d] (real [B, T]): a^c
        over t's last K events with the query of category [B, T] (t's own entry); 0 with
        `cross_interest` off. The training form of `cross_term`."""
        if self.cross_to_interest is None:
            return torch.zeros_like(x)
        band = _band(x.shape[1], self.cfg.window, x.device)[1]  # [T(t), T(j)]
        keep = band & real[:, None, :] & real[:, :, None]  # [B, T, T]
        key, value = self.cross_key_value(x).chunk(2, dim=-1)  # [B, T, d] each
        return self.cross_to_interest(self._cross_weights(category, key, keep) @ value)

    def interest_terms(
        self, batch: EventBatch, out: dict[str, torch.Tensor], category: torch.Tensor
    ) -> torch.Tensor:
        """What every interest adds after each position t of `forward_all`'s output:
        W_u s_t + W_x a^c_t [B, T, d], c = category [B, T] (t's own entry)."""
        return self.user_term(out["user"]) + self.cross_every(out["events"], batch.mask, category)

    def empty_interest(self, category: torch.Tensor) -> torch.Tensor:
        """u^c [N, d] of categories the user never touched."""
        return self.interest(category)[0]

    def _slot_part(self, category, interest, count, behavior) -> torch.Tensor:
        """The time-free part of h_c: W_1 [C[c] ; u^c ; log(1 + n_c) ; B[stage_c]]."""
        features = [
            self.category_emb(category),
            interest,
            torch.log1p(count.float())[..., None],
            self.behavior_emb(behavior),
        ]
        return self.slot_features(torch.cat(features, -1))

    def _slot_logit(self, slot_term: torch.Tensor, user_term: torch.Tensor) -> torch.Tensor:
        """The pointer's logit of a slot from attend_slot(h) and attend_user(s), each [P, d]
        (training maps slots, ages and users once and gathers the terms per pair)."""
        return self.attend_score(torch.tanh(slot_term + user_term))[..., 0]

    def _log_p(
        self, user: torch.Tensor, context: torch.Tensor, current: torch.Tensor, copy: torch.Tensor
    ) -> torch.Tensor:
        """log P(c) [N, C] from s [N, d], h* [N, d], the current category [N] and the copy
        distribution a [N, C] (zero off the user's slots)."""
        hidden = self.generator(torch.cat([user, context], -1))  # [N, d]
        logits = hidden @ self.category_emb.weight.T + self.category_bias  # [N, C]
        logits[:, 0] = float("-inf")  # the unknown category is never generated
        if not self.cfg.pointer:
            return logits.log_softmax(-1)
        p_gen_prob = logits.softmax(-1)
        switch = self.copy_switch(torch.cat([context, user, self.category_emb(current)], -1))
        p_gen = torch.sigmoid(switch)  # [N, 1]
        # clamped: the log's gradient at a zero-probability category would be inf * 0 = nan
        return (p_gen * p_gen_prob + (1 - p_gen) * copy).clamp(min=1e-30).log()

    # ------------------------------------------------------------------ training form

    def forward_all(self, batch: EventBatch) -> dict[str, torch.Tensor]:
        """Every event's slot interest and, after every event, log P(c).

        Returns "interest", "long", "short" [B, T, d] (of the event's own category, after
        it, without the user term), "user" [B, T, d] (s after every event), "log_p"
        [B, T, C], "is_last" [B, T, T] (is_last[b, t, j]: event j is its category's
        newest at time t, i.e. a slot of the user after event t) and "events" [B, T, d]
        (the embedded events, after dropout)."""
        cfg = self.cfg
        B, T = batch.item.shape
        device = batch.item.device
        real = batch.mask  # [B, T]
        gap, has_prev = sequence_gaps(batch.ts)
        bucket = gap_bucket(gap, has_prev, cfg.time_buckets)
        x = self.dropout(self.embed(batch.item, batch.behavior, bucket))  # [B, T, d]
        cat = batch.category
        pos = torch.arange(T, device=device)
        d, L, m = cfg.d_model, cfg.slot_len, cfg.short_len
        same = (cat[:, :, None] == cat[:, None, :]) & real[:, :, None] & real[:, None, :]
        earlier = pos[None, :] < pos[:, None]  # [T(t), T(j)]: j < t
        later = pos[None, :] > pos[:, None]  # [T(t), T(j)]: j > t
        count = (same & ~later).sum(-1)  # [B, T]: events of t's category up to t

        # long-term: t's slot holds the last L events j <= t of its category, and all of them
        # share t's query, so each event's logit is formed once and the windows are a mask
        query, sink_logit, sink_value = self._category_query(cat)  # [B, T, d], [B, T, 1]
        key, value = self.long_key_value(x).chunk(2, dim=-1)  # [B, T, d] each
        own_logit = (key * query).sum(-1) / math.sqrt(d)  # [B, T(j)]
        in_slot = same & ~later & (count[:, :, None] - count[:, None, :] < L)  # [B, T, T]
        logits = own_logit[:, None, :].masked_fill(~in_slot, float("-inf"))
        weights = torch.cat([sink_logit, logits], -1).softmax(-1)  # [B, T, 1 + T]
        long = weights[..., :1] * sink_value + weights[..., 1:] @ value  # [B, T, d]
        # short-term: the slot's newest m events (t and its m - 1 previous of the category)
        prev = torch.where(same & earlier, pos, -1).amax(-1)  # [B, T], -1: none
        newest = [pos.expand(B, T)]
        for _ in range(m - 1):
            newest.append(prev.gather(1, newest[-1].clamp(min=0)).masked_fill(newest[-1] < 0, -1))
        newest = torch.stack(newest[::-1], -1)  # [B, T, m] event indices, newest last
        rows = torch.arange(B, device=device)[:, None, None]
        recent = x[rows, newest.clamp(min=0)] * (newest >= 0)[..., None]  # [B, T, m, d]
        short = self.short(recent.view(B * T, m, d), (newest >= 0).view(B * T, m)).view(B, T, d)
        u, long, short = self._fuse(long, short)

        # the user's short-term read-out after every event
        user = self.user_short.forward_every(x, real).view(B * T, d)  # [B*T, d]

        # slots after event t: events j <= t with no later event of their category up to t
        next_same = torch.where(same & later, pos, T).amin(-1)  # [B, T]
        is_last = (
            (pos[None, :, None] >= pos[None, None, :])
            & (next_same[:, None, :] > pos[None, :, None])
            & real[:, None, :]
            & real[:, :, None]
        )  # [B, T(t), T(j)]
        b, t, j = is_last.nonzero(as_tuple=True)  # P (t, slot j) pairs
        part = self._slot_part(cat, u, count, batch.behavior)  # [B, T, d]
        age = gap_bucket(
            batch.ts[b, t] - batch.ts[b, j], torch.ones_like(b, dtype=torch.bool), cfg.time_buckets
        )
        group = b * T + t
        # h = part[b, j] + slot_age(age) per pair; attend_slot is linear (no bias), so parts,
        # ages and users are mapped once and only their [P, d] terms gathered per pair
        slot_term = self.attend_slot(part).view(B * T, d).index_select(0, b * T + j)
        slot_term = slot_term + self.attend_slot(self.slot_age.weight).index_select(0, age)
        user_term = self.attend_user(user).index_select(0, group)
        a = _segment_softmax(self._slot_logit(slot_term, user_term), group, B * T)  # [P]
        # context = sum of a h over t's slots: a dense [B, T, T] weight on the parts and a
        # [B * T, buckets] one on the age embeddings
        on_part = a.new_zeros(B, T, T).index_put((b, t, j), a)
        on_age = a.new_zeros(B * T, cfg.time_buckets).index_put((group, age), a, accumulate=True)
        context = (on_part @ part).view(B * T, d) + on_age @ self.slot_age.weight
        C = cfg.num_categories
        copy = a.new_zeros(B * T * C).index_add(0, group * C + cat[b, j], a).view(B * T, C)
        log_p = self._log_p(user, context, cat.reshape(-1), copy).view(B, T, C)
        return {
            "interest": u,
            "long": long,
            "short": short,
            "user": user.view(B, T, d),
            "log_p": log_p,
            "is_last": is_last,
            "events": x,
        }

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """u^{c_t} after every event: the interest of the category just touched [B, T, d]."""
        return self.forward_all(batch)["interest"]

    def _category_items(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items sorted by category, each category's start and count) from item_category."""
        order = torch.argsort(self.item_category[1:], stable=True) + 1
        counts = torch.bincount(self.item_category[1:], minlength=self.cfg.num_categories)
        return order, counts.cumsum(0) - counts, counts

    def _category_dots(self, interests: torch.Tensor, categories: torch.Tensor):
        """u . e_x of each query's category's items: interests [S, d] with categories [S].
        Yields (lo, hi, slot [Q], items [Q], dots [Q]) for the queries lo..hi - 1, in chunks
        of about CASCADE_CHUNK (query, item) pairs; slot indexes the chunk's queries, each
        query's items a run in the order of `_category_items`."""
        order, start, count = self._category_items()
        table = self.item_table()
        sizes = count[categories]
        ends = sizes.cumsum(0)
        lo = 0
        while lo < len(categories):
            hi = int(torch.searchsorted(ends, ends[lo] - sizes[lo] + CASCADE_CHUNK, right=True))
            hi = max(hi, lo + 1)
            n = sizes[lo:hi]
            slot = torch.repeat_interleave(torch.arange(hi - lo, device=n.device), n)  # [Q]
            within = torch.arange(len(slot), device=n.device) - (n.cumsum(0) - n)[slot]
            items = order[start[categories[lo:hi]][slot] + within]  # [Q]
            u = interests[lo:hi].index_select(0, slot)  # [Q, d]
            dots = torch.bmm(u[:, None], table.index_select(0, items)[:, :, None]).view(-1)
            yield lo, hi, slot, items, dots
            lo = hi

    def training_loss(
        self, batch: EventBatch, negatives: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """(mean joint loss, positions): every position t predicts event t + 1's item inside
        its category and its category (module docstring)."""
        cfg = self.cfg
        T, device = batch.item.shape[1], batch.item.device
        out = self.forward_all(batch)
        pos = torch.arange(T - 1, device=device)
        real = pos[None] < (batch.lengths - 1)[:, None]  # [B, T-1]: t with a next event
        vectors = self._target_interests(batch, out, real)
        tgt, tcat = batch.item[:, 1:][real], batch.category[:, 1:][real]
        table = self.item_table()
        if negatives:
            order, start, count = self._category_items()
            uniform = torch.randint(1, table.shape[0], (negatives,), generator=generator).to(device)
            draw = torch.rand(len(tgt), cfg.category_negatives, generator=generator).to(device)
            at = start[tcat, None] + (draw * count[tcat, None]).long()
            inside = order[at.clamp(max=len(order) - 1)]  # [P, S_c] items of c*
            # a negative equal to the target is masked out, and so are draws from an empty c*
            masked = torch.cat([uniform.expand(len(tgt), -1), inside], 1) == tgt[:, None]
            masked[:, negatives:] |= (count[tcat] == 0)[:, None]
        item_loss, weights = 0.0, (1.0, cfg.aux_weight, cfg.aux_weight)
        if self.repeat_head is not None:
            # the head's mixture takes the interest's own term: -log P(target), P_explore the
            # cascade's distribution (module docstring)
            draws = (inside, masked[:, negatives:], count[tcat]) if negatives else None
            log_mix = self._mixture_log_prob(batch, out, real, vectors[0], draws)
            item_loss, vectors, weights = -log_mix.mean(), vectors[1:], weights[1:]
        for weight, u in zip(weights, vectors, strict=True):
            if negatives:
                logits = torch.cat(
                    [
                        (u * table[tgt]).sum(-1, keepdim=True),  # [P, 1]
                        u @ table[uniform].T,  # [P, S] shared uniform negatives
                        torch.einsum("pd,pnd->pn", u, table[inside]),  # [P, S_c]
                    ],
                    1,
                )
                logits[:, 1:] = logits[:, 1:].masked_fill(masked, float("-inf"))
                log_prob = logits.log_softmax(-1)[:, 0]
            else:
                log_prob = full_softmax_log_prob(u, table, tgt)
            item_loss = item_loss - weight * log_prob.mean()
        log_p = out["log_p"][:, :-1][real]  # [P, C]
        known = tcat > 0  # the unknown category is never predicted
        cat_loss = -log_p[known].gather(1, tcat[known, None]).mean() if known.any() else 0.0
        return item_loss + cfg.category_weight * cat_loss, int(real.sum())

    def _target_interests(
        self, batch: EventBatch, out: dict[str, torch.Tensor], real: torch.Tensor
    ) -> list[torch.Tensor]:
        """u^{c*} + W_u s + W_x a^{c*}, l^{c*}, s^{c*} [P, d] at the positions `real`
        [B, T-1] (row-major) of `forward_all`'s output: the slot of the next event's category
        c* if the user has one, else the empty interest; s and a^{c*} the user's read-outs
        at the position."""
        target_cat = batch.category[:, 1:]
        match = out["is_last"][:, :-1] & (batch.category[:, None, :] == target_cat[..., None])
        has = match.any(-1)  # [B, T-1]
        j = match.int().argmax(-1)
        rows = torch.arange(len(batch.lengths), device=real.device)[:, None]
        empty_u, empty_l, empty_s = self.interest(target_cat[real])
        vectors = []
        for name, empty in (("interest", empty_u), ("long", empty_l), ("short", empty_s)):
            seen = out[name][rows, j][real]  # [P, d]
            vectors.append(torch.where(has[real][:, None], seen, empty))
        # t's terms with c*'s query (the last position's query is never read)
        terms = self.interest_terms(batch, out, F.pad(target_cat, (0, 1)))
        vectors[0] = vectors[0] + terms[:, :-1][real]
        return vectors

    def _mixture_log_prob(
        self,
        batch: EventBatch,
        out: dict[str, torch.Tensor],
        real: torch.Tensor,
        target_interest: torch.Tensor,
        draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """log P(target) [P] of the head's mixture at the positions `real`, P_explore(x) =
        P(c*) P(x | c*) from `forward_all`'s output and u^{c*} [P, d]; draws: the
        in-category negatives, their mask and c*'s item count (`_within_category_log_prob`),
        None: exact."""
        target, category = batch.item[:, 1:][real], batch.category[:, 1:][real]
        within = self._within_category_log_prob(target_interest, target, category, draws)
        log_c = out["log_p"][:, :-1][real].gather(1, category[:, None])[:, 0]
        log_explore = (log_c + within).clamp(min=LOG_FLOOR)
        # the head's user vector: the interest of the category just touched, as in ranking
        touched = (out["interest"] + self.interest_terms(batch, out, batch.category))[:, :-1]
        return self.repeat_head.training_log_prob(
            batch, touched, real, log_explore, self.item_table()
        )

    def _within_category_log_prob(
        self,
        u: torch.Tensor,
        target: torch.Tensor,
        category: torch.Tensor,
        draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """log P(target | c*) [P]: the softmax of u^{c*} . e [P, d] over the items of c*
        [P] (and the target). Exact over the table (draws None), else estimated from the
        target and draws = (inside, masked, n_c): S_c draws `inside` [P, S_c] from c*'s n_c
        [P] items (`masked`: draws that are the target or from an empty category), their
        logits shifted by log(n_c / S_c), the log-Q correction of a uniform draw: the
        estimate is then on the scale ranking uses (`repeat.py` says why the head needs it)."""
        table = self.item_table()
        if draws is None:
            logits = u @ table.T  # [P, N]
            outside = self.item_category[None] != category[:, None]
            outside[:, 0] = True
            outside[torch.arange(len(target), device=target.device), target] = False
            return (
                logits.masked_fill(outside, float("-inf"))
                .log_softmax(-1)
                .gather(1, target[:, None])[:, 0]
            )
        inside, masked, n_c = draws
        shift = torch.log(n_c.float() / inside.shape[1])  # -inf for an empty c*: no negatives
        negative = torch.einsum("pd,pnd->pn", u, table[inside]) + shift[:, None]
        positive = (u * table[target]).sum(-1, keepdim=True)  # [P, 1]
        logits = torch.cat([positive, negative.masked_fill(masked, float("-inf"))], 1)
        return logits.log_softmax(-1)[:, 0]

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> ULIMState:
        cfg = self.cfg

        def zeros(*shape):
            return torch.zeros(num_slots, *shape, dtype=torch.long, device=device)

        M, L, K = cfg.slots, cfg.slot_len, cfg.window
        head = cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return ULIMState(
            slot_key=zeros(M),
            slot_item=zeros(M, L),
            slot_behavior=zeros(M, L),
            slot_bucket=zeros(M, L),
            slot_count=zeros(M),
            slot_last_ts=zeros(M),
            slot_interest=torch.zeros(num_slots, M, cfg.d_model, device=device),
            slot_stale=torch.zeros(num_slots, M, dtype=torch.bool, device=device),
            window_item=zeros(K),
            window_behavior=zeros(K),
            window_bucket=zeros(K),
            last_category=zeros(),
            evictions=zeros(),
            count=zeros(),
            last_ts=zeros(),
            recent=recent[0],
            recent_counts=recent[1],
        )

    @torch.no_grad()
    def apply_events(self, state: ULIMState, slots: torch.Tensor, batch: EventBatch) -> None:
        """Apply each user's run of new events to its slot in place, one event at a time:
        the category's slot (found, or an empty one, or the least frequent evicted) takes
        the event into its ring, count and time; the user's window and clock move."""
        cfg = self.cfg
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)
        one = torch.ones(1, dtype=torch.long, device=slots.device)
        for m in range(int(batch.lengths.max())):
            active = batch.lengths > m
            users = slots[active]
            item, cat = batch.item[active, m], batch.category[active, m]
            behavior, ts = batch.behavior[active, m], batch.ts[active, m]
            n = len(users)
            rows = torch.arange(n, device=slots.device)
            bucket = gap_bucket(ts - state.last_ts[users], state.count[users] > 0, cfg.time_buckets)
            keys = state.slot_key[users]  # [n, M]
            found = keys == (cat + 1)[:, None]
            has = found.any(1)
            # a new category takes an empty slot, else evicts the least frequent (then oldest)
            counts = state.slot_count[users]
            fewest = torch.where(keys == 0, -1, counts)  # an empty slot first
            least = fewest == fewest.amin(1, keepdim=True)
            oldest = torch.where(least, state.slot_last_ts[users], torch.iinfo(torch.long).max)
            slot = torch.where(has, found.int().argmax(1), oldest.argmin(1))
            evicted = ~has & (keys[rows, slot] != 0)
            state.evictions[users] += evicted.long()
            fresh = ~has  # the slot starts over
            for ring, value in (
                (state.slot_item, item),
                (state.slot_behavior, behavior),
                (state.slot_bucket, bucket),
            ):
                old = ring[users, slot]  # [n, L]
                old = torch.where(fresh[:, None], torch.zeros_like(old), old)
                ring[users, slot] = shift_window(old, value[:, None], one.expand(n))
            state.slot_count[users, slot] = torch.where(fresh, 0, counts[rows, slot]) + 1
            state.slot_key[users, slot] = cat + 1
            state.slot_last_ts[users, slot] = ts
            state.slot_stale[users, slot] = True
            for ring, value in (
                (state.window_item, item),
                (state.window_behavior, behavior),
                (state.window_bucket, bucket),
            ):
                ring[users] = shift_window(ring[users], value[:, None], one.expand(n))
            state.last_category[users] = cat
            state.count[users] += 1
            state.last_ts[users] = ts

    @torch.no_grad()
    def refresh_state(self, state: ULIMState, slots: torch.Tensor) -> None:
        """Compute u^c again for these users' slots that took events since it was last
        computed (`slot_stale`): each read touches one slot per new event, not all M. The
        engine also calls it on states built without reads (`RecommendationEngine.settle`)."""
        L = self.cfg.slot_len
        stale = state.slot_stale[slots] & (state.slot_key[slots] > 0)  # [U, M]
        if not stale.any():
            return
        u_idx, m_idx = stale.nonzero(as_tuple=True)
        user_slot = slots[u_idx]
        held = state.slot_count[user_slot, m_idx].clamp(max=L)  # [S]
        valid = torch.arange(L, device=slots.device)[None] >= (L - held)[:, None]  # [S, L]
        x = (
            self.embed(
                state.slot_item[user_slot, m_idx],
                state.slot_behavior[user_slot, m_idx],
                state.slot_bucket[user_slot, m_idx],
            )
            * valid[..., None]
        )
        category = state.slot_key[user_slot, m_idx] - 1
        recent = x[:, -self.cfg.short_len :]
        interest = self.interest(category, self.long_key_value(x), recent, valid)[0]  # [S, d]
        state.slot_interest[user_slot, m_idx] = interest
        state.slot_stale[user_slot, m_idx] = False

    @torch.no_grad()
    def read_state(self, state: ULIMState, slots: torch.Tensor) -> Readout:
        """log P(c) and every slot's interest of these users (each with an event); brings
        the state's cached interests up to date first."""
        cfg = self.cfg
        M, K = cfg.slots, cfg.window
        self.refresh_state(state, slots)
        keys = state.slot_key[slots]  # [U, M]
        U = len(slots)
        occupied = keys > 0
        u_idx, m_idx = occupied.nonzero(as_tuple=True)
        user_slot = slots[u_idx]
        category = keys[u_idx, m_idx] - 1
        interest = state.slot_interest[user_slot, m_idx]  # [S, d]
        newest_behavior = state.slot_behavior[user_slot, m_idx, -1]
        part = self._slot_part(
            category, interest, state.slot_count[user_slot, m_idx], newest_behavior
        )
        age = gap_bucket(
            state.last_ts[user_slot] - state.slot_last_ts[user_slot, m_idx],
            torch.ones_like(u_idx, dtype=torch.bool),
            cfg.time_buckets,
        )
        h = part + self.slot_age(age)  # [S, d]
        held_w = state.count[slots].clamp(max=K)
        user_valid = torch.arange(K, device=slots.device)[None] >= (K - held_w)[:, None]
        x_user = (
            self.embed(
                state.window_item[slots], state.window_behavior[slots], state.window_bucket[slots]
            )
            * user_valid[..., None]
        )
        user = self.user_short(x_user, user_valid)  # [U, d]
        a = _segment_softmax(
            self._slot_logit(self.attend_slot(h), self.attend_user(user)[u_idx]), u_idx, U
        )
        context = h.new_zeros(U, h.shape[-1]).index_add(0, u_idx, a[:, None] * h)
        C = cfg.num_categories
        copy = a.new_zeros(U * C).index_add(0, u_idx * C + category, a).view(U, C)
        log_p = self._log_p(user, context, state.last_category[slots], copy)
        slot_interest = h.new_zeros(U, M, h.shape[-1])
        slot_interest[u_idx, m_idx] = interest
        slot_category = torch.where(occupied, keys - 1, -1)
        read = Readout(log_p, slot_category, slot_interest, self.user_term(user))
        if self.cross_key_value is not None:
            read.window_key_value, read.window_valid = self.cross_key_value(x_user), user_valid
        return read

    @torch.no_grad()
    def step(self, state: ULIMState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply the runs, then each user's top category's interest [U, d] (the engine's
        single query; the cascade's per-category queries come from `read_state`)."""
        if self.training:
            raise RuntimeError("ULIM.step serves a trained model: call model.eval() first")
        self.apply_events(state, slots, batch)
        read = self.read_state(state, slots)
        top = read.log_p.argmax(-1)  # [U]
        return self.category_interests(read, top[:, None])[:, 0]

    @torch.no_grad()
    def cascade_plan(self, state: ULIMState, slots: torch.Tensor, top_k: int) -> CascadePlan:
        """What the engine serves these users from (after `step`), from one read of their
        slots. Searching each u^c among its category's items and ranking by u^c . e_x +
        `merge_offset` is `cascade_scores` over the top K, one filtered search per category
        (within a category both orders are u^c . e_x's)."""
        read = self.read_state(state, slots)
        log_p, categories = read.log_p.topk(min(top_k, read.log_p.shape[-1]), -1)
        plan = CascadePlan(categories, log_p, self.category_interests(read, categories))
        if self.repeat_head is not None:
            plan.head_user, plan.explore = self._head_inputs(read, state.last_category[slots])
        return plan

    @torch.no_grad()
    def merge_offset(self, plan: CascadePlan) -> torch.Tensor:
        """What a search score u^c . e_x adds [U, K] to rank as `cascade_scores` does: log P(c)
        - log Z_c for the joint merge (Z_c the sum of exp(u^c . e) over c's items: one pass
        over the plan's categories' items), log P(c) for the dot merge."""
        if self.cfg.merge == "dot":
            return plan.log_p
        flat = plan.categories.reshape(-1)
        log_z = plan.interests.new_full((len(flat),), float("-inf"))
        for lo, hi, slot, _, dots in self._category_dots(plan.interests.flatten(0, 1), flat):
            log_z[lo:hi] = _segment_logsumexp(dots, slot, hi - lo)
        # a category without items is searched to nothing: no offset needed
        return plan.log_p - torch.where(log_z > float("-inf"), log_z, 0.0).view_as(plan.log_p)

    def _cross_weights_of(self, read: Readout, categories: torch.Tensor) -> torch.Tensor:
        """a^c's weights [U, Q, K] on the user's window for categories [U, Q]."""
        key = read.window_key_value.chunk(2, dim=-1)[0]
        return self._cross_weights(categories, key, read.window_valid[:, None, :])

    @torch.no_grad()
    def cross_term(self, read: Readout, categories: torch.Tensor) -> torch.Tensor:
        """W_x a^c [U, Q, d] of categories [U, Q] from the user's window; 0 with
        `cross_interest` off. The serving form of `cross_every`."""
        if self.cross_to_interest is None:
            return read.user_term.new_zeros(*categories.shape, read.user_term.shape[-1])
        value = read.window_key_value.chunk(2, dim=-1)[1]  # [U, K, d]
        return self.cross_to_interest(self._cross_weights_of(read, categories) @ value)

    @torch.no_grad()
    def category_interests(self, read: Readout, categories: torch.Tensor) -> torch.Tensor:
        """u^c + W_u s + W_x a^c [U, K, d] of categories [U, K]: the user's slot, else the
        empty interest."""
        match = read.slot_category[:, None, :] == categories[..., None]  # [U, K, M]
        has = match.any(-1)
        seen = read.slot_interest.gather(
            1, match.int().argmax(-1)[..., None].expand(-1, -1, read.slot_interest.shape[-1])
        )
        empty = self.empty_interest(categories.reshape(-1)).view(*categories.shape, -1)
        interest = torch.where(has[..., None], seen, empty) + read.user_term[:, None]
        return interest + self.cross_term(read, categories)

    # ------------------------------------------------------------------ ranking

    @torch.no_grad()
    def readout(self, batch: EventBatch) -> Readout:
        """The serving read-out after each row's last event (slots built by streaming)."""
        state = self.new_state(len(batch.lengths), batch.item.device)
        slots = torch.arange(len(batch.lengths), device=batch.item.device)
        self.apply_events(state, slots, batch)
        return self.read_state(state, slots)

    @torch.no_grad()
    def user_vector(self, batch: EventBatch) -> torch.Tensor:
        """What `step` serves after each row's last event: the top category's u^c [B, d]."""
        read = self.readout(batch)
        return self.category_interests(read, read.log_p.argmax(-1)[:, None])[:, 0]

    @torch.no_grad()
    def category_scores(self, batch: EventBatch) -> torch.Tensor:
        """log P(c) [B, C] after each row's last event."""
        return self.readout(batch).log_p

    @torch.no_grad()
    def cascade_scores(
        self,
        read: Readout,
        top_k: int | None,
        oracle: torch.Tensor | None = None,
        use_log_p: bool = True,
        within_category: bool | None = None,
    ) -> torch.Tensor:
        """score(x) = log P(cat(x)) + log P(x | cat(x)) [U, num_items], -inf outside the top K
        categories (top_k None: none gated; oracle [U]: only that category): P(x | c) the
        softmax of v^c . e over c's items (v^c = u^c + W_u s + W_x a^c: `category_interests`),
        so the scores are a distribution over the items (also the repeat head's explore
        side). within_category False: the raw v^c . e_x in place of log P(x | c) (the "dot"
        merge); None: the config's merge."""
        if within_category is None:
            within_category = self.cfg.merge == "joint"
        table = self.item_table()
        item_cat = self.item_category  # [N]
        U, N = read.log_p.shape[0], table.shape[0]
        C = self.cfg.num_categories
        device = table.device
        # the categories ranked [U, C] (None: all): the oracle's, else the top K by P(c)
        ranked = None  # [U, 1 or K]
        if oracle is not None:
            ranked = oracle[:, None]
        elif top_k is not None and top_k < C:
            ranked = read.log_p.topk(top_k, -1).indices
        chosen = None
        if ranked is not None:
            chosen = torch.zeros_like(read.log_p, dtype=torch.bool).scatter_(1, ranked, True)
        # a category without a slot is read by its empty interest (plus the user's terms)
        empty = self.empty_interest(torch.arange(C, device=device))  # [C, d]
        base = (table * empty[item_cat]).sum(-1)  # [N]
        base[0] = float("-inf")  # padding
        # the user's slots of ranked categories (the others' items are -inf in the end)
        live = read.slot_category >= 0
        if chosen is not None:
            live &= chosen.gather(1, read.slot_category.clamp(min=0))
        u_idx, m_idx = live.nonzero(as_tuple=True)
        cats = read.slot_category[u_idx, m_idx]
        if self.user_to_interest is None and self.cross_to_interest is None:
            # the same for every user off the slots: normalised once
            if within_category:
                base = base - _segment_logsumexp(base, item_cat, C)[item_cat]
            scores = base.expand(U, N).clone()
            interests = read.slot_interest[u_idx, m_idx]  # [S, d]
            for lo, hi, slot, items, dots in self._category_dots(interests, cats):
                if within_category:  # log-softmax over each slot's run of items
                    dots = dots - _segment_logsumexp(dots, slot, hi - lo)[slot]
                scores.view(-1).index_copy_(0, u_idx[lo:hi][slot] * N + items, dots)
        else:  # each user's own: [U, N] (with the head 3x the cost of the above, measured)
            scores = base + read.user_term @ table.T
            if self.cross_to_interest is not None:
                scores += self._cross_dots(read)
            # a slot's items: its interest in place of the empty one
            for lo, hi, slot, items, dots in self._category_dots(
                read.slot_interest[u_idx, m_idx] - empty[cats], cats
            ):
                scores.view(-1).index_add_(0, u_idx[lo:hi][slot] * N + items, dots)
            if within_category:  # log-softmax over each (user, category)'s items
                lse = category_logsumexp(scores, item_cat, C)
                scores -= lse.gather(1, item_cat.expand(U, N))
        each_item = item_cat.expand(U, N)  # gathered per row: cheaper than indexing columns
        if use_log_p:
            scores += read.log_p.gather(1, each_item)
        if chosen is not None:
            scores.masked_fill_(~chosen.gather(1, each_item), float("-inf"))
        scores[:, 0] = float("-inf")
        return scores

    def _cross_dots(self, read: Readout) -> torch.Tensor:
        """W_x a^{cat(x)} . e_x [U, N] for every item x. a^c = sum_k w_ck v_k over the
        user's K window events, so the dots are sum_k w_{cat(x) k} (W_x v_k . e_x): [K, N]
        per user, never an [N, d] interest per item; users in chunks of CROSS_CHUNK."""
        table, C = self.item_table(), self.cfg.num_categories
        U, N = len(read.log_p), table.shape[0]
        categories = torch.arange(C, device=table.device).expand(U, C)
        weights = self._cross_weights_of(read, categories).transpose(1, 2)  # [U, K, C]
        value = self.cross_to_interest(read.window_key_value.chunk(2, dim=-1)[1])  # [U, K, d]
        dots = table.new_empty(U, N)
        step = max(1, CROSS_CHUNK // (value.shape[1] * N))
        for lo in range(0, U, step):
            on_item = weights[lo : lo + step][:, :, self.item_category]  # [u, K, N]
            dots[lo : lo + step] = (on_item * (value[lo : lo + step] @ table.T)).sum(1)
        return dots

    @torch.no_grad()
    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        """The evaluation's scores: the cascade over the config's top K categories; with
        the head, log P(i) of its mixture with the cascade's distribution."""
        read = self.readout(batch)
        if self.repeat_head is None:
            return self.cascade_scores(read, self.cfg.top_categories)
        rows = torch.arange(len(batch.lengths), device=batch.item.device)
        current = batch.category[rows, batch.lengths - 1]
        u, explore = self._head_inputs(read, current)
        return self.repeat_head.rank_scores(
            batch, u, explore, self.item_table(), explore_is_normalised=True
        )

    def _head_inputs(
        self, read: Readout, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the head reads besides the buffer: the interest of the category just
        touched, current [U] (training's u at each position) [U, d], and the cascade's
        log P_explore [U, num_items] over the top K categories."""
        u = self.category_interests(read, current[:, None])[:, 0]
        explore = self.cascade_scores(read, self.cfg.top_categories, within_category=True)
        return u, explore

    def recent_items(self, state: ULIMState, slots: torch.Tensor, n: int) -> torch.Tensor:
        """[U, min(n, K)] the items of these users' last n events, oldest first (0: none)."""
        return state.window_item[slots, -n:]
