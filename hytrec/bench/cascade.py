"""`hytrec benchmark cascade`: ULIM's category-to-item cascade, item HR@50 and the share of
the catalogue searched against the number K of categories searched, plus the oracle
category (the item stage's ceiling), and next-category HR@K / MRR beside the two category
baselines (repeat the last category; the user's K most frequent categories).

One ULIM trains on the dataset's leave-one-out split within a small budget (the figure is
about the cascade's trade-off, not about ULIM's best accuracy); every test user is then
read once (the serving slots, built by streaming the history) and ranked under every K:
score(x) = log P(cat(x)) P(x | cat(x)) inside the top K categories of P, -inf elsewhere
(`ULIM.cascade_scores` under the model's merge). Fidelity: "reading" (see `model/ulim.py`).

With `preset` the ULIM trains and ranks as `hytrec benchmark accuracy` does on the dataset
(its preset's training and protocol, `bench/accuracy.py`), so the row of the model's own K
(10) is the accuracy file's ULIM row at the same seed and epochs, and the other rows say
what the gate, and the category stage, cost there.

With `versus` (a model of the accuracy zoo that ranks every item by one score, e.g.
SASRec) that model trains under the same config and seed, and the two models' stages are
swapped: its scores read as a distribution over the items, P_V(x) = softmax(score)(x),
factor as P_V(c) P_V(x | c) with P_V(c) the sum of P_V over c's items, and every test user
is also ranked (no gate, history removed as above) by

    log P_ULIM(c) + log P_V(x | c)    and    log P_V(c) + log P_ULIM(x | c),

beside the model's own ranking, its ranking inside the oracle category and its implied
next-category metrics (P_V(c)): whichever swap recovers the model's figure says which of
ULIM's two stages loses to it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hytrec.bench.accuracy import PRESETS, model_zoo
from hytrec.bench.reports import command_line, machine_info, provenance, write_report
from hytrec.model.evaluate import (
    EvalConfig,
    category_metrics,
    context_length,
    history_batch,
    history_items,
    hit_rate,
    leave_one_out,
    ndcg,
    rank_categories,
    ranking_scores,
    target_ranks,
)
from hytrec.model.events import EventLog
from hytrec.model.heuristics import category_baselines
from hytrec.model.hisac import HiSACConfig
from hytrec.model.registry import require_inputs
from hytrec.model.train import TrainConfig, train
from hytrec.model.ulim import ULIMConfig, category_logsumexp


@dataclass(frozen=True)
class CascadeConfig:
    dataset: str = "taobao"
    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 0)  # categories searched; 0 = all
    hr_k: int = 50  # item HR@hr_k
    d_model: int = 64
    epochs: int = 3
    max_len: int = 50  # training window
    negatives: int = 1024
    train_seconds: float = 300.0
    valid_users: int | None = 300  # None = every user
    max_users: int | None = None  # test users (None = all)
    batch_size: int = 64
    seed: int = 0
    user_term: bool = False  # train "ULIM + user term" (`ULIMConfig.user_term`)
    cross_interest: bool = False  # and the cross interest (`ULIMConfig.cross_interest`)
    # train and rank as the accuracy benchmark does on this dataset (module docstring): the
    # preset's training config (its max_len, negatives and validation users) with epochs,
    # budget and seed from here and no early stopping, and the preset's history filter
    preset: bool = False
    # a flat model of the accuracy zoo (e.g. "SASRec") trained beside, its stages swapped
    # with ULIM's (module docstring); None: none
    versus: str | None = None


QUICK = CascadeConfig(
    ks=(1, 2, 0),
    d_model=16,
    epochs=1,
    max_len=20,
    negatives=64,
    train_seconds=30.0,
    valid_users=20,
    max_users=40,
)


def _protocol(cfg: CascadeConfig) -> tuple[CascadeConfig, TrainConfig, bool]:
    """How the ULIM trains, and whether ranking removes the history's items; with `preset`
    the config takes the preset's training fields, so the report records what trained."""
    if not cfg.preset:
        train_config = TrainConfig(
            epochs=cfg.epochs,
            batch_size=32,
            max_len=cfg.max_len,
            negatives=cfg.negatives,
            valid_users=cfg.valid_users,
            time_budget_s=cfg.train_seconds,
            seed=cfg.seed,
        )
        return cfg, train_config, False
    if cfg.dataset not in PRESETS:
        raise ValueError(
            f"cascade --preset: no accuracy preset for {cfg.dataset!r} (presets: {sorted(PRESETS)})"
        )
    preset = PRESETS[cfg.dataset]
    train_config = replace(
        preset.train,
        epochs=cfg.epochs,
        patience=cfg.epochs,
        time_budget_s=cfg.train_seconds,
        seed=cfg.seed,
    )
    cfg = replace(
        cfg,
        max_len=train_config.max_len,
        negatives=train_config.negatives,
        valid_users=train_config.valid_users,
    )
    return cfg, train_config, preset.filter_history


def run_cascade(cfg: CascadeConfig, log: EventLog, output: str | Path | None) -> dict:
    """Train ULIM, rank every test target under each K and the oracle; write the report."""
    torch.manual_seed(cfg.seed)
    split = leave_one_out(log)
    cfg, train_config, filter_history = _protocol(cfg)
    began = time.perf_counter()
    versus_config = _versus_config(cfg, train_config, log)  # refused before ULIM trains
    result = train(
        ULIMConfig(d_model=cfg.d_model, user_term=cfg.user_term, cross_interest=cfg.cross_interest),
        log,
        split,
        train_config,
    )
    model = result.model.eval()
    train_seconds = time.perf_counter() - began
    versus = None
    if versus_config is not None:
        began = time.perf_counter()
        versus = train(versus_config, log, split, train_config)
        versus_seconds = time.perf_counter() - began
        versus_context = context_length(versus.model.eval(), None)  # as the accuracy's ranks
    starts, targets = split.targets("test")
    if cfg.max_users is not None and len(starts) > cfg.max_users:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(starts), cfg.max_users, False))
        starts, targets = starts[keep], targets[keep]
    num_categories = model.cfg.num_categories
    settings = [("all" if k == 0 else str(k), k or None) for k in cfg.ks]
    item_cat = model.item_category
    ranks = {name: [] for name, _ in settings} | {"oracle": []}
    searched = {name: [] for name, _ in settings} | {"oracle": []}
    category_rank, versus_category_rank, swap_ranks = [], [], {}
    for b in tqdm(range(0, len(starts), cfg.batch_size), desc="cascade", unit="batch"):
        s, t = starts[b : b + cfg.batch_size], targets[b : b + cfg.batch_size]
        batch = history_batch(log, s, t)
        read = model.readout(batch)
        target = torch.from_numpy(log.item[t])
        target_category = torch.from_numpy(log.category[t])
        category_rank.append(target_ranks(read.log_p, target_category)[0].numpy())
        exclude = history_items(log, s, t, len(item_cat)) if filter_history else None
        for name, k in settings + [("oracle", None)]:
            oracle = target_category if name == "oracle" else None
            scores = model.cascade_scores(read, k, oracle=oracle)
            ranks[name].append(target_ranks(scores, target, exclude)[0].numpy())
            searched[name].append(
                (torch.isfinite(scores).sum(1).double() / (len(item_cat) - 1)).numpy()
            )
        if versus is not None:
            versus_scores = ranking_scores(versus.model, history_batch(log, s, t, versus_context))
            swapped, versus_log_p = stage_swap_scores(
                read.log_p,
                model.cascade_scores(read, None),
                versus_scores,
                item_cat,
                target_category,
                cfg.versus,
            )
            versus_category_rank.append(target_ranks(versus_log_p, target_category)[0].numpy())
            for name, scores in swapped.items():
                swap_ranks.setdefault(name, []).append(
                    target_ranks(scores, target, exclude)[0].numpy()
                )
    ranks = {n: np.concatenate(v) for n, v in ranks.items()}
    searched = {n: np.concatenate(v) for n, v in searched.items()}
    ulim_categories = category_metrics(np.concatenate(category_rank), (1, 2, 5, 10, 20))
    eval_cfg_users = {"max_users": cfg.max_users, "seed": cfg.seed}
    versus_categories = {}
    if versus is not None:
        ranked = np.concatenate(versus_category_rank)
        versus_categories[f"{cfg.versus} (implied)"] = category_metrics(ranked, (1, 2, 5, 10, 20))
    baselines = {}
    for name, baseline in category_baselines(log).items():
        r = rank_categories(baseline, log, split, "test", EvalConfig(**eval_cfg_users))
        baselines[name] = category_metrics(r, (1, 2, 5, 10, 20))
    rows = [
        {
            "K": name,
            **_item_metrics(ranks[name], cfg.hr_k),
            "searched_fraction_mean": float(searched[name].mean()),
            "searched_fraction_p90": float(np.quantile(searched[name], 0.9)),
        }
        for name in list(dict(settings)) + ["oracle"]
    ]
    report = {
        "benchmark": "cascade",
        "model": "ulim",
        "fidelity": "reading",
        "dataset": cfg.dataset,
        "command": command_line("cascade", cfg, output),
        "config": asdict(cfg),
        "protocol": {
            "as_accuracy_benchmark": cfg.preset,
            "history_items": "removed from candidates" if filter_history else "kept",
            "train_config": asdict(train_config),
        },
        "users": int(len(starts)),
        "items": int(len(item_cat) - 1),
        "categories": int(num_categories - 1),
        "rows": rows,
        "next_category": {"ULIM": ulim_categories, **versus_categories, **baselines},
        "training": {
            "seconds": round(train_seconds, 1),
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "history": result.history,
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": {
            **machine_info(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    if versus is not None:
        report["stage_swap"] = {
            "versus": cfg.versus,
            "ranking": "every category (no gate); P_V(x) = softmax of the versus model's "
            "scores over the items, P_V(c) its sum over c's items, P_V(x | c) their ratio; "
            "history items removed as in the rows above when the protocol removes them",
            "rows": [
                {"ranking": name, **_item_metrics(np.concatenate(r), cfg.hr_k)}
                for name, r in swap_ranks.items()
            ],
            "training": {
                "seconds": round(versus_seconds, 1),
                "epochs_run": len(versus.history),
                "best_epoch": versus.best_epoch,
                "history": versus.history,
            },
        }
    if output is not None:
        write_report(report, output, plot_cascade)
    return report


def _item_metrics(ranks: np.ndarray, hr_k: int) -> dict[str, float]:
    """Item HR@hr_k and NDCG@10 of 0-based ranks."""
    return {f"HR@{hr_k}": hit_rate(ranks, hr_k), "NDCG@10": ndcg(ranks, 10)}


def _versus_config(cfg: CascadeConfig, train_config: TrainConfig, log: EventLog):
    """The versus model's config (the accuracy zoo's, at the cascade's d_model and input
    length), None without one; refused by name where the zoo's model needs more than the
    log (HiSAC's semantic IDs, HPGR's pre-training)."""
    if cfg.versus is None:
        return None
    zoo = model_zoo(cfg.d_model, train_config.max_len)
    if cfg.versus not in zoo:
        raise ValueError(f"cascade --versus: {cfg.versus!r} is not in the zoo: {list(zoo)}")
    config = zoo[cfg.versus]
    if isinstance(config, HiSACConfig) or getattr(config, "selection", None) == "pretrained":
        raise ValueError(
            f"cascade --versus: {cfg.versus!r} needs semantic IDs or a pre-training the "
            "cascade does not build; `hytrec benchmark accuracy` does"
        )
    require_inputs(config, log)
    return config


def stage_swap_scores(
    ulim_log_p: torch.Tensor,
    ulim_scores: torch.Tensor,
    versus_scores: torch.Tensor,
    item_category: torch.Tensor,
    target_category: torch.Tensor,
    versus: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The stage-swap rankings [U, N] (module docstring) and log P_V(c) [U, C].

    ulim_log_p [U, C]: ULIM's log P(c); ulim_scores [U, N]: its ungated cascade, log P(c)
    + log P(x | c); versus_scores [U, N]: the versus model's ranking scores (logits of
    P_V); target_category [U]: each row's oracle category."""
    minus_inf = float("-inf")
    logits = versus_scores.clone()
    logits[:, 0] = minus_inf  # padding
    log_q = logits.log_softmax(-1)  # log P_V(x)
    q_c = category_logsumexp(log_q, item_category, ulim_log_p.shape[1])  # [U, C]
    each = item_category.expand_as(log_q)  # [U, N]: every item's category
    q_of = q_c.gather(1, each)
    p_of = ulim_log_p.gather(1, each)
    # a ratio of two -inf (an item outside either model's mass) ranks last, not NaN
    q_x_c = torch.where(torch.isfinite(q_of), log_q - q_of, minus_inf)
    p_x_c = torch.where(torch.isfinite(p_of), ulim_scores - p_of, minus_inf)
    rankings = {
        versus: log_q,
        f"{versus}, oracle category": log_q.masked_fill(
            each != target_category[:, None], minus_inf
        ),
        f"ULIM P(c) x {versus} P(x | c)": p_of + q_x_c,
        f"{versus} P(c) x ULIM P(x | c)": q_of + p_x_c,
    }
    return rankings, q_c


def plot_cascade(report: dict, path: Path) -> None:
    """Left: item HR@K and the searched share against K (oracle dashed); middle: next-category
    HR@K of ULIM, the versus model's P_V(c) and the two baselines; right, with a versus
    model: NDCG@10 of ULIM ungated, the versus model and the two stage swaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hr = next(key for key in report["rows"][0] if key.startswith("HR@"))
    rows = [r for r in report["rows"] if r["K"] != "oracle"]
    oracle = next(r for r in report["rows"] if r["K"] == "oracle")
    swap = report.get("stage_swap")
    fig, axes = plt.subplots(1, 3 if swap else 2, figsize=(18 if swap else 12, 4.5))
    left, right = axes[:2]
    x = np.arange(len(rows))
    left.plot(x, [r[hr] for r in rows], "o-", label=f"item {hr}")
    left.plot(x, [r["searched_fraction_mean"] for r in rows], "s-", label="searched share (mean)")
    left.axhline(oracle[hr], color="k", ls="--", lw=1, label=f"oracle category {hr}")
    left.set_xticks(x, [r["K"] for r in rows])
    left.set_xlabel("categories searched (K)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    ks = (1, 2, 5, 10, 20)
    for name, metrics in report["next_category"].items():
        right.plot(ks, [metrics[f"HR@{k}"] for k in ks], "o-", label=name)
    right.set_xlabel("K")
    right.set_ylabel("next-category HR@K")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    if swap:
        # the oracle rows (an order of magnitude above) are in the left panel's line and
        # the JSON; drawn here they would flatten the bars compared
        bars = [("ULIM (every category)", r["NDCG@10"]) for r in rows if r["K"] == "all"]
        bars += [(r["ranking"], r["NDCG@10"]) for r in swap["rows"] if "oracle" not in r["ranking"]]
        y = np.arange(len(bars))
        axes[2].barh(y, [v for _, v in bars], color="tab:blue")
        for at, (_, value) in zip(y, bars, strict=True):
            axes[2].text(value, at, f" {value:.4f}", va="center", fontsize=8)
        axes[2].set_yticks(y, [n for n, _ in bars], fontsize=8)
        axes[2].invert_yaxis()
        axes[2].set_xlabel("item NDCG@10 (no gate)")
        axes[2].set_title(f"stages swapped with {swap['versus']}", fontsize=9)
        axes[2].grid(alpha=0.3, axis="x")
    terms = {"user_term": " + user term", "cross_interest": " + cross interest"}
    named = "".join(name for key, name in terms.items() if report["config"].get(key))
    fig.suptitle(
        f"ULIM{named} cascade on "
        f"{report['dataset']} ({report['users']} test users, fidelity: reading)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
