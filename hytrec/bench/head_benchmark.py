"""What the repeat head costs: training steps and ranking, with and without it, side by side.

`hytrec benchmark head-cost --dataset taobao` builds SASRec and HyTRec 3:1 as the accuracy
preset configures them, each with and without the head (`repeat.py`), and times, in
alternation so that a busy machine slows all four alike:

- a training step: zero_grad, the loss (`train.batch_loss`), backward and AdamW over the same
  fixed batches of the preset's training windows (the head builds every position's buffer);
- ranking one batch of test users over all items (the head builds each user's buffer from
  the whole history and mixes log P(i)).

Medians over `repeats`; writes STEM.json and STEM.png.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hytrec.bench.accuracy import HEAD, PRESETS, model_zoo
from hytrec.bench.reports import machine_info, write_report
from hytrec.bench.timing import report_header
from hytrec.model.evaluate import context_length, history_batch, leave_one_out, ranking_scores
from hytrec.model.events import EventLog
from hytrec.model.train import batch_loss, build_model, param_groups, training_rows


@dataclass(frozen=True)
class HeadCostConfig:
    dataset: str = "taobao"
    batches: int = 3  # training batches per timed step
    rank_users: int = 256  # test users ranked per timed call
    repeats: int = 5
    d_model: int = 64
    seed: int = 0


def run_head_cost(cfg: HeadCostConfig, log: EventLog, output: str) -> dict:
    tc = PRESETS[cfg.dataset].train
    split = leave_one_out(log)
    rng = np.random.default_rng(cfg.seed)
    zoo = model_zoo(cfg.d_model, tc.max_len)
    starts, stops = training_rows(split, tc.max_len)
    picks = [
        rng.choice(len(starts), min(tc.batch_size, len(starts)), replace=False)
        for _ in range(cfg.batches)
    ]
    test_start, test_target = split.targets("test")
    users = rng.choice(len(test_start), min(cfg.rank_users, len(test_start)), replace=False)
    models = {}
    for base in ("SASRec", "HyTRec 3:1"):
        for name in (base, base + HEAD):
            torch.manual_seed(cfg.seed)
            model = build_model(zoo[name], log)
            optimizer = torch.optim.AdamW(
                param_groups(model, tc.weight_decay, tc.lr, tc.head_lr_scale), lr=tc.lr
            )
            models[name] = (model, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)

    def train_step(name: str) -> float:
        model, optimizer = models[name]
        model.train()
        began = time.perf_counter()
        for rows in picks:
            batch = history_batch(log, starts[rows], stops[rows])
            optimizer.zero_grad(set_to_none=True)
            loss, _ = batch_loss(model, batch, tc.negatives, generator)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - began

    @torch.no_grad()
    def rank(name: str) -> float:
        model, _ = models[name]
        model.eval()
        began = time.perf_counter()
        context = context_length(model, None)
        batch = history_batch(log, test_start[users], test_target[users], context)
        ranking_scores(model, batch)
        return time.perf_counter() - began

    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "rank": []} for n in models}
    for repeat in range(cfg.repeats + 1):  # the first round warms up, untimed
        for name in models:
            step, ranked = train_step(name), rank(name)
            if repeat:
                times[name]["train"].append(step)
                times[name]["rank"].append(ranked)
    rows = {
        name: {
            "train_step_s": statistics.median(t["train"]),
            "rank_s": statistics.median(t["rank"]),
            "train_step_all_s": t["train"],
            "rank_all_s": t["rank"],
        }
        for name, t in times.items()
    }
    for base in ("SASRec", "HyTRec 3:1"):
        head, plain = rows[base + HEAD], rows[base]
        head["train_step_ratio"] = head["train_step_s"] / plain["train_step_s"]
        head["rank_ratio"] = head["rank_s"] / plain["rank_s"]
    report = {
        **report_header("head-cost", cfg, output, torch.device("cpu")),
        "config": asdict(cfg),
        "train_config": asdict(tc),
        "positions_per_step": int(sum((stops[r] - starts[r] - 1).sum() for r in picks)),
        "machine": machine_info(),
        "models": rows,
    }
    write_report(report, output, _plot)
    for name, row in rows.items():
        ratio = (
            f" (x{row['train_step_ratio']:.2f}, ranking x{row['rank_ratio']:.2f})"
            if HEAD in name
            else ""
        )
        print(f"{name}: train step {row['train_step_s']:.2f} s, rank {row['rank_s']:.3f} s{ratio}")
    return report


def _plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(
        axes, ("train_step_s", "rank_s"), ("training step (s)", "ranking a batch (s)"), strict=True
    ):
        ax.bar(names, [report["models"][n][key] for n in names], color=["C0", "C1"] * 2)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=25)
    fig.suptitle(f"repeat head cost on {report['config']['dataset']} (medians, {report['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
