"""`hytrec` subcommands of the model package."""

from __future__ import annotations

import argparse
import json


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec` and `hytrec benchmark`."""
    check = commands.add_parser("check", help="correctness figures").add_subparsers(
        dest="check", required=True, metavar="CHECK"
    )
    parity = check.add_parser(
        "parity",
        help="kernel and train/serve parity figures as JSON",
        description="Max abs differences of chunked vs reference TADN (outputs and gradients), "
        "pooled step vs reference, and streaming vs parallel user vectors of the "
        "whole model (default config, fp32), plus the per-user state size.",
    )
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument("--output", help="also write the JSON to this file")
    parity.set_defaults(func=_check_parity)

    # defaults live in EfficiencyConfig (imported lazily: torch is slow to import)
    eff = benchmarks.add_parser(
        "efficiency",
        help="per-event cost and training tokens/s vs history length, HyTRec vs SASRec",
        description="For each history length L: one HyTRec.step into a state holding L "
        "events, SASRec's and HyTRec's full recompute over L+1 events, and training "
        "tokens/s (forward+backward) of both. Writes STEM.json and STEM.png. Unset options "
        "take EfficiencyConfig's defaults (lengths 100..12000, d_model 64).",
    )
    eff.add_argument("--lengths", type=_ints, help="history lengths, e.g. 100,1000,12000")
    for name, kind in (
        ("--d-model", int),
        ("--sasrec-layers", int),
        ("--sasrec-heads", int),
        ("--build-chunk", int),
        ("--step-repeats", int),
        ("--recompute-repeats", int),
        ("--train-iters", int),
        ("--train-batch", int),
        ("--budget-s", float),
        ("--train-dropout", float),
        ("--threads", int),
        ("--seed", int),
    ):
        eff.add_argument(name, type=kind)
    eff.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    eff.add_argument("--output", help="report stem (default: benchmarks/results/efficiency-cpu)")
    eff.add_argument("--no-progress", action="store_true")
    eff.set_defaults(func=_benchmark_efficiency)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _benchmark_efficiency(args: argparse.Namespace) -> int:
    from dataclasses import fields, replace

    from hytrec.model.efficiency import QUICK, EfficiencyConfig, run_efficiency

    given = {
        f.name: getattr(args, f.name)
        for f in fields(EfficiencyConfig)
        if getattr(args, f.name) is not None
    }
    config = replace(QUICK if args.quick else EfficiencyConfig(), **given)
    output = (args.output or "benchmarks/results/efficiency-cpu").removesuffix(".json")
    run_efficiency(config, output, progress=not args.no_progress)
    print(f"-> {output}.json and {output}.png")
    return 0


def _check_parity(args: argparse.Namespace) -> int:
    from hytrec.model.parity import parity_report

    report = parity_report(seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
