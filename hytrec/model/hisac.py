"""HiSAC: hierarchical votes over semantic IDs activate a user's interest agents, and
Soft-Routing Attention aggregates the behaviours into them (a READING of arXiv 2602.21009;
only its abstract is readable here: `../shared/design/WAVE2-MODELS.md` section 4 gives the
reading followed).

Read from the abstract: items get multi-level semantic IDs from a global hierarchical
codebook; a hierarchical vote over a user's behaviours sparsely activates personalised
interest agents (codebook nodes); Soft-Routing Attention aggregates every behaviour into
the agents by semantic similarity (less quantisation error than hard clustering, long-tail
behaviours kept); semantic and ranking embeddings are decoupled. Everything below is
inferred (RQ-KMeans semantic IDs as in TIGER/GRID, ComiRec's multi-interest read-out):

    codebook (frozen, `codebook.py`): each item's node per level, and its top-r routes per
        level (own node first) with logits <mu(p), s_i>, s = a trained item table
    votes     n(p) = #{behaviours whose own node at p's level is p}
    activate  A^1 = top-B_1 level-1 nodes with n >= n_min (none: the most voted one);
              A^l = for each p in A^{l-1}, its top-B_l children with n >= n_min
              (ties: the smaller node id); agents = activated nodes with no activated
              child (a valid tree cut: every agent's ancestors are activated)
    route     alpha_{p,i} = softmax_{i in R(p)} (<mu(p), s_i> / tau),  R(p) = { i : p is
              one of item i's routes at p's level };  h_p = sum_i alpha_{p,i} v_i
              with v_i = E[item_i] + B[beh_i] (E: the ranking table, learned; s frozen)
              hard routing: R(p) = p's own behaviours, equal weights (r = 1, no logits)
    agents    a_p = W_a h_p
    HiSAC     q = short read-out over the last K events (the newest as query);
              pooled = sum_p softmax_p(<q, a_p> / sqrt d) a_p;
              g = sigmoid(W_g [pooled ; q]);  u = LN(g pooled + (1 - g) q)
    HiSAC-mi  the agents themselves: score(x) = max_p <a_p, e_x>; trained with ComiRec's
              rule (the agent scoring the target highest takes the loss)

Forms. `forward` (training) computes every position's votes, activation and routing at
once over the row (pairwise over the row's nodes); the serving form keeps per user a
bounded map of nodes (`HiSACState`: key, votes, and log-sum-exp accumulators max logit m,
Z = sum exp(x - m), N = sum exp(x - m) v) updated per event, exact while a user touches at
most `node_cap` nodes; beyond, an event's routes to held nodes count first, then each new
node evicts the least voted (counted in `evictions`).

Without a codebook directory (`semantic_ids=None`) the model uses a hashed codebook (item
i's codes: the digits of a seeded permutation of the items, no routes beyond the own node,
logits 0): no semantics, so that a fresh config builds and streams (tests, the registry);
`hytrec build-semantic-ids` makes the real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, shift_window
from hytrec.model.codebook import SemanticIds, SemanticIdsError
from hytrec.model.dropout import Dropout
from hytrec.model.events import NUM_BEHAVIORS, Vocabulary
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config, new_recent, push_runs
from hytrec.model.streaming import SlotState
from hytrec.model.ulim import NewestQueryReadout

NEG_INF = float("-inf")


@dataclass(frozen=True)
class HiSACConfig:
    num_items: int = 1000  # including the padding row 0
    d_model: int = 64
    semantic_ids: str | None = None  # a `hytrec build-semantic-ids` directory
    levels: int = 3  # L: codebook levels (read from the codebook when one is given)
    route_top: int = 4  # r: routes per item and level (at most the codebook's)
    num_nodes: int = 0  # P: codebook nodes (filled from the codebook)
    beams: tuple[int, ...] = (8, 2, 2)  # B_l: children activated per activated parent
    min_votes: int = 2  # n_min
    temperature: float = 0.1  # tau, on unit vectors
    routing: str = "soft"  # "soft" | "hard" (own node only, equal weights)
    node_cap: int = 1024  # M_max: nodes kept per user in the serving state
    window: int = 20  # K: the short branch's last events
    train_len: int = 64  # positions per training row (the training form is quadratic)
    use_short: bool = True  # False: a learned query pools the agents, no fusion
    dropout: float = 0.1
    hashed_seed: int = 0  # the hashed codebook's permutation (semantic_ids=None)
    # the repeat/explore head over the user's recent distinct items (`repeat.py`; not in
    # the paper); HiSAC only: HiSAC-mi's max over agents has no single user vector
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "beams", tuple(self.beams))  # a list after a JSON round trip
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))
        if self.num_items < 2 or self.levels < 1 or self.route_top < 1 or self.window < 1:
            raise ValueError("HiSACConfig: num_items >= 2, levels, route_top, window >= 1")
        if len(self.beams) != self.levels or min(self.beams) < 1:
            raise ValueError(f"HiSACConfig: one beam >= 1 per level, got {self.beams}")
        if self.routing not in ("soft", "hard") or self.temperature <= 0 or self.node_cap < 1:
            raise ValueError("HiSACConfig: routing soft|hard, temperature > 0, node_cap >= 1")

    @property
    def max_agents(self) -> int:
        return math.prod(self.beams)


@dataclass(frozen=True)
class HiSACMultiConfig(HiSACConfig):
    """HiSAC-mi: scored by max over agents (no fusion, no short branch)."""

    use_short: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeat_head is not None:
            raise ValueError("HiSACMultiConfig: no repeat head (it mixes one user vector)")


@dataclass
class HiSACState(SlotState):
    """Pooled per-user serving state; every tensor's first dimension is the slot (user).

    node_key:   [P, C]    int64  node id + 1 of each map entry, 0 = empty
    node_votes: [P, C]    int64  behaviours whose own node is this node
    node_max:   [P, C]    float  running max of the routed logits (m)
    node_z:     [P, C]    float  sum exp(logit - m)
    node_sum:   [P, C, d] float  sum exp(logit - m) v
    window_item, window_behavior: [P, K] int64  the last K events, oldest first
    evictions:  [P]       int64  map entries lost to the cap (0: the state is exact)
    count, last_ts: [P]   int64
    recent:     [P, R, 6] int64  the repeat head's buffer (`repeat.RECENT_COLUMNS`)
    recent_counts: [P, 2] int64  its repeats and events; both None without a head
    """

    node_key: torch.Tensor
    node_votes: torch.Tensor
    node_max: torch.Tensor
    node_z: torch.Tensor
    node_sum: torch.Tensor
    window_item: torch.Tensor
    window_behavior: torch.Tensor
    evictions: torch.Tensor
    count: torch.Tensor
    last_ts: torch.Tensor
    recent: torch.Tensor | None = None
    recent_counts: torch.Tensor | None = None


@dataclass
class Agents:
    """A read-out: agent vectors [N, M, d] (0 where none), their nodes [N, M] (-1 = none,
    in node-id order), and the user vector [N, d] (HiSAC: the fusion; HiSAC-mi: the most
    voted agent)."""

    vectors: torch.Tensor
    nodes: torch.Tensor
    user: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.nodes >= 0


@dataclass
class Routing:
    """The training form's routing after every event: agent nodes [B, T, M] (-1 = none,
    node-id order), weights alpha [B, T, M, T(i)] of behaviour i into each agent (rows sum
    to 1 for an agent, 0 for none), and the position of the most voted agent [B, T]."""

    agents: torch.Tensor
    alpha: torch.Tensor
    top_voted: torch.Tensor


def hashed_codebook(num_items: int, levels: int, seed: int) -> SemanticIds:
    """Codes without semantics: the base-K digits of a seeded permutation of the items,
    K = ceil(N^(1/L)); routes = the own node only, logits 0."""
    n = num_items - 1
    base = max(2, math.ceil(n ** (1 / levels)))
    rank = np.random.default_rng(seed).permutation(n)
    codes = np.stack([rank // base ** (levels - 1 - lv) % base for lv in range(levels)], 1)
    item_nodes = np.zeros((n, levels), dtype=np.int64)
    node_level, node_parent = [], []
    offset = 0
    for lv in range(levels):
        prefixes, which = np.unique(codes[:, : lv + 1], axis=0, return_inverse=True)
        which = which.reshape(-1)
        item_nodes[:, lv] = offset + which
        first = np.zeros(len(prefixes), dtype=np.int64)
        first[which[::-1]] = np.arange(n)[::-1]
        node_level.append(np.full(len(prefixes), lv + 1, dtype=np.int64))
        parent = item_nodes[first, lv - 1] if lv else np.full(len(prefixes), -1, dtype=np.int64)
        node_parent.append(parent)
        offset += len(prefixes)
    empty = np.zeros((0,), dtype=np.float32)
    return SemanticIds(
        ids=np.arange(1, num_items, dtype=np.int64),
        codes=np.concatenate([codes, np.zeros((n, 1), dtype=np.int64)], 1),
        node_level=np.concatenate(node_level),
        node_parent=np.concatenate(node_parent),
        centres=empty.reshape(offset, 0),
        item_nodes=item_nodes,
        routes=item_nodes[:, :, None],
        route_logits=np.zeros((n, levels, 1), dtype=np.float32),
        vectors=empty.reshape(n, 0),
    )


def activate(
    node: torch.Tensor,
    votes: torch.Tensor,
    valid: torch.Tensor,
    node_level: torch.Tensor,
    node_parent: torch.Tensor,
    beams: tuple[int, ...],
    min_votes: int,
) -> torch.Tensor:
    """bool [N, C]: which candidates are agents. Candidates: node ids [N, C] with their
    votes [N, C] (valid [N, C]: a real, distinct node with a vote). See the module
    docstring for the rule. Sorts and binary searches per row, O(C log C): the serving map
    holds up to node_cap candidates."""
    N, C = node.shape
    safe = node.clamp(min=0)
    level = torch.where(valid, node_level[safe], 0)  # [N, C]
    parent = torch.where(valid, node_parent[safe], -2)
    # rank among siblings: group by parent, then more votes first, then the smaller node id
    order = node.sort(dim=1, stable=True).indices
    order = order.gather(1, (-votes.gather(1, order)).sort(dim=1, stable=True).indices)
    order = order.gather(1, parent.gather(1, order).sort(dim=1, stable=True).indices)
    grouped = parent.gather(1, order)
    pos = torch.arange(C, device=node.device).expand(N, C)
    new_group = torch.ones_like(grouped, dtype=torch.bool)
    new_group[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    start = torch.where(new_group, pos, 0).cummax(1).values
    rank = torch.empty_like(pos).scatter_(1, order, pos - start)  # [N, C]
    # where each candidate's parent sits among the candidates (-1: not a candidate)
    key = torch.where(valid, node, torch.iinfo(torch.long).max)
    by_node = key.sort(1).indices
    sorted_nodes = key.gather(1, by_node)
    at = torch.searchsorted(sorted_nodes, parent.contiguous()).clamp(max=C - 1)
    parent_pos = torch.where(sorted_nodes.gather(1, at) == parent, by_node.gather(1, at), -1)
    has_parent = parent_pos >= 0
    parent_at = parent_pos.clamp(min=0)
    enough = votes >= min_votes
    first = valid & (level == 1)
    active = first & enough & (rank < beams[0])
    # nobody with n_min votes: the most voted level-1 node stands alone
    active |= first & (rank == 0) & ~active.any(1, keepdim=True)
    for lv in range(2, len(beams) + 1):
        parent_active = has_parent & active.gather(1, parent_at)
        active |= valid & (level == lv) & enough & (rank < beams[lv - 1]) & parent_active
    children = torch.zeros_like(pos).scatter_add_(1, parent_at, (active & has_parent).long())
    return active & (children == 0)


def _pick(mask: torch.Tensor, node: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [N, m]: the nodes of the (at most m) True entries of each row, in candidate
    order (the candidates are sorted by node id), -1 after them."""
    C = mask.shape[1]
    order = torch.where(mask, torch.arange(C, device=mask.device), C)
    index = order.sort(1).values[:, :m]  # [N, m]
    if index.shape[1] < m:
        index = torch.cat([index, index.new_full((len(index), m - index.shape[1]), C)], 1)
    return torch.where(index < C, node.gather(1, index.clamp(max=C - 1)), -1)


class HiSAC(SequentialModel):
    NAME = "hisac"
    CONFIG = HiSACConfig

    def __init__(
        self,
        cfg: HiSACConfig,
        items: Vocabulary | None = None,
        categories: Vocabulary | None = None,
        codebook: SemanticIds | None = None,
    ):
        if codebook is None and cfg.num_nodes == 0:
            codebook = (
                SemanticIds.load(cfg.semantic_ids)
                if cfg.semantic_ids is not None
                else hashed_codebook(cfg.num_items, cfg.levels, cfg.hashed_seed)
            )
        if codebook is not None:
            _check_codebook(codebook, cfg, items)
            route_top = 1 if cfg.routing == "hard" else min(cfg.route_top, codebook.route_top)
            cfg = replace(
                cfg, levels=codebook.levels, route_top=route_top, num_nodes=codebook.num_nodes
            )
        super().__init__(cfg, items, categories)
        d, N, L, R = cfg.d_model, cfg.num_items, cfg.levels, cfg.route_top
        # the frozen codebook (buffers: saved with the weights, never trained)
        self.register_buffer("item_routes", torch.full((N, L, R), -1, dtype=torch.long))
        self.register_buffer("item_route_logit", torch.zeros(N, L, R))
        self.register_buffer("node_level", torch.zeros(cfg.num_nodes, dtype=torch.long))
        self.register_buffer("node_parent", torch.zeros(cfg.num_nodes, dtype=torch.long))
        if codebook is not None:
            ids = torch.from_numpy(codebook.ids)
            self.item_routes[ids] = torch.from_numpy(codebook.routes[:, :, :R].copy())
            logits = codebook.route_logits[:, :, :R] if cfg.routing == "soft" else 0.0
            self.item_route_logit[ids] = torch.as_tensor(logits, dtype=torch.float32)
            self.node_level.copy_(torch.from_numpy(codebook.node_level))
            self.node_parent.copy_(torch.from_numpy(codebook.node_parent))
        self.item_emb = nn.Embedding(N, d, padding_idx=0)
        self.behavior_emb = nn.Embedding(NUM_BEHAVIORS, d, padding_idx=0)
        self.dropout = Dropout(cfg.dropout)
        self.agent_proj = nn.Linear(d, d)
        if cfg.use_short:
            self.short = NewestQueryReadout(d, cfg.window)
            self.gate = nn.Linear(2 * d, d)
        else:
            self.pool_query = nn.Parameter(torch.zeros(d))
        self.norm = nn.LayerNorm(d)
        self.apply(self._init_weights)
        self.repeat_head = RepeatHead(cfg.repeat_head, d) if cfg.repeat_head else None

    # ------------------------------------------------------------------ shared pieces

    def values(self, item: torch.Tensor, behavior: torch.Tensor) -> torch.Tensor:
        """v = E[item] + B[behaviour] (the ranking side: learned, unlike the routes)."""
        return self.dropout(self.item_emb(item) + self.behavior_emb(behavior))

    def _activate(self, node, votes, valid) -> torch.Tensor:
        cfg = self.cfg
        mask = activate(node, votes, valid, self.node_level, self.node_parent, cfg.beams,
                        cfg.min_votes)  # fmt: skip
        return _pick(mask, node, cfg.max_agents)

    def _read(self, h: torch.Tensor, nodes: torch.Tensor, short: torch.Tensor | None,
              top_voted: torch.Tensor) -> Agents:  # fmt: skip
        """Agents from the routed sums h [N, M, d] of agent nodes [N, M] (-1 = none); short
        [N, d] the short read-out; top_voted [N]: the position of the most voted agent."""
        has = nodes >= 0
        a = self.agent_proj(h) * has[..., None]  # [N, M, d]
        d = a.shape[-1]
        if isinstance(self.cfg, HiSACMultiConfig):
            user = a[torch.arange(len(a), device=a.device), top_voted]
            return Agents(a, nodes, user)
        query = short if short is not None else self.pool_query.expand(len(a), d)
        logits = torch.einsum("nmd,nd->nm", a, query) / math.sqrt(d)
        weights = logits.masked_fill(~has, NEG_INF).softmax(-1)
        pooled = torch.einsum("nm,nmd->nd", weights, a)
        if short is None:
            return Agents(a, nodes, self.norm(pooled))
        g = torch.sigmoid(self.gate(torch.cat([pooled, short], -1)))
        return Agents(a, nodes, self.norm(g * pooled + (1 - g) * short))

    # ------------------------------------------------------------------ training form

    @torch.no_grad()
    def routing(self, batch: EventBatch) -> Routing:
        """Votes, activation and routing weights after every event (no parameters: the
        codebook is frozen)."""
        cfg = self.cfg
        B, T = batch.item.shape
        device = batch.item.device
        real = batch.mask  # [B, T]
        L, M = cfg.levels, cfg.max_agents
        routes = self.item_routes[batch.item]  # [B, T, L, R] (padding rows: -1)
        logit = self.item_route_logit[batch.item] / cfg.temperature
        own = routes[..., 0].masked_fill(~real[..., None], -1)  # [B, T, L]
        # the row's distinct own nodes, sorted (duplicates and -1 after them)
        flat = own.reshape(B, T * L).sort(1).values
        distinct = (flat >= 0) & torch.cat(
            [torch.ones(B, 1, dtype=torch.bool, device=device), flat[:, 1:] != flat[:, :-1]], 1
        )
        keep = torch.where(distinct, torch.arange(T * L, device=device), T * L).sort(1).values
        C = max(1, int(distinct.sum(1).max()))
        keep = keep[:, :C]
        cand_ok = keep < T * L
        cand = torch.where(cand_ok, flat.gather(1, keep.clamp(max=T * L - 1)), -1)  # [B, C]
        # votes after every event: [B, T, C]
        hit = (own[:, :, :, None] == cand[:, None, None, :]).any(2) & cand_ok[:, None, :]
        votes = hit.long().cumsum(1)
        valid = cand_ok[:, None, :] & (votes > 0)
        agents = self._activate(
            cand[:, None].expand(B, T, C).reshape(B * T, C),
            votes.reshape(B * T, C),
            valid.reshape(B * T, C),
        ).view(B, T, M)
        has = agents >= 0
        # behaviour i (<= t) reaches agent p through a route at p's level
        level = self.node_level[agents.clamp(min=0)] - 1  # [B, T, M]
        rows = torch.arange(B, device=device)[:, None, None]
        r_nodes = routes.permute(0, 2, 1, 3)[rows, level]  # [B, T, M, T(i), R]
        r_logit = logit.permute(0, 2, 1, 3)[rows, level]
        x = torch.where(r_nodes == agents[..., None, None], r_logit, NEG_INF).amax(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T(t), T(i)]
        x = x.masked_fill(~(causal[None, :, None, :] & has[..., None]), NEG_INF)
        alpha = x.softmax(-1).nan_to_num(0.0)  # [B, T, M, T(i)]; no agent: all -inf -> 0
        voted = torch.where(has, votes.gather(2, _candidate_index(cand, agents)), -1)
        return Routing(agents, alpha, voted.argmax(-1))

    def forward_agents(self, batch: EventBatch) -> Agents:
        """The read-out after every event, rows flattened to N = B * T."""
        cfg = self.cfg
        B, T = batch.item.shape
        M = cfg.max_agents
        route = self.routing(batch)
        v = self.values(batch.item, batch.behavior)  # [B, T, d]
        h = torch.einsum("btmi,bid->btmd", route.alpha, v)
        short = None
        if cfg.use_short:
            K = cfg.window
            pos = torch.arange(T, device=v.device)
            offsets = pos[:, None] - torch.arange(K - 1, -1, -1, device=v.device)  # [T, K]
            ok = (offsets >= 0)[None] & batch.mask[:, :, None]  # [B, T, K]
            x_short = v[:, offsets.clamp(min=0)] * ok[..., None]  # [B, T, K, d]
            short = self.short(x_short.view(B * T, K, -1), ok.view(B * T, K))
        return self._read(
            h.view(B * T, M, -1), route.agents.view(B * T, M), short, route.top_voted.view(-1)
        )

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """The user vector after every event [B, T, d]."""
        B, T = batch.item.shape
        return self.forward_agents(batch).user.view(B, T, -1)

    # ------------------------------------------------------------------ serving form

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> HiSACState:
        cfg = self.cfg
        C, K, d = cfg.node_cap, cfg.window, cfg.d_model

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(num_slots, *shape, dtype=dtype, device=device)

        head = cfg.repeat_head
        recent = new_recent(num_slots, head.buffer_size, device) if head else (None, None)
        return HiSACState(
            node_key=zeros(C),
            node_votes=zeros(C),
            node_max=zeros(C, dtype=torch.float32),
            node_z=zeros(C, dtype=torch.float32),
            node_sum=zeros(C, d, dtype=torch.float32),
            window_item=zeros(K),
            window_behavior=zeros(K),
            evictions=zeros(),
            count=zeros(),
            last_ts=zeros(),
            recent=recent[0],
            recent_counts=recent[1],
        )

    @torch.no_grad()
    def apply_events(self, state: HiSACState, slots: torch.Tensor, batch: EventBatch) -> None:
        """Apply each user's run of new events in place, one event at a time: each of the
        event's routes finds its node in the user's map (or an empty entry, or, once the
        routes to held nodes have counted, evicts the least voted), adds exp(logit - m) v to
        its log-sum-exp accumulators, and the own nodes count a vote."""
        cfg = self.cfg
        one = torch.ones(1, dtype=torch.long, device=slots.device)
        for m in range(int(batch.lengths.max())):
            active = batch.lengths > m
            users = slots[active]
            item, behavior = batch.item[active, m], batch.behavior[active, m]
            n = len(users)
            v = self.values(item, behavior)  # [n, d]
            routes = self.item_routes[item].view(n, -1)  # [n, L * R]
            logits = (self.item_route_logit[item] / cfg.temperature).view(n, -1)
            is_own = torch.zeros_like(routes, dtype=torch.bool).view(n, cfg.levels, -1)
            is_own[..., 0] = True
            is_own = is_own.view(n, -1)
            slot, new, room = self._free_slots(state, users, routes)
            # users with room for their new nodes: all routes at once
            self._accumulate(state, users[room], routes[room], slot[room], logits[room],
                             v[room], is_own[room])  # fmt: skip
            full = ~room  # a full map: one route at a time, evicting the least voted
            if full.any():
                self._evicting(state, users[full], routes[full], slot[full], new[full],
                               logits[full], v[full], is_own[full])  # fmt: skip
            for ring, value in ((state.window_item, item), (state.window_behavior, behavior)):
                ring[users] = shift_window(ring[users], value[:, None], one.expand(n))
            state.count[users] += 1
            state.last_ts[users] = batch.ts[active, m]
        if self.repeat_head is not None:
            push_runs(state.recent, state.recent_counts, slots, batch)

    @staticmethod
    def _free_slots(
        state: HiSACState, users: torch.Tensor, nodes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot int64 [n, K], new bool [n, K], room bool [n]): the map entry of each node
        [n, K] (-1 nodes: ignored), its own or, for a new node (one the map does not hold),
        the next empty entry; room: the user has an empty entry for each of its new nodes
        (a new node's slot is meaningless where it has not).
        Entries fill from the left and are only ever replaced, so the occupied ones are a
        prefix of the map."""
        keys = state.node_key[users]  # [n, C]
        C = keys.shape[1]
        occupied = (keys > 0).sum(1)  # [n]
        width = max(1, int(occupied.max()))
        found = keys[:, None, :width] == (nodes + 1)[..., None]  # [n, K, width]
        has = found.any(-1)
        new = (nodes >= 0) & ~has
        room = occupied + new.sum(1) <= C
        nth = new.long().cumsum(1) - 1  # the j-th new node takes the entry occupied + j
        slot = torch.where(has, found.int().argmax(-1), (occupied[:, None] + nth).clamp(0, C - 1))
        return slot, new, room

    def _evicting(self, state, users, routes, slot, new, logits, v, own) -> None:
        """A full map: the routes to nodes it holds accumulate at once, then the new nodes one
        at a time, each taking an empty entry, else evicting the least voted (then the
        first), counted in `evictions`. Only the new nodes need the loop: a full map's event
        usually brings one to three of its L x R routes' nodes. slot, new: `_free_slots`'s."""
        held = (routes >= 0) & ~new
        self._accumulate(state, users, torch.where(held, routes, -1), slot, logits, v,
                         own)  # fmt: skip
        for k in new.any(0).nonzero()[:, 0].tolist():
            node = torch.where(new[:, k : k + 1], routes[:, k : k + 1], -1)
            keys = state.node_key[users]  # [n, C]
            fewest = torch.where(keys == 0, -1, state.node_votes[users])
            slot = fewest.argmin(1, keepdim=True)
            evicted = (node >= 0) & (keys.gather(1, slot) != 0)
            state.evictions[users] += evicted[:, 0].long()
            self._accumulate(state, users, node, slot, logits[:, k : k + 1], v,
                             own[:, k : k + 1])  # fmt: skip

    def _accumulate(self, state, users, nodes, slot, x, v, own) -> None:
        """Add each route (nodes [n, K] at map entries slot [n, K], logits x [n, K]) to its
        node's accumulators: m' = max(m, x), Z' = Z e^{m - m'} + e^{x - m'}, N' = N e^{m - m'}
        + e^{x - m'} v; an own node counts a vote. A new node (key differs) starts at 0."""
        ok = nodes >= 0
        rows = users[:, None].expand_as(slot)
        fresh = state.node_key[rows, slot] != nodes + 1
        old_m = torch.where(fresh, x, state.node_max[rows, slot])
        old_z = torch.where(fresh, 0.0, state.node_z[rows, slot])
        old_sum = torch.where(fresh[..., None], 0.0, state.node_sum[rows, slot])  # [n, K, d]
        old_votes = torch.where(fresh, 0, state.node_votes[rows, slot])
        new_m = torch.maximum(old_m, x)
        scale, w = (old_m - new_m).exp(), (x - new_m).exp()
        u, s = rows[ok], slot[ok]
        state.node_key[u, s] = (nodes + 1)[ok]
        state.node_max[u, s] = new_m[ok]
        state.node_z[u, s] = (old_z * scale + w)[ok]
        state.node_sum[u, s] = (old_sum * scale[..., None] + w[..., None] * v[:, None])[ok]
        state.node_votes[u, s] = (old_votes + own.long())[ok]

    @torch.no_grad()
    def read_state(self, state: HiSACState, slots: torch.Tensor) -> Agents:
        """The agents and user vector of these users from their maps."""
        cfg = self.cfg
        keys = state.node_key[slots]  # [U, C]
        voted = (keys > 0) & (state.node_votes[slots] > 0)  # only voted nodes can activate
        order = torch.where(voted, keys - 1, torch.iinfo(torch.long).max).argsort(1)
        # the voted entries sorted by node id, the rest cut off (activation is pairwise)
        order = order[:, : max(1, int(voted.sum(1).max()))]
        valid = voted.gather(1, order)
        node = torch.where(valid, (keys - 1).gather(1, order), -1)
        votes = state.node_votes[slots].gather(1, order)
        agents = self._activate(node, votes, valid)  # [U, M]
        has = agents >= 0
        where = _candidate_index(node, agents)  # [U, M] positions in the sorted map
        entry = order.gather(1, where)
        rows = slots[:, None]
        h = state.node_sum[rows, entry] / state.node_z[rows, entry][..., None].clamp(min=1e-30)
        h = h * has[..., None]
        short = None
        if cfg.use_short:
            K = cfg.window
            held = state.count[slots].clamp(max=K)
            ok = torch.arange(K, device=slots.device)[None] >= (K - held)[:, None]
            x = self.values(state.window_item[slots], state.window_behavior[slots]) * ok[..., None]
            short = self.short(x, ok)
        voted = torch.where(has, votes.gather(1, where), -1)
        return self._read(h, agents, short, voted.argmax(1))

    @torch.no_grad()
    def step(self, state: HiSACState, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        """Apply the runs, then the user vectors [U, d]."""
        if self.training:
            raise RuntimeError("HiSAC.step serves a trained model: call model.eval() first")
        self.apply_events(state, slots, batch)
        return self.read_state(state, slots).user

    # ------------------------------------------------------------------ training

    def position_vectors(self, read: Agents, target: torch.Tensor) -> torch.Tensor:
        """The vector each position's loss reads: the user vector [P, d]."""
        return read.user

    def training_loss(
        self, batch: EventBatch, negatives: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """(mean next-item cross-entropy, positions) over each row's last `train_len` + 1
        events (the training form is quadratic in the row; serving and evaluation read the
        whole history through the map); with the repeat head, the mixture's -log P(target)
        over the same events."""
        from hytrec.model.train import next_item_loss, target_log_prob  # train imports us

        batch = last_events(batch, self.cfg.train_len + 1)
        T = batch.item.shape[1]
        inputs = batch.inputs()
        keep = torch.arange(T - 1, device=batch.item.device)[None] < inputs.lengths[:, None]
        keep = keep.reshape(-1)
        read = self.forward_agents(inputs)
        read = Agents(read.vectors[keep], read.nodes[keep], read.user[keep])
        target = batch.item[:, 1:].reshape(-1)[keep]
        u = self.position_vectors(read, target)
        if self.repeat_head is None:
            return next_item_loss(self, u, target, negatives, generator), int(keep.sum())
        log_explore = target_log_prob(self, u, target, negatives, generator, estimate_full=True)
        real = keep.view(len(batch.lengths), T - 1)
        u_rows = u.new_zeros(*real.shape, u.shape[-1]).masked_scatter(real[..., None], u)
        log_p = self.repeat_head.training_log_prob(batch, u_rows, real, log_explore,
                                                   self.item_table())  # fmt: skip
        return -log_p.mean(), int(keep.sum())

    # ------------------------------------------------------------------ ranking

    @torch.no_grad()
    def readout(self, batch: EventBatch) -> tuple[Agents, HiSACState]:
        """The serving read-out after each row's last event (the whole history streamed)."""
        state = self.new_state(len(batch.lengths), batch.item.device)
        slots = torch.arange(len(batch.lengths), device=batch.item.device)
        self.apply_events(state, slots, batch)
        return self.read_state(state, slots), state

    @torch.no_grad()
    def user_vector(self, batch: EventBatch) -> torch.Tensor:
        return self.readout(batch)[0].user

    @torch.no_grad()
    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        """Scores [B, num_items] after each row's whole history, from the serving form
        (the training form is quadratic in the history); with the head, log P(i)."""
        u = self.user_vector(batch)
        scores = self.score(u)
        if self.repeat_head is None:
            return scores
        return self.repeat_head.rank_scores(batch, u, scores, self.item_table())


def last_events(batch: EventBatch, n: int) -> EventBatch:
    """Each row's last n events (rows right-padded, as the batch)."""
    if batch.item.shape[1] <= n:
        return batch
    start = (batch.lengths - n).clamp(min=0)  # [B]
    index = (start[:, None] + torch.arange(n, device=start.device)).clamp(
        max=batch.item.shape[1] - 1
    )
    lengths = batch.lengths.clamp(max=n)
    keep = torch.arange(n, device=start.device)[None] < lengths[:, None]

    def crop(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index) * keep

    return EventBatch(crop(batch.item), crop(batch.category), crop(batch.behavior),
                      crop(batch.ts), lengths)  # fmt: skip


def _candidate_index(cand: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
    """int64 [..., M]: the position of each agent node in the candidates [..., C] (0 for
    -1), broadcasting a [B, C] candidate list over [B, T, M] agents."""
    while cand.dim() < agents.dim():
        cand = cand.unsqueeze(-2)
    eq = cand.unsqueeze(-2) == agents.unsqueeze(-1)  # [..., M, C]
    return (eq & (agents.unsqueeze(-1) >= 0)).int().argmax(-1)


def _check_codebook(codebook: SemanticIds, cfg: HiSACConfig, items: Vocabulary | None) -> None:
    """Refuse a codebook built for another item vocabulary or table size."""
    if int(codebook.ids.max(initial=0)) >= cfg.num_items:
        raise SemanticIdsError(
            f"{cfg.semantic_ids}: item ids up to {int(codebook.ids.max())}, the model has "
            f"{cfg.num_items} rows"
        )
    if items is not None:
        codebook.require_items(items, f"{cfg.semantic_ids}: ")
    if len(cfg.beams) != codebook.levels:
        raise SemanticIdsError(
            f"{cfg.semantic_ids}: {codebook.levels} levels, the config has beams {cfg.beams}"
        )


class HiSACMulti(HiSAC):
    """HiSAC-mi: several queries per user (the agents), scored by max over them."""

    NAME = "hisacmulti"
    CONFIG = HiSACMultiConfig

    def score_agents(self, agents: Agents) -> torch.Tensor:
        """max_p <a_p, e_x> [N, num_items] over each row's agents."""
        scores = torch.einsum("nmd,vd->nmv", agents.vectors, self.item_table())
        scores = scores.masked_fill(~agents.present[..., None], NEG_INF).amax(1)
        scores[:, 0] = NEG_INF
        return scores

    @torch.no_grad()
    def rank_scores(self, batch: EventBatch) -> torch.Tensor:
        return self.score_agents(self.readout(batch)[0])

    @torch.no_grad()
    def serving_queries(
        self, state: HiSACState, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """These users' agents [U, M, d] and which are real [U, M] (after `step`): the engine
        searches with each and merges by max score, which is `score_agents`' ranking."""
        read = self.read_state(state, slots)
        return read.vectors, read.present

    def position_vectors(self, read: Agents, target: torch.Tensor) -> torch.Tensor:
        """ComiRec's rule: at every position the agent scoring the next item highest takes
        the loss. read: the agents at P positions, target [P] -> [P, d]."""
        with torch.no_grad():
            fit = torch.einsum("pmd,pd->pm", read.vectors, self.item_table()[target])
            best = fit.masked_fill(~read.present, NEG_INF).argmax(1)
        return read.vectors[torch.arange(len(best), device=best.device), best]
