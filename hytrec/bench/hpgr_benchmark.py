"""HPGR's figures (issue 16; fidelity "reading", see `model/hpgr.py` and `model/pretrain.py`).

- `hytrec pretrain mim --dataset taobao`: session-based masked item modelling; saves the
  encoder (what `hytrec train --init-from` reads) and writes
  `benchmarks/results/pretrain-mim-<set>.{json,png}`: sessions, masked-item HR@10 on
  validation beside popularity's, loss per epoch, leaked targets (0).
- `hytrec benchmark hpgr-pretrain-curve`: the masked-item HR@10 by epoch with and without
  the Session Enhancement Module, same seed, same masks' distribution.
- `hytrec benchmark hpgr-sparsity`: one pre-training, then HPGR fine-tuned from it with
  PGSA at each k (and dense attention, "all"), the same epochs for every k, once per seed;
  per k the test NDCG@10 (with its paired interval against dense) and the attention
  FLOPs fraction: the (query, key) pairs attended over those dense attention attends, counted
  over the test users' whole histories (the relevance scan, O(N d) per event, is listed
  apart; this CPU implementation masks a dense product, so the fraction is what a sparse
  kernel would compute, not a time measured here).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from hytrec.bench.reports import machine_info, provenance, write_report
from hytrec.model.evaluate import (
    leave_one_out,
    ndcg_per_user,
    paired_bootstrap,
    rank_targets,
)
from hytrec.model.events import EventLog
from hytrec.model.hpgr import HPGR, HPGRConfig
from hytrec.model.pretrain import MIMConfig, pretrain, save, summary
from hytrec.model.registry import load_model
from hytrec.model.train import TrainConfig, train

RESULTS = Path("benchmarks/results")
RESAMPLES = 2000


def header(benchmark: str, dataset: str, log: EventLog) -> dict:
    """What every HPGR report starts with: what ran, on what, from which commit."""
    return {
        "benchmark": benchmark,
        "fidelity": "reading",
        "dataset": dataset,
        "events": len(log),
        "items": len(log.items) - 1,
        "command": " ".join(shlex.quote(a) for a in ["hytrec", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": {
            **machine_info(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- pre-training


def run_pretrain(
    dataset: str,
    log: EventLog,
    cfg: MIMConfig,
    checkpoint: Path,
    output: Path,
    progress: bool = True,
) -> dict:
    split = leave_one_out(log)
    result = pretrain(cfg, log, split, progress)
    save(result, cfg, checkpoint, dataset)
    report = {
        **header("pretrain-mim", dataset, log),
        "users": int(len(split.start)),
        "checkpoint": str(checkpoint),
        **summary(result, cfg),
    }
    write_report(report, output, _plot_pretrain)
    return report


def _plot_pretrain(report: dict, path: Path) -> None:
    plt = _plt()
    epochs = [h["epoch"] for h in report["history"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, report["loss_by_epoch"], marker="o")
    loss = "full softmax" if not report["config"]["negatives"] else "sampled softmax"
    left.set(xlabel="epoch", ylabel=f"MIM loss ({loss})", title="training loss")
    right.plot(epochs, [h["valid_HR@10"] for h in report["history"]], marker="o", label="HPGR MIM")
    right.axhline(report["popularity_HR@10"], color="gray", ls="--", label="popularity")
    right.set(xlabel="epoch", ylabel="HR@10", title="masked validation item")
    right.legend()
    fig.suptitle(f"session-based MIM on {report['dataset']} ({report['git_commit'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pretrain_curve(
    dataset: str, log: EventLog, cfg: MIMConfig, output: Path, progress: bool = True
) -> dict:
    """The same pre-training with and without the Session Enhancement Module."""
    split = leave_one_out(log)
    runs = {}
    for name, sem in (("with SEM", True), ("without SEM", False)):
        run_cfg = replace(cfg, model=replace(cfg.model, session_module=sem))
        runs[name] = summary(pretrain(run_cfg, log, split, progress), run_cfg)
    report = {
        **header("hpgr-pretrain-curve", dataset, log),
        "popularity_HR@10": runs["with SEM"]["popularity_HR@10"],
        "sessions": runs["with SEM"]["sessions"],
        "runs": {
            name: {
                k: run[k]
                for k in (
                    "history",
                    "masked_item_HR@10",
                    "best_epoch",
                    "leaked_targets",
                    "seconds",
                    "config",
                )
            }
            for name, run in runs.items()
        },
    }
    write_report(report, output, _plot_curve)
    return report


def _plot_curve(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in report["runs"].items():
        ax.plot(
            [h["epoch"] for h in run["history"]],
            [h["valid_HR@10"] for h in run["history"]],
            marker="o",
            label=name,
        )
    ax.axhline(report["popularity_HR@10"], color="gray", ls="--", label="popularity")
    ax.set(xlabel="epoch", ylabel="masked-item HR@10 (validation)")
    ax.set_title(f"MIM pre-training on {report['dataset']} ({report['git_commit'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- sparsity


@dataclass(frozen=True)
class SparsityConfig:
    """Sized to run in about half an hour per seed on two shared CPU cores (Taobao)."""

    dataset: str = "taobao"
    ks: tuple[int, ...] = (4, 8, 16, 32, 64, 0)  # 0 = all: dense attention
    recent: int = 8  # w
    pretrain_epochs: int = 4
    epochs: int = 4  # fine-tuning epochs per k, the same for every k
    max_len: int = 200
    batch_size: int = 32
    negatives: int = 1024  # fine-tuning's sampled softmax (the pre-training's is full)
    # a cap per k, off by default: a cap that stops one k an epoch early on a loaded machine
    # compares an undertrained model with the rest (a row it cut says so)
    time_budget_s: float | None = None
    # fine-tuning seeds, each k trained once per seed from the same pre-training (the first
    # seed's); the intervals are over users and seeds
    seeds: tuple[int, ...] = (0,)
    # a `hytrec pretrain mim` checkpoint to fine-tune from instead of pre-training here
    init_from: str | None = None

    def __post_init__(self) -> None:
        if 0 not in self.ks:
            raise ValueError(f"ks {self.ks} need 0 (dense attention): every k is compared to it")
        if not self.seeds:
            raise ValueError("seeds: at least one")


@torch.no_grad()
def attended_pairs(model: HPGR, log: EventLog, starts, stops, batch_size: int = 64):
    """(pairs attended, pairs of the dense window) over every real query of these histories."""
    from hytrec.model.evaluate import history_batch

    dense = HPGR(replace(model.cfg, top_k=None))
    selected = window = 0
    for b in range(0, len(starts), batch_size):
        batch = history_batch(log, starts[b : b + batch_size], stops[b : b + batch_size])
        real = batch.mask[:, :, None]
        selected += int((model.selected_keys(batch) & real).sum())
        window += int((dense.selected_keys(batch) & real).sum())
    return selected, window


def run_sparsity(cfg: SparsityConfig, log: EventLog, output: Path, progress: bool = True) -> dict:
    split = leave_one_out(log)
    began = time.perf_counter()
    mim = replace(
        MIMConfig(),
        epochs=cfg.pretrain_epochs,
        max_len=cfg.max_len,
        batch_size=cfg.batch_size,
        seed=cfg.seeds[0],
    )  # the full softmax, whatever the fine-tuning's negatives (`pretrain.py` says why)
    if cfg.init_from is None:
        pretrained = pretrain(mim, log, split, progress)
        pretrain_summary = {k: v for k, v in summary(pretrained, mim).items() if k != "config"}
    else:
        pretrained = None
        pretrain_summary = load_model(cfg.init_from).checkpoint_extra.get("pretrain", {})
    tc = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        negatives=cfg.negatives,
        patience=cfg.epochs,  # no early stop: every k trains the same number of epochs
        valid_users=None,
        time_budget_s=cfg.time_budget_s,
    )
    starts, targets = split.targets("test")
    fits = {}  # k -> per seed: (the ranked test targets, the train result)
    pairs = {}  # k -> (pairs attended, pairs of the dense window)
    with tempfile.TemporaryDirectory() as tmp:
        init_from = cfg.init_from or str(save(pretrained, mim, Path(tmp) / "pretrained"))
        for k in cfg.ks:
            model_cfg = HPGRConfig(
                max_len=cfg.max_len, top_k=k or None, recent=cfg.recent, selection="pretrained"
            )
            fits[k] = []
            for seed in cfg.seeds:
                run_tc = replace(tc, init_from=init_from, seed=seed)
                result = train(model_cfg, log, split, run_tc, progress=progress)
                fits[k].append((rank_targets(result.model, log, split, "test"), result))
            # the selection reads the frozen pre-trained space: the same for every seed
            pairs[k] = attended_pairs(fits[k][0][1].model, log, starts, targets)
            ndcg = np.mean([ndcg_per_user(ranked["rank"], 10).mean() for ranked, _ in fits[k]])
            print(
                f"k={k or 'all'}: NDCG@10 {ndcg:.4f} (mean over {len(cfg.seeds)} seeds), "
                f"attention FLOPs fraction {pairs[k][0] / pairs[k][1]:.3f}",
                flush=True,
            )
    rows = [_sparsity_row(k, fits[k], *pairs[k], fits[0], cfg) for k in cfg.ks]
    report = {
        **header("hpgr-sparsity", cfg.dataset, log),
        "config": asdict(cfg),
        "pretrain": {k: v for k, v in pretrain_summary.items() if k != "config"},
        "train_config": asdict(tc),
        "protocol": "leave-one-out, full ranking over all items, whole histories, unfiltered",
        "statistics": f"means over seeds {list(cfg.seeds)} and test users; vs dense: paired "
        f"95% percentile bootstrap ({RESAMPLES} resamples) over users and seeds, the same "
        "users on both sides",
        "flops_note": "attention FLOPs fraction = (query, key) pairs PGSA attends over the "
        "pairs dense attention attends (window N), over the test users' whole histories; "
        "the relevance scan costs O(N d) per event on top (float64 dot products)",
        "rows": rows,
        "seconds": round(time.perf_counter() - began, 1),
    }
    write_report(report, output, _plot_sparsity)
    return report


def _sparsity_row(k: int, seeded, selected: int, window: int, dense_seeded, cfg) -> dict:
    """One k's figures over its seeds, with its paired difference to dense attention."""
    ranks = np.stack([r["rank"] for r, _ in seeded])  # [S, U]
    ndcg = np.stack([ndcg_per_user(r, 10) for r in ranks])  # [S, U]
    dense = np.stack([ndcg_per_user(r["rank"], 10) for r, _ in dense_seeded])
    vs_dense = paired_bootstrap(ndcg, dense, RESAMPLES)
    results = [result for _, result in seeded]
    return {
        "k": "all" if not k else k,
        "NDCG@10": float(ndcg.mean()),
        "NDCG@10_ci95": paired_bootstrap(ndcg, resamples=RESAMPLES)["ci"],
        "NDCG@10_per_seed": ndcg.mean(axis=1).tolist(),
        "HR@10": float((ranks < 10).mean()),
        "MRR": float((1.0 / (ranks + 1)).mean()),
        "NDCG@10_vs_dense": vs_dense["ratio"],
        "NDCG@10_vs_dense_ci95": vs_dense["ratio_ci"],
        "NDCG@10_minus_dense_ci95": vs_dense["diff_ci"],
        "attention_flops_fraction": selected / window,
        "pairs_attended": selected,
        "pairs_dense": window,
        "best_epoch": [r.best_epoch for r in results],
        "epochs_run": [len(r.history) for r in results],
        "cut_by_time_budget": any(len(r.history) < cfg.epochs for r in results),
        "train_seconds": [round(r.train_seconds, 1) for r in results],
    }


def _plot_sparsity(report: dict, path: Path) -> None:
    plt = _plt()
    rows = report["rows"]
    labels = [str(r["k"]) for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    ndcg = np.array([r["NDCG@10"] for r in rows])
    ci = np.array([r["NDCG@10_ci95"] for r in rows])  # [K, 2]
    left.errorbar(labels, ndcg, yerr=[ndcg - ci[:, 0], ci[:, 1] - ndcg], marker="o", capsize=3)
    left.set(xlabel="k (relevant events kept per query; all = dense)", ylabel="test NDCG@10")
    right = left.twinx()
    right.plot(labels, [r["attention_flops_fraction"] for r in rows], marker="s", color="C1")
    right.set_ylabel("attention FLOPs fraction", color="C1")
    right.set_ylim(0, 1.05)
    left.set_title(
        f"HPGR sparsity on {report['dataset']} (w={report['config']['recent']}, "
        f"{report['git_commit'][:10]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
