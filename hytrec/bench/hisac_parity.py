"""HiSAC's parity figures (`hytrec check parity --model hisac`): the serving map of nodes
(log-sum-exp accumulators, one event at a time and in micro-batches) against the training
form, for HiSAC and HiSAC-mi, under the cap; routing weights summing to 1; the share of
users hitting the cap at the parity cap and at a small one. Fidelity: "reading"."""

from __future__ import annotations

import numpy as np
import torch

from hytrec.bench.parity import (
    UserEvents,
    pad_batch,
    revisiting_user,
    share_hitting_cap,
    stream_vs_parallel_max_abs,
)
from hytrec.bench.reports import provenance
from hytrec.index.semantic_ids import SemanticIdConfig, build_semantic_ids
from hytrec.model.codebook import SemanticIds
from hytrec.model.hisac import HiSAC, HiSACConfig, HiSACMulti, HiSACMultiConfig
from hytrec.model.hytrec import HyTRecConfig

NUM_ITEMS = 2000
HISTORY_LENGTHS = (1, 2, 17, 64, 150)


def codebook_for(
    num_items: int, sizes=(16, 8, 8), route_top: int = 4, seed: int = 0, d: int = 16
) -> SemanticIds:
    """Semantic IDs over a clustered random table (20 clusters): the builder's real output,
    without a trained checkpoint."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, num_items - 1)] + 0.5 * rng.standard_normal((num_items - 1, d))
    config = SemanticIdConfig(sizes=sizes, route_top=route_top, niter=10, seed=seed)
    return build_semantic_ids(x.astype(np.float32), np.arange(1, num_items), config)


def randomised(model: HiSAC, seed: int = 0) -> HiSAC:
    """In eval mode, with embeddings and biases far from their near-zero initial values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for emb in (model.item_emb, model.behavior_emb):
            emb.weight.normal_(std=0.5)
        model.agent_proj.bias.normal_(std=0.5)
    return model.eval()


def users_for(model: HiSAC, lengths, seed: int = 0, distinct: int = 60) -> list[UserEvents]:
    """Users revisiting a pool of `distinct` items, so that nodes collect votes."""
    generator = torch.Generator().manual_seed(seed)
    shape = HyTRecConfig(num_items=model.cfg.num_items, num_categories=3)
    return [revisiting_user(n, shape, generator, distinct) for n in lengths]


@torch.no_grad()
def routing_sum_max_abs(model: HiSAC, users: list[UserEvents]) -> float:
    """max |sum_i alpha_{p,i} - 1| over every agent after every event."""
    route = model.routing(pad_batch(users))
    present = route.agents >= 0
    return (route.alpha.sum(-1)[present] - 1).abs().max().item()


def parity_report(seed: int = 0, num_items: int = NUM_ITEMS, lengths=HISTORY_LENGTHS) -> dict:
    codebook = codebook_for(num_items, seed=seed)
    out: dict = {"model": "hisac", "fidelity": "reading"}
    worst = 0.0
    for name, cls, cfg_cls in (("hisac", HiSAC, HiSACConfig), ("hisac_mi", HiSACMulti,
                                HiSACMultiConfig)):  # fmt: skip
        model = randomised(cls(cfg_cls(num_items=num_items), codebook=codebook), seed)
        users = users_for(model, lengths, seed)
        one = stream_vs_parallel_max_abs(model, users, max_batch=1, seed=seed)
        micro = stream_vs_parallel_max_abs(model, users, max_batch=64, seed=seed)
        worst = max(worst, one, micro)
        small = randomised(cls(cfg_cls(num_items=num_items, node_cap=64), codebook=codebook))
        out[name] = {
            "stream_vs_parallel_one_event_at_a_time_max_abs": one,
            "stream_vs_parallel_micro_batches_max_abs": micro,
            "routing_weights_sum_max_abs_error": routing_sum_max_abs(model, users),
            "share_of_users_hitting_the_cap": share_hitting_cap(model, users),
            "share_of_users_hitting_a_cap_of_64": share_hitting_cap(small, users),
            "state_bytes_per_user": model.state_bytes_per_user(),
            "config": {
                "node_cap": model.cfg.node_cap,
                "beams": list(model.cfg.beams),
                "route_top": model.cfg.route_top,
                "temperature": model.cfg.temperature,
                "levels": model.cfg.levels,
                "num_nodes": model.cfg.num_nodes,
            },
        }
    out["stream_vs_parallel_max_abs"] = worst
    out["routing_weights_sum_max_abs_error"] = max(
        out[n]["routing_weights_sum_max_abs_error"] for n in ("hisac", "hisac_mi")
    )
    out |= {
        "codebook": codebook.meta["report"] | {"config": codebook.meta["config"]},
        "history_lengths": list(lengths),
        "dtype": "float32",
        "seed": seed,
        **provenance(),
    }
    return out
