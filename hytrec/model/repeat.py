"""The repeat/explore head: a copy distribution over the user's recent distinct items, mixed
with the model's softmax over all items by a learned gate. Any model that gives a user
vector `u` and item scores `s_i = u . e_i` can carry it (`HyTRecConfig.repeat_head`,
`SASRecConfig.repeat_head`).

Follows RepeatNet (Ren et al., "RepeatNet: A Repeat Aware Neural Recommendation Machine for
Session-based Recommendation", AAAI 2019), whose repeat and explore modes are the two parts
of the mixture below; the pointer-generator (See et al., ACL 2017) is its general form.

The buffer. After each event a user keeps the last N distinct items it touched, newest first
(least recently used evicted). Slot k (0 = newest) holds

    item_k, count_k   events on the item since it last entered the buffer
            last_ts_k time of the item's newest event
            stage_k   funnel stage (`Behavior`) of the item's newest event
            cat_k     category of the item's newest event (0: unknown)

and the user keeps `repeats` (events whose item was in the buffer already) and `events`.
The newest event's item is always slot 0, so the query time is last_ts_0 and the newest
event was a repeat exactly when count_0 > 1.

The head, for a user after event t with user vector u and item scores s:

    h_k        = E_rank[k] + E_count[b(count_k - 1)] + E_age[b(last_ts_0 - last_ts_k)]
                 + E_stage[stage_k] + E_same[same_k] + s_{item_k} w_s + W_u u     [R]
    c_k        = v . GELU(h_k) + prior_k + w log(count_k) + a s_{item_k} + c same_k
                 prior_k = -log(1 + k), w = 1, a = 0, c = 0 at init
    same_k     = 1[cat_k = cat_0 > 0]: the item is of the category the user is on now
    P_copy(i)  = softmax_k(c)_k  if i = item_k,   0 for items outside the buffer
    p_repeat   = sigmoid(MLP([u ; repeats / events ; 1[count_0 > 1]]) + g)
    P(i)       = p_repeat P_copy(i) + (1 - p_repeat) P_explore(i),   P_explore = softmax_i(s)

with b(x) = floor(log2(1 + x)), capped (`log2_bucket`), and g the gate's bias (`gate_bias`): 0
in training, then fitted on events later than the training targets (`calibration.py`: a gate
learnt on the training days trusts the explore side more than the next days bear out).
Untrained, P_copy(item_k) is count_k / (1 + k) normalised: the recency-frequency heuristic
(`heuristics.py`, the best of them on Taobao and Foursquare) within the buffer, so training
starts from it, not from recent-items. Training maximises log P(i_{t+1}) at every position,
jointly with the model (the head's parameters at a higher learning rate,
`TrainConfig.head_lr_scale`: its scalars start at the heuristic and must move by O(1) in
the few hundred steps a small log gives). Full ranking scores every item by log P(i).
same_k is a signal the user heuristics leave out: a shopper who returns to an item often
returns to one of the category being browsed now. On files without categories every cat_k
is 0 and the feature is inert.

Normalisation of P_explore. With a full softmax it is exact in training and in ranking. With
a sampled softmax of S uniform negatives from the N_items - 1 real items, training uses

    P_explore(y) ~ exp(s_y) / (exp(s_y) + (N_items - 1) / S * sum_n exp(s_n))

(the negatives' logits shifted by log((N_items - 1) / S), the log-Q correction of a uniform
sample), whose denominator estimates the full normaliser that ranking uses. Without the
correction the explore part would look (N_items - 1) / S times likelier in training than in
ranking (55 times on Taobao), and the gate would learn a balance that ranking never sees.

Three forms of one computation. `RecentBuffer.from_events` builds the buffer after any
marked events of a batch, vectorised ([B, T, T] comparisons, no loop over events): training
marks every input position, ranking the last event of each row. `DistinctItemBuffer` is the
same buffer one event at a time, in plain Python: the oracle. `push_runs` is the serving form:
the buffers live in the users' stream state (`new_recent`, a `recent` [P, N, 6] and a
`recent_counts` [P, 2] part) and each micro-batch moves them one event position at a time,
vectorised over users. The tests check that all three agree at every position and that
P(i) from either is the same.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hytrec.model.events import NUM_BEHAVIORS, Behavior

# [rows, T, T] comparisons per chunk of rows in `RecentBuffer.from_events`: bounds memory
CHUNK_COMPARISONS = 1 << 22


@dataclass(frozen=True)
class RepeatConfig:
    """The head's sizes; saved inside the model's config."""

    buffer_size: int = 100  # N, the distinct items the buffer holds
    hidden: int = 16  # R, width of the copy and gate MLPs
    count_buckets: int = 12  # log2 buckets of count - 1
    age_buckets: int = 32  # log2 buckets of the seconds since the item's newest event

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.hidden < 1:
            raise ValueError(f"RepeatConfig: buffer_size and hidden must be >= 1, got {self}")
        if self.count_buckets < 1 or self.age_buckets < 1:
            raise ValueError(f"RepeatConfig: bucket counts must be >= 1, got {self}")


def as_repeat_config(value: RepeatConfig | dict | None) -> RepeatConfig | None:
    """A model config's `repeat_head` field as a `RepeatConfig` (checkpoints store a dict)."""
    return RepeatConfig(**value) if isinstance(value, dict) else value


def log2_bucket(x: torch.Tensor, buckets: int) -> torch.Tensor:
    """floor(log2(1 + x)) for x >= 0, capped at buckets - 1 (int64)."""
    x = x.clamp(min=0).to(torch.float64)
    return torch.floor(torch.log2(1.0 + x)).long().clamp(max=buckets - 1)


# ---------------------------------------------------------------------------- the buffer


class DistinctItemBuffer:
    """One user's buffer, one event at a time: the serving update rule, in plain Python, and
    the oracle the vectorised form is tested against."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[int, tuple[int, int, int, int]] = OrderedDict()  # newest last
        self.repeats = 0
        self.events = 0

    def push(self, item: int, ts: int, stage: int, category: int = 0) -> None:
        self.events += 1
        count = 1
        if item in self.entries:
            count += self.entries.pop(item)[0]
            self.repeats += 1
        self.entries[item] = (count, ts, stage, category)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)  # the least recently used

    def newest_first(self) -> list[tuple[int, int, int, int, int]]:
        """(item, count, last_ts, stage, category) per slot, slot 0 first."""
        return [(item, *entry) for item, entry in reversed(self.entries.items())]


@dataclass
class RecentBuffer:
    """Buffers of Q queries (users after some event), slot 0 = newest, as the stream keeps
    them. item/count/last_ts/stage/category: [Q, N] int64, item 0 (and zeros) in empty slots;
    repeats, events: [Q] int64. source [Q, N]: where offline buffers come from, the position
    of the slot's newest event in its batch row (-1 for empty slots, and for serving)."""

    item: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    stage: torch.Tensor
    category: torch.Tensor
    repeats: torch.Tensor
    events: torch.Tensor
    source: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.item > 0

    @classmethod
    def from_events(
        cls, batch, query: torch.Tensor, size: int
    ) -> tuple[RecentBuffer, torch.Tensor]:
        """The buffer after every marked event of a batch's right-padded rows [B, T] (query
        [B, T] bool, only real events), and the (row, position) [Q, 2] of each query, in
        `query.nonzero()` order. Costs [B, T, T] comparisons, taken a few rows at a time
        (`CHUNK_COMPARISONS`)."""
        B, T = batch.item.shape
        chunk = max(1, CHUNK_COMPARISONS // max(T * T, 1))
        columns = (batch.item, batch.ts, batch.behavior, batch.category, batch.lengths, query)
        buffers, wheres = [], []
        for r in range(0, B, chunk):
            rows = slice(r, r + chunk)
            buffer, where = _buffers_of_rows(*(c[rows] for c in columns), size)
            where[:, 0] += r
            buffers.append(buffer)
            wheres.append(where)
        fields = cls.__dataclass_fields__
        return cls(**{f: torch.cat([getattr(b, f) for b in buffers]) for f in fields}), torch.cat(
            wheres
        )


def _buffers_of_rows(item, ts, stage, category, lengths, query, size):
    """`RecentBuffer.from_events` for one chunk of rows."""
    B, T = item.shape
    device = item.device
    pos = torch.arange(T, device=device)
    real = pos[None] < lengths[:, None]  # [B, T]
    # each item's events, in time order, lie side by side once sorted by (item, position)
    order = (torch.where(real, item, -1) * T + pos).argsort(1)  # [B, T]; padding first
    chain = torch.where(real, item, -1).gather(1, order)
    with_previous = F.pad(chain[:, 1:] == chain[:, :-1], (1, 0))  # same item as the entry before
    with_next = F.pad(chain[:, :-1] == chain[:, 1:], (0, 1))
    # previous and next event on the same item, -1 and T where there is none
    prv = torch.empty_like(order).scatter_(
        1, order, torch.where(with_previous, F.pad(order[:, :-1], (1, 0)), -1)
    )
    nxt = torch.empty_like(order).scatter_(
        1, order, torch.where(with_next, F.pad(order[:, 1:], (0, 1)), T)
    )
    # newest[b, q, j]: event j is its item's newest as of event q (j <= q < next[j])
    newest = (pos[None, None, :] <= pos[None, :, None]) & (nxt[:, None, :] > pos[None, :, None])
    newest &= real[:, None, :]  # [B, T, T]
    # rank = distinct items touched after j, as of q: the slot, if below size
    seen = newest.cumsum(-1, dtype=torch.int32)
    rank = seen[..., -1:] - seen  # [B, T, T]
    member = newest & (rank < size)
    # event j repeats a buffer item when its previous event still had a slot at event j - 1
    at = (pos - 1).clamp(min=0) * T + prv.clamp(min=0)  # flat index of (j - 1, prev[j])
    repeat = (prv >= 0) & (rank.view(B, T * T).gather(1, at) < size) & real  # [B, T]
    # count: events on the item since it last entered the buffer (an event not a repeat),
    # counted along each item's chain in sorted order
    index = pos.expand(B, T)
    entered = (real & ~repeat).gather(1, order)
    latest_entry = torch.where(entered, index, -1).cummax(1).values
    count = torch.empty_like(order).scatter_(1, order, index - latest_entry + 1)

    where = query.nonzero()  # [Q, 2]
    b, q = where.unbind(1)
    Q = len(b)
    slots = member[b, q]  # [Q, T]
    qi, j = slots.nonzero(as_tuple=True)
    k = rank[b[qi], q[qi], j]
    out = {
        name: torch.zeros(Q, size, dtype=torch.long, device=device)
        for name in ("item", "count", "last_ts", "stage", "category")
    }
    source = torch.full((Q, size), -1, dtype=torch.long, device=device)
    out["item"][qi, k] = item[b[qi], j]
    out["count"][qi, k] = count[b[qi], j]
    out["last_ts"][qi, k] = ts[b[qi], j]
    out["stage"][qi, k] = stage[b[qi], j]
    out["category"][qi, k] = category[b[qi], j]
    source[qi, k] = j
    buffer = RecentBuffer(
        **out,
        repeats=repeat.long().cumsum(1)[b, q],
        events=q + 1,
        source=source,
    )
    return buffer, where


# ---------------------------------------------------------------------------- the head


class RepeatHead(nn.Module):
    # weights added after checkpoints existed: an older checkpoint loads with their default,
    # and the version hash leaves them out while at it (`SequentialModel.load`, `version`)
    OPTIONAL_BUFFERS = {"gate_bias": 0.0}

    def __init__(self, cfg: RepeatConfig, d_model: int):
        super().__init__()
        R, N = cfg.hidden, cfg.buffer_size
        self.cfg = cfg
        self.rank_emb = nn.Embedding(N, R)
        self.count_emb = nn.Embedding(cfg.count_buckets, R)
        self.age_emb = nn.Embedding(cfg.age_buckets, R)
        self.stage_emb = nn.Embedding(NUM_BEHAVIORS, R)
        self.same_category_emb = nn.Embedding(2, R)
        self.score_w = nn.Parameter(torch.zeros(R))
        self.user_proj = nn.Linear(d_model, R)
        self.copy_out = nn.Linear(R, 1, bias=False)
        nn.init.zeros_(self.copy_out.weight)  # untrained, the priors below alone rank the copies
        # newer slots likelier from the start: P_copy ~ 1 / (1 + k) before any training
        self.rank_prior = nn.Parameter(-torch.log1p(torch.arange(N, dtype=torch.float32)))
        # and likelier the more often touched: with the rank prior, count_k / (1 + k)
        self.count_weight = nn.Parameter(torch.ones(()))
        self.score_scale = nn.Parameter(torch.zeros(()))
        self.same_category_weight = nn.Parameter(torch.zeros(()))
        self.gate = nn.Sequential(nn.Linear(d_model + 2, R), nn.GELU(), nn.Linear(R, 1))
        # added to the gate's logit: 0 from training; `calibration.fit_gate_bias` fits it on
        # events later than the training targets, and it is saved with the weights
        self.register_buffer("gate_bias", torch.zeros(()))
        self._recorded: list[Mixture] | None = None  # `recording_mixtures`

    def log_probs(
        self, buffer: RecentBuffer, u: torch.Tensor, score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p_repeat [Q], log (1 - p_repeat) [Q], log P_copy per slot [Q, N], -inf in
        empty slots) from the buffers, the user vectors u [Q, d] and the model's scores of
        the slots' items [Q, N]. Every buffer must hold at least one item."""
        z, log_copy = self.gate_and_copy(buffer, u, score)
        return F.logsigmoid(z), F.logsigmoid(-z), log_copy

    def gate_and_copy(
        self, buffer: RecentBuffer, u: torch.Tensor, score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the gate's logit z [Q], gate_bias included: p_repeat = sigmoid(z); log P_copy
        per slot [Q, N]): `log_probs` before the sigmoids."""
        cfg = self.cfg
        # the filled slots only (a training window's early positions hold few items)
        qi, k = buffer.valid.nonzero(as_tuple=True)  # [M] each
        age = buffer.last_ts[qi, 0] - buffer.last_ts[qi, k]  # seconds before the newest event
        count = buffer.count[qi, k]
        s = score[qi, k]
        category = buffer.category[qi, k]
        same = ((category == buffer.category[qi, 0]) & (category > 0)).long()  # same_k
        h = (
            self.rank_emb(k)
            + self.count_emb(log2_bucket(count - 1, cfg.count_buckets))
            + self.age_emb(log2_bucket(age, cfg.age_buckets))
            + self.stage_emb(buffer.stage[qi, k])
            + self.same_category_emb(same)
            + s[:, None] * self.score_w
            + self.user_proj(u)[qi]
        )  # [M, R]
        filled = (
            self.copy_out(F.gelu(h))[:, 0]
            + self.rank_prior[k]
            + self.count_weight * count.float().log()
            + self.score_scale * s
            + self.same_category_weight * same
        )
        logits = score.new_full(score.shape, float("-inf")).index_put((qi, k), filled)
        log_copy = logits.log_softmax(-1)  # [Q, N], -inf in empty slots
        share = buffer.repeats.float() / buffer.events.clamp(min=1).float()
        was_repeat = (buffer.count[:, 0] > 1).float()
        z = self.gate(torch.cat([u, share[:, None], was_repeat[:, None]], -1))[:, 0]
        return z + self.gate_bias, log_copy

    def training_log_prob(
        self, batch, u: torch.Tensor, real: torch.Tensor, log_explore: torch.Tensor, items
    ) -> torch.Tensor:
        """log P(target) [P] of the mixture at every real input position.

        batch: the training windows [B, T] (inputs = events 0..T-2, target of position t =
        event t + 1); u [B, T-1, d]; real [B, T-1]; log_explore [P]: log P_explore(target)
        at the real positions (row-major, as u[real]); items: the item table [N_items, d].
        """
        B, T = batch.item.shape
        query = F.pad(real, (0, 1))  # [B, T]: the real input positions
        buffer, where = RecentBuffer.from_events(batch, query, self.cfg.buffer_size)
        b, q = where.unbind(1)
        # the model's score of each slot's item: u_q . e_item[j], through one [B, T-1, T] bmm
        row_scores = torch.bmm(u, items[batch.item].transpose(1, 2))  # [B, T-1, T]
        score = row_scores[b[:, None], q[:, None], buffer.source.clamp(min=0)]  # [P, N]
        score = score.masked_fill(~buffer.valid, 0.0)
        log_repeat, log_explore_gate, log_copy = self.log_probs(buffer, u[b, q], score)
        # the target's slot, if it has one (buffer items are distinct: at most one)
        hit = buffer.valid & (buffer.item == batch.item[b, q + 1][:, None])  # [P, N]
        at_hit = log_copy.gather(1, hit.long().argmax(-1, keepdim=True))[:, 0]
        log_copy_target = torch.where(hit.any(-1), at_hit, float("-inf"))
        return torch.logaddexp(log_repeat + log_copy_target, log_explore_gate + log_explore)

    def rank_scores(
        self,
        batch,
        u: torch.Tensor,
        scores: torch.Tensor,
        items: torch.Tensor,
        explore_is_normalised: bool = False,
    ) -> torch.Tensor:
        """log P(i) [B, N_items] after each row's last event; scores [B, N_items] = u . e_i
        (column 0, padding, -inf), u [B, d], items [N_items, d]; `serve` says what
        explore_is_normalised means."""
        last = torch.zeros_like(batch.item, dtype=torch.bool)
        last[torch.arange(len(last), device=last.device), batch.lengths - 1] = True
        buffer, _ = RecentBuffer.from_events(batch, last, self.cfg.buffer_size)
        return self.serve(buffer, u, scores, items, explore_is_normalised)

    def serve(
        self,
        buffer: RecentBuffer,
        u: torch.Tensor,
        scores: torch.Tensor,
        items: torch.Tensor,
        explore_is_normalised: bool = False,
    ) -> torch.Tensor:
        """log P(i) over all items from each query's buffer, user vector u [Q, d] and item
        scores [Q, N_items]: log(1 - p_repeat) + log P_explore everywhere, mixed with
        log p_repeat + log P_copy at the buffer's items. P_explore = softmax(scores), or,
        with explore_is_normalised, scores are log P_explore already and are used as they
        are: a gated explore side (ULIM's cascade over its top K categories) then sums to
        less than 1, as in training, where the gate is learnt against the ungated one;
        renormalising it would inflate every explore item by 1 / P(top K) against the
        buffer's."""
        slot_score = (u[:, None] * items[buffer.item]).sum(-1)  # [Q, N]
        gate_logit, log_copy = self.gate_and_copy(buffer, u, slot_score)
        log_explore = scores if explore_is_normalised else scores.log_softmax(-1)
        mixture = Mixture(gate_logit, log_copy, buffer.item, buffer.valid, log_explore)
        if self._recorded is not None:
            self._recorded.append(mixture)
        return mixture.log_p()

    @contextmanager
    def recording_mixtures(self) -> Iterator[list[Mixture]]:
        """Within the block, every `serve` (whichever model path calls it) also appends its
        `Mixture` to the yielded list: one model pass then ranks under any gate shift."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None


@dataclass(frozen=True)
class Mixture:
    """What `RepeatHead.serve` mixes, before the gate is applied: log P(i) under any shift
    of the gate's logit without running the model again (`calibration.fit_gate_bias`)."""

    gate_logit: torch.Tensor  # [Q], gate_bias included
    log_copy: torch.Tensor  # [Q, N] log P_copy per slot, -inf in empty slots
    slot_item: torch.Tensor  # [Q, N] the slots' items (0 in empty slots)
    valid: torch.Tensor  # [Q, N] filled slots
    log_explore: torch.Tensor  # [Q, N_items] log P_explore

    def log_p(self, shift: float = 0.0) -> torch.Tensor:
        """log P(i) [Q, N_items] with the gate's logit moved by `shift` (0: as served):
        log(1 - p_repeat) + log P_explore everywhere, mixed with log p_repeat + log P_copy
        at the buffer's items."""
        z = self.gate_logit + shift
        out = F.logsigmoid(-z)[:, None] + self.log_explore
        mixed = torch.logaddexp(
            out.gather(1, self.slot_item), F.logsigmoid(z)[:, None] + self.log_copy
        )
        # empty slots point at item 0 (padding): they write -inf where -inf already is
        return out.scatter(1, self.slot_item, mixed.masked_fill(~self.valid, float("-inf")))


# ---------------------------------------------------------------------------- serving form

# columns of a stream state's `recent` part, per slot (0 = newest): the buffer's item, count,
# last_ts and stage, paid_ts, the time of the newest payment for the item while it held
# a slot (0: none; the shop rule `exclude_paid_hours` reads it, the head does not), and the
# category of the item's newest event
RECENT_COLUMNS = ("item", "count", "last_ts", "stage", "paid_ts", "category")


def new_recent(num_slots: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty buffers for a stream state: `recent` [P, N, 6] int64 (`RECENT_COLUMNS`; an
    empty slot is all zeros, count 0) and `recent_counts` [P, 2] int64 (repeats, events)."""
    recent = torch.zeros(num_slots, size, len(RECENT_COLUMNS), dtype=torch.long, device=device)
    return recent, torch.zeros(num_slots, 2, dtype=torch.long, device=device)


@torch.no_grad()
def push_runs(recent: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor, batch) -> None:
    """Apply each user's run of events (batch rows [U, M], right-padded, in time order) to
    its slot's buffer in place: `DistinctItemBuffer.push`, one event position at a time,
    all users at once. An unknown item (index 0) takes a slot like any other; the head
    reads such a slot as empty."""
    buffer, counter = recent[slots], counts[slots]  # [U, N, 6], [U, 2]
    U, N, C = buffer.shape
    rows, index = torch.arange(U, device=buffer.device), torch.arange(N, device=buffer.device)
    for m in range(batch.item.shape[1]):
        live = m < batch.lengths  # [U]: users with an m-th event in this batch
        item, ts, stage, category = (
            batch.item[:, m],
            batch.ts[:, m],
            batch.behavior[:, m],
            batch.category[:, m],
        )
        filled = buffer[..., 1] > 0  # count > 0; empty slots hold item 0 too
        match = filled & (buffer[..., 0] == item[:, None])  # [U, N], at most one per row
        hit = match.any(1)
        # the slot that leaves: the item's own, else the last (dropped when the buffer is full)
        leaves = torch.where(hit, match.long().argmax(1), N - 1)  # [U]
        old = buffer[rows, leaves]  # [U, C]
        # slots 1..leaves take the one before them; later ones stay; slot 0 takes the event
        source = torch.where(index[None] <= leaves[:, None], index[None] - 1, index[None])
        moved = buffer.gather(1, source.clamp(min=0)[..., None].expand(U, N, C))
        paid = torch.where(stage == Behavior.PAYMENT, ts, torch.where(hit, old[:, 4], 0))
        count = torch.where(hit, old[:, 1] + 1, 1)
        moved[:, 0] = torch.stack([item, count, ts, stage, paid, category], -1)
        buffer = torch.where(live[:, None, None], moved, buffer)
        counter = counter + torch.stack([hit & live, live], -1).long()
    recent[slots], counts[slots] = buffer, counter


def serving_buffer(recent: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor) -> RecentBuffer:
    """These slots' buffers as the head reads them (`RecentBuffer`, no source)."""
    buffer = recent[slots]  # [U, N, 6]
    item, count, last_ts, stage, _, category = buffer.unbind(-1)
    counter = counts[slots]
    return RecentBuffer(
        item=item,
        count=count,
        last_ts=last_ts,
        stage=stage,
        category=category,
        repeats=counter[:, 0],
        events=counter[:, 1],
        source=torch.full_like(item, -1),
    )
