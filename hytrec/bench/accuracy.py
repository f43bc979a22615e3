"""The accuracy benchmark: HyTRec, its ablations, SASRec, each with and without the repeat
head, RecGRELA, HSTU, beside popularity and the heuristics, in one harness.

Every model trains on the same split with the same `TrainConfig` (epochs, time budget, batch
size, input length, loss, seed) and is ranked on the same test targets with the same
`EvalConfig`; the baselines (popularity, recent-items, user-frequency, recency-frequency,
item-transition: `heuristics.py`) always run, whatever `--models` selects. Each row carries
a 95% bootstrap interval over users for NDCG@10, and each trained model its ratio to the
best heuristic with a paired bootstrap interval (`evaluate.paired_bootstrap`); with several
`--seeds` the trained models run once per seed and the spread is reported. `hytrec benchmark
accuracy --dataset NAME` writes `benchmarks/results/accuracy-NAME.{json,md,png}`.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from hytrec.bench.reports import machine_info, provenance
from hytrec.model.codebook import SemanticIds
from hytrec.model.data import has_categories
from hytrec.model.evaluate import (
    EvalConfig,
    EvalSplit,
    ModelReport,
    category_metrics,
    leave_one_out,
    ndcg_per_user,
    paired_bootstrap,
    rank_categories,
    rank_targets,
    report_of,
    write_reports,
)
from hytrec.model.events import EventLog
from hytrec.model.heuristics import Popularity, category_baselines, heuristics
from hytrec.model.hisac import HiSACConfig, HiSACMultiConfig
from hytrec.model.hpgr import HPGRConfig
from hytrec.model.hstu import HSTUConfig
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.pretrain import MIMConfig, pretrain
from hytrec.model.pretrain import save as save_pretrained
from hytrec.model.pretrain import summary as mim_summary
from hytrec.model.recgrela import RecGRELAConfig
from hytrec.model.registry import missing_input, require_inputs
from hytrec.model.repeat import RepeatConfig
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.train import TrainConfig, train
from hytrec.model.ulim import ULIMConfig

HEAD = " + repeat head"


SASREC_LAST_50 = "SASRec last 50"


def model_zoo(d_model: int = 64, max_len: int = 50) -> dict:
    """The compared models. HyTRec defaults: 4 long layers, 3 TADN : 1 softmax, short branch
    over the last 20 events, gated fusion. SASRec and HyTRec 3:1 also run with the repeat
    head (`repeat.py`, default `RepeatConfig`: the last 100 distinct items), and SASRec with
    the head reads its last 50 events too (`max_len` 50 whatever the input length, which
    the whole-history models are not held to). RecGRELA at
    its published size (4 heads, 4 layers) with the paper's three ablations and with the
    head. HSTU at the wave-2 size (2 layers, 2 heads, dropout 0.2), its window and KV cache
    N = the input length, and with the head. HPGR (the same size, k 32, w 8) fine-tuned
    from a session-based MIM pre-training the harness runs first (`hpgr_pretraining`),
    with the head, without it (PGSA ranks with the model's own table), and without sparse attention.
    ULIM at the reading's defaults, ranked by its cascade (its top 10 categories, merged as
    the distribution P(c) P(x | c)), with the head (mixed with that distribution), without
    the pointer, ranking every category (no gate: what the cascade's top 10 costs), and
    merged by log P(c) + u^c . e_x (the design reading's merge). HiSAC
    (fused with its short branch; and with the head), HiSAC-mi (max over agents) and HiSAC with hard
    routing, over the semantic IDs given to `run_accuracy` (left out without them)."""
    hytrec = HyTRecConfig(d_model=d_model)
    recgrela = RecGRELAConfig(d_model=d_model)
    sasrec = SASRecConfig(d_model=d_model, layers=2, heads=2, max_len=max_len)
    hstu = HSTUConfig(d_model=d_model, max_len=max_len)
    hpgr = HPGRConfig(d_model=d_model, max_len=max_len, selection="pretrained")
    ulim = ULIMConfig(d_model=d_model)
    return {
        "SASRec": sasrec,
        "SASRec" + HEAD: replace(sasrec, repeat_head=RepeatConfig()),
        SASREC_LAST_50 + HEAD: replace(sasrec, max_len=50, repeat_head=RepeatConfig()),
        "HyTRec 3:1": hytrec,
        "HyTRec 3:1" + HEAD: replace(hytrec, repeat_head=RepeatConfig()),
        "softmax-only": replace(hytrec, softmax_every=1),
        "TADN-only": replace(hytrec, use_short=False, softmax_every=0),
        "no temporal decay": replace(hytrec, state_decay=False, erase_tau=False),
        "hybrid 1:1": replace(hytrec, softmax_every=2),
        "hybrid 7:1": replace(hytrec, softmax_every=8, long_layers=8),
        "RecGRELA": recgrela,
        "RecGRELA" + HEAD: replace(recgrela, repeat_head=RepeatConfig()),
        "RecGRELA no gate": replace(recgrela, gate=False),
        "RecGRELA no conv": replace(recgrela, conv=False),
        "RecGRELA no RoPE": replace(recgrela, rope=False),
        "HSTU": hstu,
        "HSTU" + HEAD: replace(hstu, repeat_head=RepeatConfig()),
        "HPGR": hpgr,
        "HPGR" + HEAD: replace(hpgr, repeat_head=RepeatConfig()),
        "HPGR no pre-training": replace(hpgr, selection="own"),
        "HPGR no sparse attention": replace(hpgr, top_k=None),
        "ULIM": ulim,
        "ULIM" + HEAD: replace(ulim, repeat_head=RepeatConfig()),
        "ULIM no pointer": replace(ulim, pointer=False),
        "ULIM all categories": replace(ulim, top_categories=None),
        "ULIM dot merge": replace(ulim, merge="dot"),
        "ULIM + user term": replace(ulim, user_term=True),
        "ULIM + user term + cross interest": replace(ulim, user_term=True, cross_interest=True),
        "HiSAC": HiSACConfig(d_model=d_model),
        "HiSAC" + HEAD: HiSACConfig(d_model=d_model, repeat_head=RepeatConfig()),
        "HiSAC-mi": HiSACMultiConfig(d_model=d_model),
        "HiSAC hard routing": HiSACConfig(d_model=d_model, routing="hard"),
    }


# HPGR's pre-training in this harness. On Taobao the masked-item HR@10 passes 3x popularity's
# from epoch 6 and is still rising at 12 (0.054, 44x, `pretrain-mim-taobao.json`), 380 s
# on the 2 shared cores over the last 50 events; over 200 each step costs about 4x.
MIM_MAX_LEN = 50
MIM_EPOCHS = 12


def hpgr_pretraining(log: EventLog, split: EvalSplit, tc: TrainConfig, d_model: int, out: Path):
    """The MIM pre-training the HPGR rows start from: each user's last `MIM_MAX_LEN`
    training events (or the train config's input length if shorter), at most
    `MIM_EPOCHS` epochs, the train config's batch size, seed and time budget, the full
    softmax (`pretrain.py` says why); saved under `out`. Returns (checkpoint path, the
    run's figures)."""
    model = HPGRConfig(d_model=d_model, max_len=tc.max_len, top_k=None)
    cfg = MIMConfig(
        model=model,
        max_len=min(tc.max_len, MIM_MAX_LEN),
        epochs=MIM_EPOCHS,
        batch_size=tc.batch_size,
        time_budget_s=tc.time_budget_s,
        seed=tc.seed,
    )
    result = pretrain(cfg, log, split, progress=False)
    figures = {k: v for k, v in mim_summary(result, cfg).items() if k != "config"}
    return str(save_pretrained(result, cfg, out)), figures


def baselines(log: EventLog, split: EvalSplit) -> dict[str, torch.nn.Module]:
    """Popularity and the three heuristics: run in every accuracy table."""
    return {"popularity": Popularity(log, split), **heuristics(log, split)}


@dataclass(frozen=True)
class Preset:
    """How one dataset is read and compared: file, loss, input length, budget, protocol."""

    path: str  # relative to the shared data folder
    train: TrainConfig
    filter_history: bool  # the primary protocol (the other one is reported beside it)
    note: str

    def __post_init__(self) -> None:
        # early stopping must pick the epoch by the protocol the test ranks by
        if self.train.filter_history != self.filter_history:
            raise ValueError(
                f"Preset {self.path}: validation filter_history={self.train.filter_history} "
                f"but the test's is {self.filter_history}"
            )


# Same budget for every model of a dataset and seed: at most `epochs` epochs (stopping after
# `patience` without a better validation NDCG@10) and `time_budget_s` seconds of training,
# whichever comes first. The epoch caps let the models with the repeat head converge (on
# Taobao SASRec + head's validation NDCG@10 peaks at epoch 5-6, about 100 s each on the
# shared 2-core machine); the time caps bound a run of the acceptance rows (SASRec and
# HyTRec 3:1, each with and without the head) to about an hour there.
PRESETS = {
    "taobao": Preset(
        "taobao/UserBehavior_head84k.csv.gz",
        TrainConfig(
            epochs=20,
            batch_size=32,
            max_len=200,
            negatives=1024,
            patience=3,
            valid_users=None,
            time_budget_s=1200.0,
        ),
        filter_history=False,
        note="unix-second timestamps; repeat views are common, so history items stay "
        "candidates; sampled softmax (1024 shared uniform negatives) over 55k items",
    ),
    "foursquare": Preset(
        "foursquare/NYC.npy.gz",
        TrainConfig(
            epochs=20,
            batch_size=32,
            max_len=200,
            negatives=0,
            patience=3,
            valid_users=None,
            time_budget_s=900.0,
        ),
        filter_history=False,
        note="NYC check-ins (STAN's filtering), seconds since the first check-in; people "
        "return to places, so history items stay candidates; full softmax over 5k places",
    ),
    "beauty": Preset(
        "amazon/Beauty.txt.gz",
        TrainConfig(
            epochs=20,
            batch_size=128,
            max_len=50,
            negatives=0,
            patience=3,
            valid_users=2000,
            time_budget_s=600.0,
            filter_history=True,
        ),
        filter_history=True,
        note="S3-Rec file: positions as timestamps; history items removed from the "
        "candidates as in the S3-Rec/ICLRec code (unfiltered figures beside them)",
    ),
    "sports": Preset(
        "amazon/Sports_and_Outdoors.txt.gz",
        TrainConfig(
            epochs=8,
            batch_size=128,
            max_len=50,
            negatives=0,
            valid_users=2000,
            time_budget_s=90.0,
            filter_history=True,
        ),
        filter_history=True,
        note="as beauty",
    ),
    "ml100k": Preset(
        "movielens/u.data.gz",
        TrainConfig(
            epochs=8,
            batch_size=64,
            max_len=200,
            negatives=0,
            valid_users=None,
            filter_history=True,
            time_budget_s=60.0,
        ),
        filter_history=True,
        note="ratings as clicks, u.item genres as categories; "
        "movies are rarely re-rated, so history items are removed",
    ),
    "ml-latest": Preset(
        "movielens/ml-latest-small/ratings.csv.gz",
        TrainConfig(
            epochs=20,
            batch_size=64,
            max_len=200,
            negatives=0,
            patience=3,
            valid_users=None,
            filter_history=True,
            time_budget_s=300.0,
        ),
        filter_history=True,
        note="ratings as clicks, movies.csv genre sets as categories; movies are rarely "
        "re-rated, so history items are removed",
    ),
}


def own_data_preset(source: str, log: EventLog) -> Preset:
    """The preset of a dataset without one (a user's own file): the Taobao preset's input
    length and patience, 600 s per model, full softmax up to 4,096 items and 1,024 sampled
    negatives above (as the demo chooses), history items kept as candidates."""
    negatives = 1024 if len(log.items) > 4 * 1024 else 0
    return Preset(
        str(source),
        replace(PRESETS["taobao"].train, negatives=negatives, time_budget_s=600.0),
        filter_history=False,
        note="a file without a preset (generic settings: own_data_preset); history items "
        "stay candidates, as people return to what they saw",
    )


def run_accuracy(
    dataset: str,
    log: EventLog,
    preset: Preset,
    out_stem: Path,
    models: list[str] | None = None,
    d_model: int = 64,
    train_config: TrainConfig | None = None,
    progress: bool = True,
    seeds: tuple[int, ...] | None = None,
    semantic_ids: str | None = None,
) -> dict:
    """Rank the test targets with the baselines and every model of `model_zoo` (or those in
    `models`; [] for the baselines alone), trained once per seed (default: the train
    config's); write the reports. `semantic_ids`: the `hytrec build-semantic-ids` directory
    the HiSAC rows route through (built on this dataset); without it they are left out. On
    a dataset without categories, ULIM reads the codebook's level-1 codes as its categories
    (`SemanticIds.as_categories`); the other rows read the data as it is."""
    tc = train_config or preset.train
    seeds = tuple(seeds or (tc.seed,))
    split = leave_one_out(log)  # positions: the same for a log with other categories
    zoo = model_zoo(d_model, tc.max_len)
    unknown = sorted(set(models or ()) - set(zoo))
    if unknown:
        raise ValueError(f"unknown models {unknown}; the zoo has {list(zoo)}")
    pseudo = None
    if semantic_ids is not None and not has_categories(log):
        pseudo = SemanticIds.load(semantic_ids).as_categories(log)

    def log_of(cfg) -> EventLog:
        """The events a row trains and ranks on."""
        return pseudo if pseudo is not None and isinstance(cfg, ULIMConfig) else log

    # rows the dataset cannot have (HPGR without times, ULIM without categories): refused
    # when asked for by name, else left out and said why
    left_out = {n: why for n, cfg in zoo.items() if (why := missing_input(cfg, log_of(cfg)))}
    for name in sorted(set(models or ()) & set(left_out)):
        require_inputs(zoo[name], log_of(zoo[name]))
    zoo = {name: cfg for name, cfg in zoo.items() if name not in left_out}
    hisac = [name for name, cfg in zoo.items() if isinstance(cfg, HiSACConfig)]
    if semantic_ids is None:
        if set(models or ()) & set(hisac):
            raise ValueError(f"{sorted(set(models) & set(hisac))} need --semantic-ids")
        if models is None:  # the whole zoo was asked for: say why these rows are missing
            left_out |= {name: "no semantic IDs (--semantic-ids)" for name in hisac}
        zoo = {name: cfg for name, cfg in zoo.items() if name not in hisac}
    else:
        zoo |= {name: replace(zoo[name], semantic_ids=semantic_ids) for name in hisac}
    scratch = tempfile.TemporaryDirectory(prefix="hytrec-accuracy-")
    pretrained: dict[int, tuple[str, dict]] = {}  # seed -> HPGR's pre-training
    eval_cfg = EvalConfig(filter_history=preset.filter_history, seed=tc.seed)
    suffix = "_filtered" if preset.filter_history else ""
    rows: list[ModelReport] = []
    per_user: dict[str, np.ndarray] = {}  # NDCG@10 of every test user, primary protocol

    def ranked_row(name: str, model: torch.nn.Module, extra: dict, events=log) -> ModelReport:
        ranked = rank_targets(model, events, split, "test", eval_cfg, tc.device)
        per_user[name] = ndcg_per_user(ranked["rank" + suffix], 10)
        row = ModelReport(name, report_of(ranked, split, "test", eval_cfg), extra)
        o = row.report["overall"]
        print(f"{name}: HR@10 {o['HR@10']:.4f} NDCG@10 {o['NDCG@10']:.4f}", flush=True)
        return row

    for name, model in baselines(log, split).items():
        kind = "baseline" if name == "popularity" else "heuristic"
        rows.append(ranked_row(name, model.to(tc.device), {"kind": kind}))
    for name, cfg in zoo.items():
        if models is not None and name not in models:
            continue
        runs = []
        for seed in seeds:
            began = time.perf_counter()
            run_tc = replace(tc, seed=seed)
            pretraining = None
            if getattr(cfg, "selection", None) == "pretrained" and tc.init_from is None:
                if seed not in pretrained:
                    pretrained[seed] = hpgr_pretraining(
                        log, split, run_tc, d_model, Path(scratch.name) / f"mim-{seed}"
                    )
                run_tc = replace(run_tc, init_from=pretrained[seed][0])
                pretraining = pretrained[seed][1]
            result = train(cfg, log_of(cfg), split, run_tc, dataset=dataset, progress=progress)
            extra = {
                "kind": "model",
                "seed": seed,
                "config": asdict(result.model.cfg),  # as trained: sizes from the data
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "train_seconds": round(result.train_seconds, 1),
                "seconds_per_epoch": round(result.train_seconds / max(len(result.history), 1), 2),
                # training and validation up to the end of the kept epoch: the time to converge
                "seconds_to_best": result.history[result.best_epoch - 1]["seconds"],
                "history": result.history,
                "valid": result.valid,
                "parameters": sum(p.numel() for p in result.model.parameters()),
            }
            if pretraining is not None:
                extra["pretraining"] = pretraining
            if log_of(cfg) is not log:
                extra["categories"] = "pseudo: the semantic IDs' level-1 codes"
            label = name if seed == seeds[0] else f"{name} (seed {seed})"
            runs.append(ranked_row(label, result.model, extra, log_of(cfg)))
            runs[-1].extra["run_seconds"] = round(time.perf_counter() - began, 1)
        row = runs[0]  # the first seed's run is the row; the others give the spread
        if len(runs) > 1:
            values = [r.report["overall"]["NDCG@10"] for r in runs]
            row.extra["seed_runs"] = [
                {
                    "seed": r.extra["seed"],
                    **{m: r.report["overall"][m] for m in ("HR@10", "NDCG@10", "MRR")},
                    **{k: r.extra[k] for k in ("best_epoch", "seconds_to_best")},
                }
                for r in runs
            ]
            row.extra["NDCG@10_seeds"] = {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values),
                "min": min(values),
                "max": max(values),
            }
        rows.append(row)

    scratch.cleanup()
    # next-category baselines beside the rows with a category head (ULIM), on their events
    next_category = {}
    if any("category_metrics" in r.report for r in rows):
        category_log = pseudo if pseudo is not None else log
        for name, baseline in category_baselines(category_log).items():
            ranks = rank_categories(baseline, category_log, split, "test", eval_cfg)
            next_category[name] = category_metrics(ranks)
    heuristic_rows = [r for r in rows if r.extra["kind"] == "heuristic"]
    best = max(heuristic_rows, key=lambda r: r.report["overall"]["NDCG@10"]).name
    for row in rows:
        row.extra["NDCG@10_ci95"] = paired_bootstrap(per_user[row.name])["ci"]
        if row.extra["kind"] == "model":
            row.extra["vs_best_heuristic"] = {
                "heuristic": best,
                **paired_bootstrap(per_user[row.name], per_user[best]),
            }
    header = {
        "benchmark": "accuracy",
        "dataset": dataset,
        "data_file": preset.path,
        "events": len(log),
        "users": int(len(split.start)),
        "items": len(log.items) - 1,
        "protocol": {**rows[0].report["protocol"], "note": preset.note},
        "train_config": asdict(tc),
        "budget": f"per model and seed: at most {tc.epochs} epochs (patience {tc.patience}) "
        f"and {tc.time_budget_s} s of training",
        "seeds": list(seeds),
        "best_heuristic": best,
        **({"left_out": left_out} if left_out else {}),
        **({"next_category_baselines": next_category} if next_category else {}),
        "intervals": "95% percentile bootstrap over test users (2000 resamples, seed 0); "
        "ratios to the best heuristic resample the same users for both (paired)",
        "d_model": d_model,
        "command": " ".join(shlex.quote(a) for a in ["hytrec", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": {
            **machine_info(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": tc.device,
        },
    }
    write_reports(
        rows,
        out_stem,
        f"accuracy on {dataset} (full ranking, leave-one-out)",
        header,
        notes=intervals_table(rows, best) + next_category_table(rows, next_category),
    )
    return {"header": header, "models": {r.name: r.report["overall"] for r in rows}}


def next_category_table(rows: list[ModelReport], baselines: dict[str, dict]) -> str:
    """Markdown: next-category HR@k and MRR of the rows with a category head and of the
    category baselines ("" when no row has a head)."""
    measured = {
        r.name: r.report["category_metrics"] for r in rows if "category_metrics" in r.report
    }
    if not measured:
        return ""
    ks = [k for k in next(iter(measured.values())) if k.startswith("HR@")]
    lines = [
        "",
        "Next category (the target event's), ranked by P(c) and by the two baselines:",
        "",
        "| model | " + " | ".join(ks) + " | MRR |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for name, m in {**measured, **baselines}.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in [*ks, "MRR"]) + " |")
    return "\n".join(lines) + "\n"


def intervals_table(rows: list[ModelReport], best: str) -> str:
    """Markdown: NDCG@10 with its interval, the ratio to the best heuristic, seeds, time
    per epoch and to the kept (best) epoch."""
    lines = [
        f"NDCG@10 with 95% bootstrap intervals over users; ratio to the best heuristic "
        f"({best}) with a paired bootstrap interval; P(ahead) = share of resamples where "
        "the model's mean is above the heuristic's.",
        "",
        "| model | NDCG@10 | 95% CI | / best heuristic | 95% CI | P(ahead) | seeds: mean (sd, "
        "min-max) | s/epoch | s to best epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, value = row.extra, row.report["overall"]["NDCG@10"]
        ci = e["NDCG@10_ci95"]
        vs = e.get("vs_best_heuristic")
        seeds = e.get("NDCG@10_seeds")
        cells = [
            row.name,
            f"{value:.4f}",
            f"{ci[0]:.4f}-{ci[1]:.4f}",
            f"{vs['ratio']:.3f}" if vs else "",
            f"{vs['ratio_ci'][0]:.3f}-{vs['ratio_ci'][1]:.3f}" if vs else "",
            f"{vs['share_a_ahead']:.3f}" if vs else "",
            f"{seeds['mean']:.4f} ({seeds['sd']:.4f}, {seeds['min']:.4f}-{seeds['max']:.4f})"
            if seeds
            else "",
            f"{e['seconds_per_epoch']:.1f}" if "seconds_per_epoch" in e else "",
            f"{e['seconds_to_best']:.1f}" if "seconds_to_best" in e else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
