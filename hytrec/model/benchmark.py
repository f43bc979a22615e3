"""The accuracy benchmark: HyTRec, its ablations, SASRec and popularity in one harness.

Every model trains on the same split with the same `TrainConfig` (epochs, time budget,
batch size, input length, loss, seed) and is ranked on the same test targets with the same
`EvalConfig`; `hytrec benchmark accuracy --dataset NAME` writes
`benchmarks/results/accuracy-NAME.{json,md,png}`.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn as nn

from hytrec.model.evaluate import (
    EvalConfig,
    EvalSplit,
    ModelReport,
    evaluate,
    leave_one_out,
    write_reports,
)
from hytrec.model.events import EventLog
from hytrec.model.hytrec import EventBatch, HyTRecConfig
from hytrec.model.reports import machine_info, provenance
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.train import TrainConfig, train


class Popularity(nn.Module):
    """Scores every item by its count among the training events, the same for every user."""

    def __init__(self, log: EventLog, split: EvalSplit):
        super().__init__()
        counts = torch.zeros(len(log.items))
        for a, z in zip(split.start, split.train_stop, strict=True):
            counts.index_add_(0, torch.from_numpy(log.item[a:z]), torch.ones(z - a))
        self.register_buffer("counts", counts)

    def forward(self, batch: EventBatch) -> torch.Tensor:
        return torch.ones(*batch.item.shape, 1, device=batch.item.device)  # [B, T, 1]

    def item_table(self) -> torch.Tensor:
        return self.counts[:, None]  # [N, 1]: score = 1 * count

    def score(self, user: torch.Tensor) -> torch.Tensor:
        logits = user @ self.item_table().T
        logits[..., 0] = float("-inf")
        return logits


def model_zoo(d_model: int = 64, max_len: int = 50) -> dict:
    """The compared models (None = popularity). HyTRec defaults: 4 long layers, 3 TADN : 1
    softmax, short branch over the last 20 events, gated fusion."""
    hytrec = HyTRecConfig(d_model=d_model)
    return {
        "popularity": None,
        "SASRec": SASRecConfig(d_model=d_model, layers=2, heads=2, max_len=max_len),
        "HyTRec 3:1": hytrec,
        "softmax-only": replace(hytrec, softmax_every=1),
        "TADN-only": replace(hytrec, use_short=False, softmax_every=0),
        "no temporal decay": replace(hytrec, state_decay=False, erase_tau=False),
        "hybrid 1:1": replace(hytrec, softmax_every=2),
        "hybrid 7:1": replace(hytrec, softmax_every=8, long_layers=8),
    }


@dataclass(frozen=True)
class Preset:
    """How one dataset is read and compared: file, loss, input length, budget, protocol."""

    path: str  # relative to the shared data folder
    train: TrainConfig
    filter_history: bool  # the primary protocol (the other one is reported beside it)
    note: str


# Same budget for every model of a dataset: at most `epochs` epochs and `time_budget_s`
# seconds of training, whichever comes first; chosen so that all eight models fit in about
# 15 minutes on 2 CPU cores.
PRESETS = {
    "taobao": Preset(
        "taobao/UserBehavior_head84k.csv.gz",
        TrainConfig(
            epochs=8,
            batch_size=32,
            max_len=200,
            negatives=1024,
            valid_users=None,
            time_budget_s=75.0,
        ),
        filter_history=False,
        note="unix-second timestamps; repeat views are common, so history items stay "
        "candidates; sampled softmax (1024 shared uniform negatives) over 55k items",
    ),
    "beauty": Preset(
        "amazon/Beauty.txt.gz",
        TrainConfig(
            epochs=8,
            batch_size=128,
            max_len=50,
            negatives=0,
            valid_users=2000,
            time_budget_s=60.0,
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
            epochs=8, batch_size=64, max_len=200, negatives=0, valid_users=None, time_budget_s=60.0
        ),
        filter_history=True,
        note="ratings as clicks, u.item genres as categories; "
        "movies are rarely re-rated, so history items are removed",
    ),
}


def run_accuracy(
    dataset: str,
    log: EventLog,
    preset: Preset,
    out_stem: Path,
    models: list[str] | None = None,
    d_model: int = 64,
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train and evaluate every model of `model_zoo` on `log`; write the reports."""
    tc = train_config or preset.train
    split = leave_one_out(log)
    zoo = model_zoo(d_model, tc.max_len)
    eval_cfg = EvalConfig(filter_history=preset.filter_history, seed=tc.seed)
    rows: list[ModelReport] = []
    for name, cfg in zoo.items():
        if models and name not in models:
            continue
        began = time.perf_counter()
        torch.manual_seed(tc.seed)
        extra: dict = {"config": asdict(cfg) if cfg is not None else {}}
        if cfg is None:
            model = Popularity(log, split).to(tc.device)
        else:
            result = train(cfg, log, split, tc, dataset=dataset, progress=progress)
            model = result.model
            extra.update(
                best_epoch=result.best_epoch,
                epochs_run=len(result.history),
                train_seconds=round(result.train_seconds, 1),
                history=result.history,
                valid=result.valid,
                parameters=sum(p.numel() for p in model.parameters()),
            )
        report = evaluate(model, log, split, "test", eval_cfg, tc.device)
        extra["run_seconds"] = round(time.perf_counter() - began, 1)
        rows.append(ModelReport(name, report, extra))
        o = report["overall"]
        print(
            f"{name}: HR@10 {o['HR@10']:.4f} NDCG@10 {o['NDCG@10']:.4f} ({extra['run_seconds']} s)",
            flush=True,
        )
    header = {
        "benchmark": "accuracy",
        "dataset": dataset,
        "data_file": preset.path,
        "events": len(log),
        "users": int(len(split.start)),
        "items": len(log.items) - 1,
        "protocol": {**rows[0].report["protocol"], "note": preset.note} if rows else {},
        "train_config": asdict(tc),
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
    write_reports(rows, out_stem, f"accuracy on {dataset} (full ranking, leave-one-out)", header)
    return {"header": header, "models": {r.name: r.report["overall"] for r in rows}}
