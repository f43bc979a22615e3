"""`hytrec train`, `hytrec evaluate` and `hytrec benchmark accuracy`."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get(
        "HYTREC_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    )
)
RESULTS = Path("benchmarks/results")


def register(commands, benchmarks) -> None:
    """Add this module's subcommands to `hytrec` and `hytrec benchmark`."""
    p = commands.add_parser(
        "train",
        help="train a registered model (HyTRec by default) with early stopping",
        description="Train on the training events of a leave-one-out "
        "split; save the best epoch (validation NDCG@10).",
    )
    _dataset_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument(
        "--model", default="hytrec", help="a registered model (`hytrec models` lists them)"
    )
    p.add_argument(
        "--model-config",
        default="{}",
        help="JSON overrides of the model's config class, e.g. '{\"d_model\": 32}'",
    )
    _train_args(p)
    p.set_defaults(func=_train)

    p = commands.add_parser(
        "models",
        help="the registered models: name, config, streaming, index query, fidelity",
    )
    p.set_defaults(func=_models)

    p = commands.add_parser(
        "evaluate",
        help="full-ranking metrics of a checkpoint",
        description="Rank every item for each test (or validation) target; "
        "write JSON, markdown and PNG reports.",
    )
    _dataset_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", choices=["test", "valid"], default="test")
    p.add_argument(
        "--filter-history",
        action="store_true",
        help="remove the user's history items from the candidates (S3-Rec protocol)",
    )
    p.add_argument(
        "--max-len", type=int, help="input events read per user (default: all the model can read)"
    )
    p.add_argument("--output", help="report stem (default: CHECKPOINT/eval-WHICH)")
    p.set_defaults(func=_evaluate)

    p = benchmarks.add_parser(
        "accuracy",
        help="HyTRec vs ablations, SASRec, popularity",
        description="Train and evaluate every model with the same "
        "budget; write benchmarks/results/accuracy-NAME.*",
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=["beauty", "foursquare", "ml-latest", "ml100k", "sports", "taobao"],
    )
    p.add_argument(
        "--log",
        help="a saved EventLog to use instead of reading the dataset's "
        "shared file (e.g. one filtered elsewhere)",
    )
    p.add_argument(
        "--models",
        nargs="*",
        help="subset of the trained models (default: all); popularity and the heuristics "
        "(recent-items, user-frequency, item-transition) always run",
    )
    p.add_argument(
        "--seeds",
        help="comma-separated seeds: train every selected model once per seed and report "
        "the spread (default: --seed)",
    )
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--output", help="report stem (default: benchmarks/results/accuracy-NAME)")
    _train_args(p)
    p.set_defaults(func=_benchmark)

    p = benchmarks.add_parser(
        "head-cost",
        help="training-step and ranking time of SASRec and HyTRec with and without the "
        "repeat head, side by side",
        description="Times, in alternation, a training step over fixed batches of the "
        "dataset's accuracy preset and the ranking of a batch of test users, for SASRec and "
        "HyTRec 3:1 with and without the repeat head. Writes STEM.json and STEM.png.",
    )
    p.add_argument("--dataset", default="taobao", help="an accuracy preset's dataset")
    for name in ("--batches", "--rank-users", "--repeats", "--d-model", "--seed"):
        p.add_argument(name, type=int)
    p.add_argument("--output", help="report stem (default: benchmarks/results/head-cost-cpu)")
    p.set_defaults(func=_head_cost)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        help="taobao, foursquare, beauty, sports, ml100k, ml-latest, or a path to a saved EventLog",
    )


# `TrainConfig` fields settable from the command line; unset ones keep the config's value.
# Listed here so that `hytrec --help` does not import torch.
TRAIN_FLAGS = {
    "lr": float,
    "weight_decay": float,
    "epochs": int,
    "batch_size": int,
    "max_len": int,
    "negatives": int,
    "patience": int,
    "min_epochs": int,
    "valid_users": int,
    "time_budget_s": float,
    "seed": int,
    "device": str,
}


def _train_args(p: argparse.ArgumentParser) -> None:
    for name, kind in TRAIN_FLAGS.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=f"TrainConfig.{name}"
        )
    p.add_argument(
        "--filter-history",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="validate with the user's history items removed from the candidates",
    )


def _train_config(args: argparse.Namespace, base):
    overrides = {
        name: getattr(args, name)
        for name in [*TRAIN_FLAGS, "filter_history"]
        if getattr(args, name, None) is not None
    }
    if overrides.get("valid_users") == 0:
        overrides["valid_users"] = None  # 0 on the command line: validate on every user
    return replace(base, **overrides)


def load_dataset(name_or_path: str):
    """An `EventLog` for a dataset name (read from the shared data folder) or a saved log."""
    from hytrec.model.events import EventLog

    path = Path(name_or_path)
    if path.with_suffix(".npz").is_file():
        return EventLog.load(path)
    # Adapter to the data loaders of hytrec/model/data.py (being written beside this): until
    # they land, pass a saved EventLog (`EventLog.save`) instead of a name.
    try:
        from hytrec.model.data import load_named
    except ImportError as err:
        raise SystemExit(
            f"dataset {name_or_path!r}: the named loaders (hytrec.model.data."
            f"load_named) are not available ({err}); pass a saved EventLog "
            "path instead"
        ) from err
    return load_named(name_or_path, SHARED_DATA)


def _train(args: argparse.Namespace) -> int:
    import torch

    from hytrec.model.base import config_from_dict
    from hytrec.model.evaluate import leave_one_out
    from hytrec.model.registry import spec
    from hytrec.model.train import TrainConfig, train

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model_config = config_from_dict(spec(args.model).config, json.loads(args.model_config))
    log = load_dataset(args.dataset)
    tc = _train_config(args, TrainConfig())
    result = train(model_config, log, leave_one_out(log), tc, args.out, dataset=args.dataset)
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "best_epoch": result.best_epoch,
                "valid": result.valid,
                "train_seconds": round(result.train_seconds, 1),
            },
            indent=2,
        )
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from hytrec.model.registry import describe

    print(json.dumps(describe(), indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from hytrec.model.benchmark import baselines
    from hytrec.model.evaluate import (
        EvalConfig,
        ModelReport,
        evaluate,
        leave_one_out,
        write_reports,
    )
    from hytrec.model.registry import load_model
    from hytrec.model.reports import machine_info, provenance

    log = load_dataset(args.dataset)
    split = leave_one_out(log)
    model = load_model(args.checkpoint)
    cfg = EvalConfig(filter_history=args.filter_history, max_len=args.max_len)
    report = evaluate(model, log, split, args.which, cfg)
    name = type(model).__name__ + (" + repeat head" if model.cfg.repeat_head else "")
    rows = [ModelReport(name, report, {"kind": "model"})]
    # the reference lines: what a model has to beat, in the same protocol
    reference = EvalConfig(filter_history=args.filter_history)
    for base, ranker in baselines(log, split).items():
        kind = "baseline" if base == "popularity" else "heuristic"
        rows.append(
            ModelReport(base, evaluate(ranker, log, split, args.which, reference), {"kind": kind})
        )
    stem = Path(args.output or Path(args.checkpoint) / f"eval-{args.which}")
    write_reports(
        rows,
        stem,
        f"{name} on {args.dataset}",
        {
            "dataset": args.dataset,
            "checkpoint": str(args.checkpoint),
            "protocol": report["protocol"],
            **provenance(),
            "machine": machine_info(),
        },
    )
    print(json.dumps(report["overall"], indent=2))
    for row in rows[1:]:
        o = row.report["overall"]
        print(f"reference {row.name}: HR@10 {o['HR@10']:.4f} NDCG@10 {o['NDCG@10']:.4f}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from hytrec.model.benchmark import PRESETS, run_accuracy

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    preset = PRESETS[args.dataset]
    tc = _train_config(args, preset.train)
    stem = Path(args.output or RESULTS / f"accuracy-{args.dataset}")
    log = load_dataset(args.log or args.dataset)
    seeds = tuple(int(v) for v in args.seeds.split(",")) if args.seeds else None
    run_accuracy(args.dataset, log, preset, stem, args.models, args.d_model, tc, seeds=seeds)
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _head_cost(args: argparse.Namespace) -> int:
    import torch

    from hytrec.model.head_benchmark import HeadCostConfig, run_head_cost

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    given = {
        "dataset": args.dataset,
        "batches": args.batches,
        "rank_users": args.rank_users,
        "repeats": args.repeats,
        "d_model": args.d_model,
        "seed": args.seed,
    }
    cfg = HeadCostConfig(**{k: v for k, v in given.items() if v is not None})
    output = (args.output or str(RESULTS / "head-cost-cpu")).removesuffix(".json")
    run_head_cost(cfg, load_dataset(cfg.dataset), output)
    print(f"-> {output}.json and {output}.png")
    return 0
