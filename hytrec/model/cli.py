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
        "whole model (default config, fp32), plus the per-user state size. --model recgrela: "
        "its kernel vs naive causal linear attention, streaming vs parallel, pad and shift "
        "invariance, and the causal=False reference mode vs the authors' equations.",
    )
    parity.add_argument("--model", choices=("hytrec", "recgrela"), default="hytrec")
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
        ("--device", str),
        ("--seed", int),
    ):
        eff.add_argument(name, type=kind)
    eff.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    eff.add_argument(
        "--output", help="report stem (default: benchmarks/results/efficiency-<device>)"
    )
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
        ("--pool-mib", int),
        ("--device", str),
        ("--seed", int),
    ):
        step.add_argument(name, type=kind)
    step.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    step.add_argument("--output", help="report stem (default: benchmarks/results/step-<device>)")
    step.set_defaults(func=_benchmark_step)

    # defaults live in KernelBenchConfig
    kernels = benchmarks.add_parser(
        "kernels",
        help="parallel TADN forward and forward+backward per backend, with fla's gated "
        "delta rule where it runs",
        description="PyTorch chunked, Triton chunked and flash-linear-attention's "
        "chunk_gated_delta_rule (erase = 1, where they run) on the same inputs: forward ms, "
        "forward+backward ms, training tokens/s and the largest difference from the PyTorch "
        "form. Writes STEM.json and STEM.png.",
    )
    kernels.add_argument("--lengths", type=_ints, help="sequence lengths, e.g. 1024,4096")
    for name, kind in (
        ("--batch", int),
        ("--heads", int),
        ("--head-dim", int),
        ("--chunk-size", int),
        ("--dtype", str),
        ("--repeats", int),
        ("--budget-s", float),
        ("--device", str),
        ("--seed", int),
    ):
        kernels.add_argument(name, type=kind)
    kernels.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    kernels.add_argument(
        "--output", help="report stem (default: benchmarks/results/kernels-<device>)"
    )
    kernels.set_defaults(func=_benchmark_kernels)

    # defaults live in ProfileConfig
    prof = benchmarks.add_parser(
        "profile",
        help="where a HyTRec training step and a streaming step spend their time",
        description="torch profiler (CPU) of one training step (forward + backward of the "
        "next-item loss over L events) per length and of one streaming step, by module and "
        "by operator. Writes STEM.json, STEM.md and STEM.png.",
    )
    prof.add_argument("--lengths", type=_ints, help="sequence lengths, e.g. 100,1000,12000")
    for name, kind in (
        ("--d-model", int),
        ("--batch", int),
        ("--step-users", int),
        ("--top-ops", int),
        ("--repeats", int),
        ("--threads", int),
        ("--seed", int),
    ):
        prof.add_argument(name, type=kind)
    prof.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    prof.add_argument(
        "--output", help="report stem (default: benchmarks/results/profile-train-cpu)"
    )
    prof.set_defaults(func=_benchmark_profile)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _config(args: argparse.Namespace, default, quick):
    """The benchmark's config: its defaults (or its quick ones), with the given options."""
    from dataclasses import fields, replace

    given = {f.name: getattr(args, f.name, None) for f in fields(default)}
    base = quick if args.quick else default
    return replace(base, **{name: value for name, value in given.items() if value is not None})


def _output(args: argparse.Namespace, name: str, device: str) -> str:
    """The report stem: --output, or benchmarks/results/NAME-cpu|gpu."""
    if args.output:
        return args.output.removesuffix(".json")
    from hytrec.model.device import resolve_device

    return f"benchmarks/results/{name}-{'gpu' if resolve_device(device).type == 'cuda' else 'cpu'}"


def _run_benchmark(args, name: str, default, quick, run, **options) -> int:
    """`run(config, output_stem, **options)` with the config from `args`, then say where."""
    config = _config(args, default, quick)
    output = _output(args, name, config.device)
    run(config, output, **options)
    print(f"-> {output}.json and {output}.png")
    return 0


def _benchmark_efficiency(args: argparse.Namespace) -> int:
    from hytrec.model.efficiency import QUICK, EfficiencyConfig, run_efficiency

    return _run_benchmark(
        args, "efficiency", EfficiencyConfig(), QUICK, run_efficiency, progress=not args.no_progress
    )


def _benchmark_step(args: argparse.Namespace) -> int:
    from hytrec.model.step_benchmark import QUICK, StepBenchConfig, run_step_benchmark

    return _run_benchmark(args, "step", StepBenchConfig(), QUICK, run_step_benchmark)


def _benchmark_kernels(args: argparse.Namespace) -> int:
    from hytrec.model.kernel_benchmark import QUICK, KernelBenchConfig, run_kernel_benchmark

    return _run_benchmark(args, "kernels", KernelBenchConfig(), QUICK, run_kernel_benchmark)


def _benchmark_profile(args: argparse.Namespace) -> int:
    from hytrec.model.profiling import QUICK, ProfileConfig, run_profile

    config = _config(args, ProfileConfig(), QUICK)
    output = (args.output or "benchmarks/results/profile-train-cpu").removesuffix(".json")
    run_profile(config, output)
    print(f"-> {output}.json, {output}.md and {output}.png")
    return 0


def _check_parity(args: argparse.Namespace) -> int:
    if args.model == "recgrela":
        from hytrec.model.recgrela_parity import parity_report
    else:
        from hytrec.model.parity import parity_report

    report = parity_report(seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
