"""`hytrec pretrain mim`, `hytrec benchmark hpgr-pretrain-curve` and `hpgr-sparsity`: their
options, and the handlers that import the benchmarks (`hpgr_benchmark.py`) lazily (torch is
slow to import; `hytrec --help` does not need it). Unset options keep the configs' defaults
(`pretrain.MIMConfig`, `hpgr_benchmark.SparsityConfig`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hytrec.model.cli import column_map, dataset_argument

RESULTS = Path("benchmarks/results")
# MIMConfig fields settable from the command line
MIM_FLAGS = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "max_len": int,
    "negatives": int,
    "mask_ratio": float,
    "session_mask_ratio": float,
    "time_budget_s": float,
    "seed": int,
}
SPARSITY_FLAGS = {
    "recent": int,
    "pretrain_epochs": int,
    "epochs": int,
    "max_len": int,
    "batch_size": int,
    "negatives": int,
    "time_budget_s": float,
}


def _mim_arguments(p) -> None:
    """The pre-training's options, shared by `pretrain mim` and `hpgr-pretrain-curve`."""
    _flags(p, MIM_FLAGS, "MIMConfig")
    p.add_argument("--d-model", type=int, help="the encoder's width (HPGRConfig.d_model)")
    p.add_argument("--no-progress", action="store_true")


def _flags(p: argparse.ArgumentParser, flags: dict, owner: str) -> None:
    for name, kind in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{owner}.{name}")


def _given(args, flags: dict) -> dict:
    return {name: getattr(args, name) for name in flags if getattr(args, name) is not None}


def register(commands, benchmarks) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="pre-training stages (HPGR's session-based masked item modelling)"
    ).add_subparsers(dest="pretrain", required=True, metavar="OBJECTIVE")
    p = pretrain.add_parser(
        "mim",
        help="HPGR stage 1: session-based masked item modelling on the training events",
        description="Item and whole-session masking, bidirectional HPGR encoder, full "
        "softmax (--negatives N: sampled), training events only. Saves the encoder "
        "(hytrec train --model hpgr --init-from DIR) and writes the report (JSON + PNG).",
    )
    dataset_argument(p)
    p.add_argument("--out", help="checkpoint directory (default runs/pretrain-mim-DATASET)")
    p.add_argument("--output", help="report stem (default benchmarks/results/pretrain-mim-DATASET)")
    _mim_arguments(p)
    p.set_defaults(func=_pretrain)

    p = benchmarks.add_parser(
        "hpgr-pretrain-curve",
        help="HPGR's masked-item HR@10 by epoch with and without the session module",
    )
    dataset_argument(p)
    p.add_argument(
        "--output", help="report stem (default benchmarks/results/hpgr-pretrain-curve-DATASET)"
    )
    _mim_arguments(p)
    p.set_defaults(func=_curve)

    p = benchmarks.add_parser(
        "hpgr-sparsity",
        help="HPGR's test NDCG@10 and attention FLOPs fraction against PGSA's k",
    )
    dataset_argument(p)
    p.add_argument("--ks", help="k values, comma-separated; 0 = dense (all)")
    p.add_argument("--seeds", help="fine-tuning seeds, comma-separated (default 0)")
    p.add_argument("--init-from", help="a `hytrec pretrain mim` checkpoint (default: pre-train)")
    _flags(p, SPARSITY_FLAGS, "SparsityConfig")
    p.add_argument(
        "--output", help="report stem (default benchmarks/results/hpgr-sparsity-DATASET)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_sparsity)


def _load(args):
    import torch

    from hytrec.model.data import load_named

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_named(args.dataset, columns=column_map(args))


def _name(dataset: str) -> str:
    return Path(dataset).name.split(".")[0] or "data"


def _mim_config(args):
    from dataclasses import replace

    from hytrec.model.pretrain import MIMConfig

    cfg = replace(MIMConfig(), **_given(args, MIM_FLAGS))
    if args.d_model is not None:
        cfg = replace(cfg, model=replace(cfg.model, d_model=args.d_model))
    return cfg


def _pretrain(args) -> int:
    from hytrec.bench.hpgr_benchmark import run_pretrain

    log = _load(args)
    checkpoint = Path(args.out or f"runs/pretrain-mim-{_name(args.dataset)}")
    output = Path(args.output or RESULTS / f"pretrain-mim-{_name(args.dataset)}")
    report = run_pretrain(
        args.dataset, log, _mim_config(args), checkpoint, output, not args.no_progress
    )
    print(
        f"sessions {report['sessions']:,}; masked-item HR@10 {report['masked_item_HR@10']:.4f} "
        f"(popularity {report['popularity_HR@10']:.4f}); leaked targets "
        f"{report['leaked_targets']}; checkpoint {checkpoint}; -> {output}.json and .png"
    )
    return 0


def _curve(args) -> int:
    from hytrec.bench.hpgr_benchmark import run_pretrain_curve

    log = _load(args)
    output = Path(args.output or RESULTS / f"hpgr-pretrain-curve-{_name(args.dataset)}")
    run_pretrain_curve(args.dataset, log, _mim_config(args), output, not args.no_progress)
    print(f"-> {output}.json and .png")
    return 0


def _sparsity(args) -> int:
    from dataclasses import replace

    from hytrec.bench.hpgr_benchmark import SparsityConfig, run_sparsity

    log = _load(args)
    cfg = replace(SparsityConfig(dataset=args.dataset), **_given(args, SPARSITY_FLAGS))
    if args.init_from:
        cfg = replace(cfg, init_from=args.init_from)
    if args.ks:
        cfg = replace(cfg, ks=tuple(int(v) for v in args.ks.split(",") if v))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(v) for v in args.seeds.split(",") if v))
    output = Path(args.output or RESULTS / f"hpgr-sparsity-{_name(args.dataset)}")
    run_sparsity(cfg, log, output, not args.no_progress)
    print(f"-> {output}.json and .png")
    return 0
