"""`hytrec train` and `hytrec models`: the model package's subcommands."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec`."""
    p = commands.add_parser(
        "train",
        help="train a registered model (HyTRec by default) with early stopping",
        description="Train on the training events of a leave-one-out "
        "split; save the best epoch (validation NDCG@10).",
    )
    dataset_argument(p)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument(
        "--model", default="hytrec", help="a registered model (`hytrec models` lists them)"
    )
    p.add_argument(
        "--model-config",
        default="{}",
        help="JSON overrides of the model's config class, e.g. '{\"d_model\": 32}'",
    )
    train_arguments(p)
    p.set_defaults(func=_train)

    p = commands.add_parser(
        "models",
        help="the registered models: name, config, streaming, index query, fidelity",
    )
    p.set_defaults(func=_models)


def dataset_argument(p: argparse.ArgumentParser) -> None:
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


def train_arguments(p: argparse.ArgumentParser) -> None:
    """--lr, --epochs, ... (`TRAIN_FLAGS`) and --filter-history."""
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


def train_config(args: argparse.Namespace, base):
    """`base` (a TrainConfig) with the flags the user gave."""
    overrides = {
        name: getattr(args, name)
        for name in [*TRAIN_FLAGS, "filter_history"]
        if getattr(args, name, None) is not None
    }
    if overrides.get("valid_users") == 0:
        overrides["valid_users"] = None  # 0 on the command line: validate on every user
    return replace(base, **overrides)


def _train(args: argparse.Namespace) -> int:
    import torch

    from hytrec.model.base import config_from_dict
    from hytrec.model.data import load_named
    from hytrec.model.evaluate import leave_one_out
    from hytrec.model.registry import spec
    from hytrec.model.train import TrainConfig, train

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model_config = config_from_dict(spec(args.model).config, json.loads(args.model_config))
    log = load_named(args.dataset)
    tc = train_config(args, TrainConfig())
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
