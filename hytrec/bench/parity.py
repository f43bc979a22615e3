"""Parity figures: every fast or streaming form against its oracle, on seeded random data.

`hytrec check parity` prints them as JSON; the tests assert the same functions' bounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from hytrec.kernels import chunk_tadn, naive_tadn, tadn_step
from hytrec.model.events import NUM_BEHAVIORS
from hytrec.model.hytrec import EventBatch, HyTRec, HyTRecConfig
from hytrec.model.repeat import RecentBuffer, RepeatConfig, serving_buffer


@dataclass
class UserEvents:
    """One user's events, 1-D int64 tensors of equal length."""

    item: torch.Tensor
    category: torch.Tensor
    behavior: torch.Tensor
    ts: torch.Tensor

    def __len__(self) -> int:
        return len(self.item)

    def run(self, start: int, stop: int) -> UserEvents:
        return UserEvents(
            self.item[start:stop],
            self.category[start:stop],
            self.behavior[start:stop],
            self.ts[start:stop],
        )


def random_user(length: int, cfg: HyTRecConfig, generator: torch.Generator) -> UserEvents:
    """Random ids and timestamps whose gaps span a second to about two weeks (log-uniform)."""

    def ints(low, high):
        return torch.randint(low, high, (length,), generator=generator)

    gaps = torch.exp(torch.rand(length, generator=generator) * 14.0).long()
    return UserEvents(
        item=ints(1, cfg.num_items),
        category=ints(1, cfg.num_categories),
        behavior=ints(1, NUM_BEHAVIORS),
        ts=1_500_000_000 + gaps.cumsum(0),
    )


def revisiting_user(
    length: int, cfg: HyTRecConfig, generator: torch.Generator, distinct: int = 150
) -> UserEvents:
    """`random_user` whose items come from a pool of `distinct` items: repeats are common,
    and so are evictions from a repeat buffer smaller than the pool."""
    user = random_user(length, cfg, generator)
    pool = torch.randint(1, cfg.num_items, (distinct,), generator=generator)
    user.item = pool[torch.randint(0, distinct, (length,), generator=generator)]
    return user


def pad_batch(runs: list[UserEvents]) -> EventBatch:
    """Right-pad runs of events into an `EventBatch`."""
    M = max(len(r) for r in runs)

    def column(name):
        return torch.stack([F.pad(getattr(r, name), (0, M - len(r))) for r in runs])

    return EventBatch(
        item=column("item"),
        category=column("category"),
        behavior=column("behavior"),
        ts=column("ts"),
        lengths=torch.tensor([len(r) for r in runs]),
    )


@torch.no_grad()
def parallel_user_vectors(model: HyTRec, users: list[UserEvents]) -> list[torch.Tensor]:
    """The training form: user vectors after every event of each user, [T_u, d] each."""
    u = model(pad_batch(users))
    return [u[i, : len(user)] for i, user in enumerate(users)]


@torch.no_grad()
def streamed_user_vectors(
    model: HyTRec, users: list[UserEvents], max_batch: int, seed: int = 0, readout=None
) -> list[dict[int, torch.Tensor]]:
    """The serving form: all users' events interleaved at random and applied in micro-batches
    of up to `max_batch` events (max_batch=1: one event at a time). Returns, per user, the
    user vector after each run (or `readout(state, slots, vectors)`'s row of it), keyed by
    the index of the run's last event."""
    rng = random.Random(seed)
    arrival = [u for u, user in enumerate(users) for _ in range(len(user))]
    rng.shuffle(arrival)  # a user's events keep their order; users interleave
    state = model.new_state(len(users) + 2)
    slot_of = torch.randperm(state.num_slots, generator=torch.Generator().manual_seed(seed))
    applied = [0] * len(users)
    out: list[dict[int, torch.Tensor]] = [{} for _ in users]
    pos = 0
    while pos < len(arrival):
        size = rng.randint(1, max_batch)
        chunk, pos = arrival[pos : pos + size], pos + size
        batch_users = sorted(set(chunk))
        runs = [users[u].run(applied[u], applied[u] + chunk.count(u)) for u in batch_users]
        slots = slot_of[batch_users]
        vectors = model.step(state, slots, pad_batch(runs))
        if readout is not None:
            vectors = readout(state, slots, vectors)
        for u, run, vector in zip(batch_users, runs, vectors, strict=True):
            applied[u] += len(run)
            out[u][applied[u] - 1] = vector
    return out


@torch.no_grad()
def share_hitting_cap(model, users: list[UserEvents]) -> float:
    """Share of users whose bounded state (HiSAC's node map, ULIM's category slots) evicted
    something: their later figures are no longer exact."""
    state = model.new_state(len(users))
    model.apply_events(state, torch.arange(len(users)), pad_batch(users))
    return float((state.evictions > 0).float().mean())


def stream_vs_parallel_max_abs(
    model: HyTRec,
    users: list[UserEvents],
    max_batch: int,
    seed: int = 0,
    parallel: list[torch.Tensor] | None = None,
    readout=None,
) -> float:
    """Max |served - training form| after every run of every user: the user vectors, or
    what `readout` reads after a step against the rows of `parallel` (both or neither)."""
    if parallel is None:
        parallel = parallel_user_vectors(model, users)
    streamed = streamed_user_vectors(model, users, max_batch, seed, readout)
    return max(
        (vector - parallel[u][t]).abs().max().item()
        for u in range(len(users))
        for t, vector in streamed[u].items()
    )


@torch.no_grad()
def parallel_log_probs(model, users: list[UserEvents]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The offline ranking of a model with a repeat head after every event of each user:
    (log P(i) over all items [T_u, num_items], the buffer's items [T_u, N], 0 in empty
    slots) per user, from the training form's buffers."""
    batch = pad_batch(users)
    u = model(batch)  # [B, T, d]
    size = model.repeat_head.cfg.buffer_size
    buffer, where = RecentBuffer.from_events(batch, batch.mask, size)
    b, q = where.unbind(1)  # row-major: user by user, event by event
    log_p = model.repeat_head.serve(buffer, u[b, q], model.score(u[b, q]), model.item_table())
    sizes = batch.lengths.tolist()
    return list(zip(log_p.split(sizes), buffer.item.split(sizes), strict=True))


def served_log_probs(model, state, slots: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """What the stream ranks by after a step: log P(i) [U, num_items] from the users'
    buffers in `state` and their user vectors."""
    buffer = serving_buffer(state.recent, state.recent_counts, slots)
    return model.repeat_head.serve(buffer, vectors, model.score(vectors), model.item_table())


def repeat_head_stream_vs_parallel_max_abs(
    model, users: list[UserEvents], max_batch: int, seed: int = 0, top_k: int = 20
) -> float:
    """Max |served - offline| of log P(i) over each query's candidates: the items in its
    buffer (copy) and the top_k items by the offline log P (explore)."""
    parallel = parallel_log_probs(model, users)
    streamed = streamed_user_vectors(
        model, users, max_batch, seed, partial(served_log_probs, model)
    )
    worst = 0.0
    for (log_p, copy), served_after in zip(parallel, streamed, strict=True):
        for t, served in served_after.items():
            candidates = torch.cat([copy[t][copy[t] > 0], log_p[t].topk(top_k).indices])
            worst = max(worst, (served[candidates] - log_p[t][candidates]).abs().max().item())
    return worst


def kernel_inputs(
    B: int, T: int, H: int, K: int, V: int, generator: torch.Generator, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    x = dict(
        q=randn(B, T, H, K),
        k=F.normalize(randn(B, T, H, K), dim=-1),
        v=randn(B, T, H, V),
        beta=rand(B, T, H),
        erase=rand(B, T, H),
        log_decay=-rand(B, T, H) * 0.3,
        initial_state=randn(B, H, K, V),
    )
    return {n: t.to(dtype) for n, t in x.items()}


def chunked_vs_reference(lengths=(1, 63, 257), chunk_sizes=(16, 64), seed=0) -> tuple[float, float]:
    """fp32 chunked form against the fp64 reference: outputs, final states, all gradients.
    Returns (max abs error, max abs error / max(1, |reference|) over each compared tensor)."""
    generator = torch.Generator().manual_seed(seed)
    worst = worst_scaled = 0.0
    for T in lengths:
        x64 = kernel_inputs(2, T, 2, 32, 32, generator, torch.float64)
        for C in chunk_sizes:
            results = []
            for fn, x in ((naive_tadn, x64), (chunk_tadn, {n: t.float() for n, t in x64.items()})):
                leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
                o, s = fn(**leaves) if fn is naive_tadn else fn(**leaves, chunk_size=C)
                (o.sum() + s.sum()).backward()
                results.append([o, s, *(leaves[n].grad for n in sorted(leaves))])
            for ref, fast in zip(*results, strict=True):
                err = (fast.double() - ref).abs().max().item()
                worst = max(worst, err)
                worst_scaled = max(worst_scaled, err / max(1.0, ref.abs().max().item()))
    return worst, worst_scaled


def step_vs_reference_max_abs(num_users=16, max_len=50, seed=0) -> float:
    """Runs of many users' events through the pooled step against the reference per user."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_users,), generator=generator)
    x = kernel_inputs(num_users, max_len, 2, 32, 32, generator)
    ref_o, ref_s = naive_tadn(**{n: t[:, :max_len] for n, t in x.items()})
    pool = torch.zeros(num_users * 2, 2, 32, 32)
    slots = torch.randperm(num_users * 2, generator=generator)[:num_users]
    pool[slots] = x["initial_state"]
    gates = {n: x[n] for n in ("q", "k", "v", "beta", "erase", "log_decay")}
    o = tadn_step(pool, slots, torch.full((num_users,), max_len), **gates)
    worst = (o - ref_o).abs().max().item()
    # and a second, shorter run per user on top: the pool must have kept the first
    more = kernel_inputs(num_users, 7, 2, 32, 32, generator)
    more.pop("initial_state")
    o2 = tadn_step(pool, slots, lengths.clamp(max=7), **more)
    for u in range(num_users):
        n = int(lengths[u].clamp(max=7))
        ref_o2_u, ref_s2_u = naive_tadn(
            **{k: v[u : u + 1, :n] for k, v in more.items()}, initial_state=ref_s[u : u + 1]
        )
        worst = max(
            worst,
            (o2[u, :n] - ref_o2_u[0]).abs().max().item(),
            (pool[slots[u]] - ref_s2_u[0]).abs().max().item(),
        )
    return worst


def with_repeat_head(cfg: HyTRecConfig, seed: int = 0, head: RepeatConfig | None = None) -> HyTRec:
    """The model of `cfg` with a repeat head (None: the default one) whose score weights and
    gate are away from their initial zeros (else the head would ignore the model's scores)."""
    torch.manual_seed(seed)
    model = HyTRec(replace(cfg, repeat_head=head or RepeatConfig())).eval()
    head = model.repeat_head
    with torch.no_grad():
        head.score_scale.fill_(0.7)
        head.score_w.normal_()
        head.gate[2].bias.fill_(0.3)
    return model


def parity_report(seed: int = 0) -> dict:
    """The figures `hytrec check parity` prints, for the default config."""
    torch.manual_seed(seed)
    cfg = HyTRecConfig(num_items=5000, num_categories=200)
    model = HyTRec(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    users = [random_user(n, cfg, generator) for n in (1, 2, 17, 64, 333, 600)]
    one_at_a_time = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
    micro_batches = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
    chunked_abs, chunked_scaled = chunked_vs_reference(seed=seed)
    head_model = with_repeat_head(cfg, seed)
    revisiting = [revisiting_user(n, cfg, generator) for n in (1, 2, 17, 64, 333, 600)]
    head_one = repeat_head_stream_vs_parallel_max_abs(head_model, revisiting, 1, seed=seed)
    head_micro = repeat_head_stream_vs_parallel_max_abs(head_model, revisiting, 64, seed=seed)
    return {
        "chunked_vs_reference_max_abs": chunked_abs,
        # gradients reach |g| ~ 10-100 here; fp32 keeps ~7 digits of them
        "chunked_vs_reference_max_abs_scaled": chunked_scaled,
        "step_vs_reference_max_abs": step_vs_reference_max_abs(seed=seed),
        "stream_vs_parallel_max_abs": max(one_at_a_time, micro_batches),
        "stream_vs_parallel_one_event_at_a_time_max_abs": one_at_a_time,
        "stream_vs_parallel_micro_batches_max_abs": micro_batches,
        # log P(i) of the repeat/explore head at the candidates the engine ranks
        "repeat_head_stream_vs_parallel_max_abs": max(head_one, head_micro),
        "repeat_head_stream_vs_parallel_one_event_at_a_time_max_abs": head_one,
        "repeat_head_stream_vs_parallel_micro_batches_max_abs": head_micro,
        "state_bytes_per_user": model.state_bytes_per_user(),
        "state_bytes_by_part": model.new_state(1, "meta").bytes_by_part(),
        "state_bytes_per_user_with_repeat_head": head_model.state_bytes_per_user(),
        "history_lengths": [len(u) for u in users],
        "dtype": "float32",
        "seed": seed,
    }
