"""HiSAC's figures: the semantic-IDs build report (`hytrec build-semantic-ids`) and hard vs
soft routing (`hytrec benchmark hisac-routing`). Fidelity: "reading" (`model/hisac.py`)."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hytrec.bench.reports import machine_info, provenance, write_report
from hytrec.index.semantic_ids import SemanticIdConfig, build_from_checkpoint
from hytrec.model.codebook import SemanticIds
from hytrec.model.evaluate import history_batch, leave_one_out
from hytrec.model.events import EventLog
from hytrec.model.hisac import HiSAC, HiSACConfig, activate


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def semantic_ids_report(
    checkpoint: str, out: str | Path, config: SemanticIdConfig, check_repeat: bool = True
) -> dict:
    """Build semantic IDs over `checkpoint`'s item table into `out`; with `check_repeat`
    build them a second time (same seed) and compare every file byte by byte."""
    began = time.perf_counter()
    sids = build_from_checkpoint(checkpoint, config)
    build_s = time.perf_counter() - began
    sids.save(out)
    report = {
        "benchmark": "semantic-ids",
        "fidelity": "reading",
        "method": "RQ-KMeans (faiss k-means on residuals, level by level), a dedup level, "
        "top-r routes per item and level (own node first); the semantic space is the "
        "checkpoint's frozen item table, L2-normalised (a substitution: the shared sets "
        "have no content features)",
        **{k: v for k, v in sids.meta.items() if k != "report"},
        **sids.meta["report"],
        "build_s": round(build_s, 2),
        "saved": str(out),
    }
    if check_repeat:
        with tempfile.TemporaryDirectory(prefix="hytrec-sids-") as second:
            build_from_checkpoint(checkpoint, config).save(second)
            report["second_build_byte_identical"] = _same_bytes(Path(out), Path(second))
    report |= {
        "command": " ".join(shlex.quote(a) for a in ["hytrec", *sys.argv[1:]]),
        **provenance(),
        "machine": machine_info(),
    }
    return report


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class RoutingConfig:
    dataset: str = "taobao"
    semantic_ids: str = ""  # a `hytrec build-semantic-ids` directory built on this dataset
    temperatures: tuple[float, ...] = (0.05, 0.1, 0.2)  # soft routing's tau
    beams: tuple[int, ...] = (8, 2, 2)
    min_votes: int = 2
    weight_threshold: float = 0.1  # a behaviour counts as retained above this weight
    node_cap: int = HiSACConfig.node_cap  # the serving map whose overflow is counted
    max_users: int | None = None  # None: every test user


def _agents(sids: SemanticIds, items: np.ndarray, cfg: RoutingConfig, tree) -> np.ndarray:
    """The agent nodes activated by one user's behaviours (items, vocabulary indices)."""
    node, votes = np.unique(sids.item_nodes[items - 1].reshape(-1), return_counts=True)
    node_t, votes_t = torch.from_numpy(node)[None], torch.from_numpy(votes)[None]
    mask = activate(node_t, votes_t, votes_t > 0, *tree, cfg.beams, cfg.min_votes)
    return node[mask[0].numpy()]


def _weights(sids, items, agents, tau: float | None) -> np.ndarray:
    """beta [n, A]: each behaviour's weight on each agent. tau None (hard): 1 on the agent
    that is the behaviour's own node at its level (at most one: agents are a tree cut).
    Soft: softmax over the agents among its routes of <mu(p), s_i> / tau."""
    if tau is None:
        return (sids.item_nodes[items - 1][:, :, None] == agents).any(1).astype(np.float64)
    routes = sids.routes[items - 1]  # [n, L, r]
    hit = routes[..., None] == agents  # [n, L, r, A]
    logits = sids.route_logits[items - 1].astype(np.float64)[..., None] / tau
    logit = np.where(hit, logits, -np.inf).max((1, 2))
    reached = np.isfinite(logit)
    top = np.where(reached, logit, -np.inf).max(1, keepdims=True)
    w = np.where(reached, np.exp(logit - np.where(np.isfinite(top), top, 0.0)), 0.0)
    return w / np.maximum(w.sum(1, keepdims=True), 1e-300)


def routing_report(log: EventLog, sids: SemanticIds, cfg: RoutingConfig) -> dict:
    """Quantisation error E|s_i - sum_p beta_{i,p} mu(p)|^2 and the share of behaviours
    with weight >= threshold on some activated agent, hard vs soft routing, over every
    behaviour of each test user's history (events before the test target), and over the
    long tail (items in the bottom half of popularity)."""
    sids.require_items(log.items, f"{cfg.semantic_ids}: ")
    split = leave_one_out(log)
    starts, targets = split.targets("test")
    if cfg.max_users is not None:
        starts, targets = starts[: cfg.max_users], targets[: cfg.max_users]
    counts = np.bincount(log.item, minlength=len(log.items))
    seen = counts[1:][counts[1:] > 0]
    tail_max = int(np.median(seen))  # bottom half of the items by popularity
    tree = (torch.from_numpy(sids.node_level), torch.from_numpy(sids.node_parent))
    methods = {"hard": None, **{f"soft tau={t}": t for t in cfg.temperatures}}
    sums = {m: {"error": 0.0, "kept": 0, "tail_error": 0.0, "tail_kept": 0} for m in methods}
    behaviours = tail = agents_total = 0
    for start, target in tqdm(list(zip(starts, targets, strict=True)), desc="users",
                              mininterval=2.0):  # fmt: skip
        items = log.item[start:target]
        agents = _agents(sids, items, cfg, tree)
        centres = sids.centres[agents]  # [A, d]
        s = sids.vectors[items - 1]
        long_tail = counts[items] <= tail_max
        behaviours, tail, agents_total = (
            behaviours + len(items),
            tail + int(long_tail.sum()),
            agents_total + len(agents),
        )
        for name, tau in methods.items():
            beta = _weights(sids, items, agents, tau)  # [n, A]
            error = np.sum((s - beta @ centres) ** 2, axis=1)
            kept = (beta >= cfg.weight_threshold).any(1)
            acc = sums[name]
            acc["error"] += float(error.sum())
            acc["kept"] += int(kept.sum())
            acc["tail_error"] += float(error[long_tail].sum())
            acc["tail_kept"] += int(kept[long_tail].sum())
    rows = [
        {
            "routing": name,
            "mean_quantization_error": acc["error"] / behaviours,
            "retained": acc["kept"] / behaviours,
            "long_tail_mean_quantization_error": acc["tail_error"] / max(tail, 1),
            "long_tail_retained": acc["tail_kept"] / max(tail, 1),
        }
        for name, acc in sums.items()
    ]
    return {
        "users": len(starts),
        "behaviours": behaviours,
        "long_tail_behaviours": tail,
        "long_tail_definition": f"items with at most {tail_max} events in the log (the "
        "median count over items with any): the bottom half by popularity",
        "agents_per_user_mean": agents_total / max(len(starts), 1),
        "rows": rows,
        "share_of_users_hitting_the_cap": share_hitting_cap(log, sids, cfg, starts, targets),
    }


@torch.no_grad()
def share_hitting_cap(log, sids, cfg: RoutingConfig, starts, targets) -> float:
    """Share of the users whose serving map (node_cap nodes) evicted a node."""
    model = HiSAC(
        HiSACConfig(num_items=len(log.items), d_model=8, node_cap=cfg.node_cap, beams=cfg.beams),
        codebook=sids,
    ).eval()
    hit = 0
    for lo in range(0, len(starts), 128):
        batch = history_batch(log, starts[lo : lo + 128], targets[lo : lo + 128])
        state = model.new_state(len(batch.lengths))
        model.apply_events(state, torch.arange(len(batch.lengths)), batch)
        hit += int((state.evictions > 0).sum())
    return hit / max(len(starts), 1)


def run_routing(cfg: RoutingConfig, log: EventLog, output: str | Path) -> dict:
    sids = SemanticIds.load(cfg.semantic_ids)
    began = time.perf_counter()
    measured = routing_report(log, sids, cfg)
    report = {
        "benchmark": "hisac-routing",
        "fidelity": "reading",
        "dataset": cfg.dataset,
        "config": asdict(cfg),
        "codebook": {k: v for k, v in sids.meta.items() if k != "report"}
        | {"nodes_per_level": sids.meta["report"]["nodes_per_level"]},
        "definitions": {
            "mean_quantization_error": "E over behaviours of |s_i - sum_p beta_{i,p} mu(p)|^2 "
            "(s unit vectors, mu the activated agents' centres; beta 0 everywhere: the "
            "behaviour is lost, error |s_i|^2 = 1)",
            "hard": "beta = 1 on the agent that is the behaviour's own node at its level",
            "soft": "beta = softmax over the activated agents among the behaviour's routes "
            "(r per level) of <mu(p), s_i> / tau",
            "retained": f"share of behaviours with beta >= {cfg.weight_threshold} on some "
            "activated agent",
        },
        **measured,
        "seconds": round(time.perf_counter() - began, 1),
        "command": " ".join(shlex.quote(a) for a in ["hytrec", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": machine_info(),
    }
    write_report(report, output, plot_routing)
    return report


def plot_routing(report: dict, path: Path) -> None:
    """Quantisation error and retained share, all behaviours and the long tail, per routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["routing"] for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (left, "mean_quantization_error", "mean quantisation error"),
        (right, "retained", "behaviours retained (weight >= threshold)"),
    ):
        ax.bar(x - 0.2, [r[key] for r in rows], 0.4, label="all behaviours")
        ax.bar(x + 0.2, [r[f"long_tail_{key}"] for r in rows], 0.4, label="long tail")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"HiSAC routing on {report['dataset']}: hard vs soft ({report['users']} users, "
        f"{report['behaviours']} behaviours, fidelity: reading)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
