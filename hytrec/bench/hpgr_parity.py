"""HPGR's parity figures (`hytrec check parity --model hpgr`): the KV-cache stream against the
parallel form at the same N, PGSA's selection against a brute-force top-k written from its
definition, sparse attention with k >= T against dense attention, and causality.

`brute_force_selection` loops over queries and keys in Python and sorts (relevance, time)
pairs with `sorted`, from the definition in `hpgr.py`'s docstring, not with the model's
argsort, flips and scatters, so that the two agreeing means the model selects what the
definition says (ties to the newest event included).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from hytrec.bench.hstu_parity import (
    HISTORY_LENGTHS,
    future_events_move_earlier_outputs_max_abs,
    random_users,
)
from hytrec.bench.parity import UserEvents, pad_batch, stream_vs_parallel_max_abs
from hytrec.bench.reports import provenance
from hytrec.model.hpgr import HPGR, HPGRConfig

PARITY_CONFIG = HPGRConfig(num_items=5000, top_k=16, recent=4)


def randomised(cfg: HPGRConfig, seed: int) -> HPGR:
    """A model in eval mode whose position, time and session biases, output biases and
    feature embeddings are far from their near-zero initial values, so that a wrong offset,
    bucket, session distance or position shows."""
    torch.manual_seed(seed)
    model = HPGR(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.rel_pos, block.rel_time, block.o.bias, block.rel_session):
                if p is not None:
                    p.normal_(std=0.5)
        for emb in (model.behavior_emb, model.gap_emb, model.position_emb):
            if emb is not None:
                emb.weight.normal_(std=0.5)
    return model


def revisiting_users(cfg: HPGRConfig, lengths, generator: torch.Generator, distinct: int = 12):
    """`random_users` whose items come from a pool of `distinct` items: equal items are
    equally relevant, so ties (to the newest) are common."""
    users = random_users(cfg, lengths, generator)
    pool = torch.randint(1, cfg.num_items, (distinct,), generator=generator)
    for user in users:
        user.item = pool[torch.randint(0, distinct, (len(user),), generator=generator)]
    return users


def brute_force_selection(model: HPGR, user: UserEvents) -> np.ndarray:
    """bool [T, T]: Sel(t) of one user from the definition: the keys t - w < s <= t, plus the
    k keys of t - N < s <= t - w of highest cos(Ebar[i_t], Ebar[i_s]) (float64, rounded to
    float32 as the model does), ties to the larger s."""
    cfg, T = model.cfg, len(user)
    table = model.relevance_table().double().numpy()
    items = user.item.tolist()

    def cos(a: int, b: int) -> float:
        na, nb = np.linalg.norm(table[a]), np.linalg.norm(table[b])
        if na == 0 or nb == 0:
            return 0.0
        return float(
            np.float32(
                sum(x * y for x, y in zip(table[a], table[b], strict=True))
                / (max(na, 1e-12) * max(nb, 1e-12))
            )
        )

    out = np.zeros((T, T), dtype=bool)
    for t in range(T):
        window = range(max(0, t - cfg.max_len + 1), t + 1)
        if cfg.top_k is None:
            out[t, list(window)] = True
            continue
        older = []
        for s in window:
            if t - s < cfg.recent:
                out[t, s] = True
            else:
                older.append((cos(items[t], items[s]), s))
        for _, s in sorted(older, key=lambda pair: (-pair[0], -pair[1]))[: cfg.top_k]:
            out[t, s] = True
    return out


def selection_mismatches(model: HPGR, users: list[UserEvents]) -> int:
    """(query, key) pairs of real events where the model's selection and the brute force
    differ."""
    selected = model.selected_keys(pad_batch(users)).numpy()
    wrong = 0
    for b, user in enumerate(users):
        T = len(user)
        wrong += int((selected[b, :T, :T] != brute_force_selection(model, user)).sum())
    return wrong


@torch.no_grad()
def sparse_with_k_at_least_T_vs_dense_max_abs(model: HPGR, users: list[UserEvents]) -> float:
    """The same weights with top_k = the longest history and with dense attention."""
    batch = pad_batch(users)
    T = int(batch.lengths.max())
    sparse, dense = HPGR(replace(model.cfg, top_k=T)), HPGR(replace(model.cfg, top_k=None))
    for other in (sparse, dense):
        other.load_state_dict(model.state_dict())
        other.eval()
    return (sparse(batch) - dense(batch))[batch.mask].abs().max().item()


def parity_report(
    seed: int = 0,
    cfg: HPGRConfig = PARITY_CONFIG,
    lengths: tuple[int, ...] = HISTORY_LENGTHS,
) -> dict:
    """The figures at N = 200, k = 16, w = 4 over histories of 1 to 600 events (three times
    the window), with sessions at 30 minutes; the tests pass a smaller model."""
    model = randomised(cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    users = random_users(cfg, lengths, generator)
    one_at_a_time = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
    micro_batches = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
    small = randomised(replace(cfg, num_items=300, max_len=24), seed)
    tie_users = revisiting_users(small.cfg, (5, 40, 90), generator)
    return {
        "model": "hpgr",
        "fidelity": "reading",
        "stream_vs_parallel_max_abs": max(one_at_a_time, micro_batches),
        "stream_vs_parallel_one_event_at_a_time_max_abs": one_at_a_time,
        "stream_vs_parallel_micro_batches_max_abs": micro_batches,
        "selection_vs_brute_force_mismatches": selection_mismatches(small, tie_users)
        + selection_mismatches(model, users[:4]),
        "sparse_k_at_least_T_vs_dense_max_abs": sparse_with_k_at_least_T_vs_dense_max_abs(
            model, users
        ),
        "future_events_move_earlier_outputs_max_abs": future_events_move_earlier_outputs_max_abs(
            model, users, seed
        ),
        "state_bytes_per_user": model.state_bytes_per_user(),
        "state_bytes_by_part": model.new_state(1, "meta").bytes_by_part(),
        "max_len": cfg.max_len,
        "top_k": cfg.top_k,
        "recent": cfg.recent,
        "history_lengths": list(lengths),
        "selection_check": "the model above on the first four histories, and N = 24 over "
        "histories of 5, 40 and 90 events drawn from 12 items (ties common)",
        "dtype": "float32 (relevance: float64, rounded to float32)",
        "seed": seed,
        **provenance(),
    }
