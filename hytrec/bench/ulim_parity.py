"""ULIM's parity figures (`hytrec check parity --model ulim`): the serving slots (one event
at a time and in micro-batches, users interleaved) against the training form, on P(c) over
every category and on u^c of each event's category, after every event; P(c) summing to 1
(with and without the pointer); the share of users hitting the slot cap at the parity cap
and at a small one. Fidelity: "reading"."""

from __future__ import annotations

from dataclasses import replace

import torch

from hytrec.bench import parity
from hytrec.bench.parity import UserEvents, pad_batch, random_user, share_hitting_cap
from hytrec.bench.reports import provenance
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.ulim import ULIM, ULIMConfig

NUM_ITEMS, NUM_CATEGORIES = 2000, 40
HISTORY_LENGTHS = (1, 2, 17, 64, 150)
CONFIG = ULIMConfig(num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, dropout=0.0)


def randomised(cfg: ULIMConfig, seed: int = 0) -> ULIM:
    """In eval mode, items spread over the categories at random, embeddings, the category
    bias, W_u and W_x far from their near-zero initial values."""
    torch.manual_seed(seed)
    model = ULIM(cfg)
    with torch.no_grad():
        model.item_category.copy_(torch.randint(1, cfg.num_categories, (cfg.num_items,)))
        for emb in (model.item_emb, model.category_emb, model.behavior_emb):
            emb.weight.normal_(std=0.5)
        model.category_bias.normal_(std=0.5)
        for term in (model.user_to_interest, model.cross_to_interest):
            if term is not None:  # W_u and W_x start at 0: test them non-zero
                term.weight.normal_(std=0.2)
    return model.eval()


def users_for(model: ULIM, lengths, seed: int = 0) -> list[UserEvents]:
    """Random users whose events carry their items' categories (as the data does)."""
    generator = torch.Generator().manual_seed(seed)
    shape = HyTRecConfig(num_items=model.cfg.num_items, num_categories=model.cfg.num_categories)
    users = [random_user(n, shape, generator) for n in lengths]
    for user in users:
        user.category = model.item_category[user.item]
    return users


@torch.no_grad()
def parallel_readouts(model: ULIM, users: list[UserEvents]) -> list[torch.Tensor]:
    """The training form after every event of each user: [P(c) ; v^{c_t}], v^c = u^c +
    W_u s + W_x a^c, [T_u, C + d]."""
    batch = pad_batch(users)
    out = model.forward_all(batch)
    interest = out["interest"] + model.interest_terms(batch, out, batch.category)
    both = torch.cat([out["log_p"].exp(), interest], -1)
    return [both[i, : len(user)] for i, user in enumerate(users)]


@torch.no_grad()
def served_readout(model: ULIM, state, slots: torch.Tensor, vectors: torch.Tensor):
    """The serving form after a step: [P(c) ; u^c of the newest event's category]."""
    read = model.read_state(state, slots)
    interest = model.category_interests(read, state.last_category[slots][:, None])[:, 0]
    return torch.cat([read.log_p.exp(), interest], -1)


def stream_vs_parallel_max_abs(
    model: ULIM, users: list[UserEvents], max_batch: int, seed: int = 0
) -> float:
    """Max |served - training form| of P(c) and u^c after every run of every user."""
    return parity.stream_vs_parallel_max_abs(
        model,
        users,
        max_batch,
        seed,
        parallel=parallel_readouts(model, users),
        readout=lambda state, slots, vectors: served_readout(model, state, slots, vectors),
    )


@torch.no_grad()
def p_of_c_sum_max_abs_error(model: ULIM, users: list[UserEvents]) -> float:
    """max |sum_c P(c) - 1| after every event of every user (training form)."""
    p = model.forward_all(pad_batch(users))["log_p"].exp().sum(-1)  # [B, T]
    real = pad_batch(users).mask
    return (p[real] - 1).abs().max().item()


def parity_report(seed: int = 0, cfg: ULIMConfig = CONFIG, lengths=HISTORY_LENGTHS) -> dict:
    out: dict = {"model": "ulim", "fidelity": "reading"}
    worst, sums = 0.0, 0.0
    variants = (
        ("ulim", cfg),
        ("ulim_without_pointer", replace(cfg, pointer=False)),
        ("ulim_user_term_cross_interest", replace(cfg, user_term=True, cross_interest=True)),
    )
    for name, variant in variants:
        model = randomised(variant, seed)
        users = users_for(model, lengths, seed)
        one = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
        micro = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
        p_sum = p_of_c_sum_max_abs_error(model, users)
        worst, sums = max(worst, one, micro), max(sums, p_sum)
        small = randomised(replace(variant, slots=8), seed)
        out[name] = {
            "stream_vs_parallel_one_event_at_a_time_max_abs": one,
            "stream_vs_parallel_micro_batches_max_abs": micro,
            "p_of_c_sum_max_abs_error": p_sum,
            "share_of_users_hitting_the_cap": share_hitting_cap(model, users),
            "share_of_users_hitting_a_cap_of_8": share_hitting_cap(
                small, users_for(small, lengths, seed)
            ),
        }
    out |= {
        "stream_vs_parallel_max_abs": worst,
        "p_of_c_sum_max_abs_error": sums,
        "compared": "P(c) over every category and the interest of the newest event's "
        "category (with the variant's user and cross terms), after every run of events",
        "config": {
            "num_items": cfg.num_items,
            "num_categories": cfg.num_categories,
            "d_model": cfg.d_model,
            "slots": cfg.slots,
            "slot_len": cfg.slot_len,
            "short_len": cfg.short_len,
            "window": cfg.window,
        },
        "history_lengths": list(lengths),
        "dtype": "float32",
        "seed": seed,
        **provenance(),
    }
    return out
