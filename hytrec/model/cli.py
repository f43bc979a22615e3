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

    # defaults live in StepBenchConfig
    step = benchmarks.add_parser(
        "step",
        help="streaming-step events/s vs users per call and state size, against the "
        "memory-bandwidth roofline",
        description="The TADN step kernel (every backend the device has) and the whole "
        "HyTRec.step: events/s, bytes each event must move, achieved GB/s and the fraction "
        "of the copy bandwidth measured in the same run. Writes STEM.json and STEM.png.",
    )
    step.add_argument("--users", type=_ints, help="users per call, e.g. 1,256,65536")
    step.add_argument("--head-dims", type=_ints, help="dk = dv of the kernel rows")
    for name, kind in (
        ("--heads", int),
        ("--run-length", int),
        ("--d-model", int),
        ("--repeats", int),
        ("--budget-s", float),
        ("--copy-mib", int),
        ("--device", str),
        ("--seed", int),
    ):
        step.add_argument(name, type=kind)
    step.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    step.add_argument("--output", help="report stem (default: benchmarks/results/step-<device>)")
    step.set_defaults(func=_benchmark_step)


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


def _benchmark_step(args: argparse.Namespace) -> int:
    from hytrec.model.step_benchmark import config_from_args, run_step_benchmark

    config = config_from_args(args)
    output = args.output
    if output is None:
        device = config.device if config.device != "auto" else _auto_device()
        output = f"benchmarks/results/step-{device.split(':')[0]}"
    output = output.removesuffix(".json")
    run_step_benchmark(config, output)
    print(f"-> {output}.json and {output}.png")
    return 0


def _auto_device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _check_parity(args: argparse.Namespace) -> int:
    from hytrec.model.parity import parity_report

    report = parity_report(seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
