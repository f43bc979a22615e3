"""`hytrec` subcommands of the measuring floor: `check parity`, `evaluate`, `demo`, and every
`hytrec benchmark`. Each imports its module lazily (torch and faiss are slow to import)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from hytrec.model.cli import (
    DATASET_HELP,
    column_map,
    data_file_arguments,
    dataset_argument,
    train_arguments,
    train_config,
)
from hytrec.stream.cli import configure_logging

RESULTS = Path("benchmarks/results")
# the module whose `parity_report` `check parity --model NAME` prints
PARITY_REPORTS = {
    "hytrec": "hytrec.bench.parity",
    "recgrela": "hytrec.bench.recgrela_parity",
    "hstu": "hytrec.bench.hstu_parity",
    "hpgr": "hytrec.bench.hpgr_parity",
    "hisac": "hytrec.bench.hisac_parity",
    "ulim": "hytrec.bench.ulim_parity",
}


def register(commands, benchmarks) -> None:
    """Add the subcommands to `hytrec` and `hytrec benchmark`."""
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
        "invariance, and the causal=False reference mode vs the authors' equations. --model "
        "hstu: its KV-cache stream vs parallel, causality, padding, and one block vs an "
        "independent implementation of the HSTU equations.",
    )
    parity.add_argument("--model", choices=tuple(PARITY_REPORTS), default="hytrec")
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument("--output", help="also write the JSON to this file")
    parity.set_defaults(func=_check_parity)

    p = commands.add_parser(
        "evaluate",
        help="full-ranking metrics of a checkpoint",
        description="Rank every item for each test (or validation) target; "
        "write JSON, markdown and PNG reports.",
    )
    dataset_argument(p)
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
        help="a preset (beauty, foursquare, ml-latest, ml100k, sports, taobao: each with its "
        "own budget and protocol) or, under a generic one, any other dataset name, a saved "
        "EventLog (STEM) or a file: a CSV/TSV (gzipped or not) or Parquet read through --columns",
    )
    data_file_arguments(p)
    p.add_argument(
        "--log",
        help="a saved EventLog to use instead of reading the dataset's "
        "shared file (e.g. one filtered elsewhere)",
    )
    p.add_argument(
        "--models",
        nargs="*",
        help="subset of the trained models (default: all); popularity and the heuristics "
        "(recent-items, user-frequency, recency-frequency, item-transition) always run",
    )
    p.add_argument(
        "--seeds",
        help="comma-separated seeds: train every selected model once per seed and report "
        "the spread (default: --seed)",
    )
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument(
        "--semantic-ids",
        help="a `hytrec build-semantic-ids` directory built on this dataset: the HiSAC rows "
        "route through it (without it they are left out); on data without categories ULIM "
        "reads its level-1 codes as categories (without it ULIM is left out there)",
    )
    p.add_argument(
        "--output",
        help="report stem (default: benchmarks/results/accuracy-NAME for a preset, else "
        "runs/accuracy-NAME, NAME the file's name without suffixes)",
    )
    train_arguments(p)
    p.set_defaults(func=_benchmark_accuracy)

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

    p = benchmarks.add_parser(
        "head-calibration",
        help="a repeat-head checkpoint's top K on the demo's held-out days: own items against "
        "the others, their probabilities against their hit rates, the gate shifted",
        description="Ranks the demo's held-out events offline (each after every earlier event "
        "of its user) and each user's last event before the cut with a checkpoint that has a "
        "repeat head; reports hit@K beside recency-frequency, the list's own and other items "
        "(mean probability against hit rate) and hit@K with the head's gate logit shifted. "
        "Writes STEM.json and STEM.png.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a repeat head")
    p.add_argument("--dataset", help="the demo's dataset (default taobao)")
    p.add_argument("--heldout-fraction", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--held-out-events", type=int, help="a seeded sample of the held-out events")
    p.add_argument("--gate-shifts", help="comma-separated shifts of the gate logit, 0 among them")
    p.add_argument("--batch", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="report stem (default: runs/head-calibration)")
    p.set_defaults(func=_head_calibration)

    # defaults live in EfficiencyConfig (imported lazily: torch is slow to import)
    eff = benchmarks.add_parser(
        "efficiency",
        help="per-event cost and training tokens/s vs history length, HyTRec vs SASRec",
        description="For each history length L: one HyTRec.step into a state holding L "
        "events, SASRec's and HyTRec's full recompute over L+1 events, and training "
        "tokens/s (forward+backward) of both; for each cache size N, HSTU's step into a "
        "full KV cache and its state bytes. Writes STEM.json and STEM.png. Unset options "
        "take EfficiencyConfig's defaults (lengths 100..12000, cache sizes 128..2048, "
        "d_model 64).",
    )
    eff.add_argument("--lengths", type=_ints, help="history lengths, e.g. 100,1000,12000")
    eff.add_argument("--cache-sizes", type=_ints, help="HSTU's KV cache sizes, e.g. 128,2048")
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
        ("--hisac-node-cap", int),
        ("--seed", int),
    ):
        eff.add_argument(name, type=kind)
    eff.add_argument(
        "--compile-step",
        action=argparse.BooleanOptionalAction,
        help="also time HyTRec's compiled one-event step (default on; --quick: off)",
    )
    eff.add_argument(
        "--compile-train",
        action=argparse.BooleanOptionalAction,
        help="also time HyTRec's training with its forward compiled (default on; --quick: off)",
    )
    eff.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    eff.add_argument(
        "--output", help="report stem (default: benchmarks/results/efficiency-<device>)"
    )
    eff.add_argument("--no-progress", action="store_true")
    eff.set_defaults(func=_benchmark_efficiency)

    # defaults live in LongRangeConfig
    long_range = benchmarks.add_parser(
        "long-range",
        help="a planted dependency thousands of events back: HyTRec (whole history) vs "
        "TADN-only, softmax-only and SASRec (last N events)",
        description="Each user's last event is the answer to a key event DISTANCE steps "
        "back, random fillers between (synthetic.long_range_log). Per distance, trains "
        "HyTRec 3:1, TADN-only, softmax-only and SASRec on the answer (new users every "
        "epoch), tests on other users (accuracy against chance), there and at the longer "
        "test distances, and times one new event for a user with that history. Writes "
        "STEM.json and STEM.png. Unset options take LongRangeConfig's defaults.",
    )
    long_range.add_argument("--distances", type=_ints, help="trained at: e.g. 100,300,1000")
    long_range.add_argument(
        "--test-distances", type=_ints, help="also tested at (those above the trained): 3000,5000"
    )
    for name, kind in (
        ("--keys", int),
        ("--fillers", int),
        ("--train-users", int),
        ("--test-users", int),
        ("--epochs", int),
        ("--batch-users", int),
        ("--batch-tokens", int),
        ("--lr", float),
        ("--d-model", int),
        ("--sasrec-max-len", int),
        ("--time-budget-s", float),
        ("--step-repeats", int),
        ("--threads", int),
        ("--device", str),
        ("--seed", int),
    ):
        long_range.add_argument(name, type=kind)
    long_range.add_argument(
        "--models-run", nargs="+", help="only these rows, e.g. 'HyTRec 3:1, long-first fusion'"
    )
    long_range.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    long_range.add_argument(
        "--output", help="report stem (default: benchmarks/results/long-range-cpu)"
    )
    long_range.add_argument("--no-progress", action="store_true")
    long_range.set_defaults(func=_benchmark_long_range)

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
        ("--device", str),  # only "cpu": the profiler is set up for CPU activities
        ("--seed", int),
    ):
        prof.add_argument(name, type=kind)
    prof.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    prof.add_argument(
        "--output", help="report stem (default: benchmarks/results/profile-train-cpu)"
    )
    prof.set_defaults(func=_benchmark_profile)

    demo = commands.add_parser(
        "demo",
        help="the main job end to end: train, index, broker, worker, replay, summary",
        description="Train (or reuse) a model on the earlier part of a log, replay the log "
        "through the embedded broker and a worker, and score the held-out part.",
    )
    demo.add_argument(
        "--dataset", default="taobao", help=DATASET_HELP + ", or 'synthetic' (default: taobao)"
    )
    data_file_arguments(demo)
    demo.add_argument(
        "--model",
        default="hytrec",
        help="a registered streaming model (`hytrec models`); HyTRec uses the demo's own "
        "config (d_model 64, dropout 0.2), others their defaults at d_model 64; with the "
        "repeat/explore head where the model takes one",
    )
    demo.add_argument(
        "--no-repeat-head", action="store_true", help="train and serve the model without the head"
    )
    demo.add_argument("--heldout-fraction", type=float, default=0.2)
    demo.add_argument("--train-seconds", type=float, default=300.0)
    demo.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="with the head: the last part of the training history's time span left out of "
        "training, on which the head's gate bias is fitted (0: the gate as trained)",
    )
    demo.add_argument("--heldout-seconds", type=float, default=30.0)
    demo.add_argument("--top-k", type=int, default=20)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--batch-wait-ms", type=float, default=20.0)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--output", default="runs/demo", help="summary.json, demo.png, logs")
    demo.set_defaults(func=_demo)

    bench = benchmarks.add_parser(
        "index",
        help="queries/s and recall@k of each index kind on clustered data",
        description="Writes JSON rows (index, backend, n, d, batch, k, qps, recall_at_k), "
        "per-query category search rows (category sub-index vs faiss selector: recall, "
        "searched fraction, qps) and a recall-vs-QPS PNG beside it. The full default run "
        "takes about 20 minutes on 2 CPU cores; --quick is a seconds-long smoke run.",
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    bench.add_argument("--sizes", type=_ints)
    bench.add_argument("--dims", type=_ints)
    bench.add_argument("--batches", type=_ints)
    bench.add_argument("--kinds", type=_strs)
    bench.add_argument("--k", type=int)
    bench.add_argument("--nprobes", type=_ints)
    bench.add_argument("--ef-searches", type=_ints)
    bench.add_argument("--hnsw-m", type=int)
    bench.add_argument("--queries", type=int)
    bench.add_argument("--seconds", type=float, help="wall time of one measurement")
    bench.add_argument("--backend", choices=("auto", "cpu", "gpu"))
    bench.add_argument("--category-size", type=int, help="mean items per category")
    bench.add_argument(
        "--categories-per-query",
        type=int,
        help="allowed categories per query of the per-query category rows (0: none)",
    )
    bench.add_argument("--seed", type=int)
    bench.add_argument(
        "--output",
        help="JSON path (default benchmarks/results/index-<backend>.json; the PNG goes beside it)",
    )
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=_benchmark_index)

    # defaults live in CascadeConfig
    cascade = benchmarks.add_parser(
        "cascade",
        help="ULIM's category cascade: item HR@50 and searched share against K, oracle, "
        "next-category HR@K beside the category baselines",
        description="Trains a ULIM within a small budget, then ranks every test target "
        "inside the top K categories of P(c) for each K (and the target's own category): "
        "item HR@50, NDCG@10 and the share of the catalogue searched; next-category HR@K / "
        "MRR of ULIM, 'repeat last category' and 'most frequent categories'. Writes "
        "STEM.json and STEM.png.",
    )
    cascade.add_argument("--dataset", help="a dataset with categories (default: taobao)")
    cascade.add_argument("--ks", type=_ints, help="categories searched, 0 = all: 1,2,5,10,20,0")
    for name, kind in (
        ("--hr-k", int),
        ("--d-model", int),
        ("--epochs", int),
        ("--max-len", int),
        ("--negatives", int),
        ("--train-seconds", float),
        ("--valid-users", int),
        ("--max-users", int),
        ("--batch-size", int),
        ("--seed", int),
    ):
        cascade.add_argument(name, type=kind)
    cascade.add_argument(
        "--preset",
        action=argparse.BooleanOptionalAction,
        help="train and rank as `hytrec benchmark accuracy` does on the dataset (its preset's "
        "training and history filter; --epochs, --train-seconds, --seed from here, no early "
        "stopping): the K = 10 row is that file's ULIM row",
    )
    cascade.add_argument(
        "--user-term", action=argparse.BooleanOptionalAction, help="train ULIM + user term"
    )
    cascade.add_argument(
        "--cross-interest",
        action=argparse.BooleanOptionalAction,
        help="train ULIM with the cross interest (with --user-term: the accuracy zoo's "
        "'ULIM + user term + cross interest')",
    )
    cascade.add_argument(
        "--versus",
        help="a model of the accuracy zoo ranking every item by one score (e.g. SASRec), "
        "trained alike; its stages are swapped with ULIM's (which stage loses to it)",
    )
    cascade.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    cascade.add_argument(
        "--output", help="report stem (default: benchmarks/results/ulim-cascade-DATASET)"
    )
    cascade.set_defaults(func=_benchmark_cascade)

    from hytrec.bench.stream_benchmark import add_parser as add_stream_benchmark

    add_stream_benchmark(benchmarks)

    from hytrec.bench.chaos import add_parser as add_chaos_benchmark

    add_chaos_benchmark(benchmarks)

    from hytrec.bench.backfill_benchmark import add_parser as add_backfill_benchmark

    add_backfill_benchmark(benchmarks)

    from hytrec.bench.state_store_benchmark import add_parser as add_state_store_benchmark

    add_state_store_benchmark(benchmarks)

    from hytrec.bench.leaderboard import add_parser as add_leaderboard

    add_leaderboard(benchmarks)

    from hytrec.bench.hpgr_cli import register as register_hpgr

    register_hpgr(commands, benchmarks)

    from hytrec.bench.hisac_cli import register as register_hisac

    register_hisac(commands, benchmarks)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _strs(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def _config(args: argparse.Namespace, default, quick):
    """The benchmark's config: its defaults (or its quick ones), with the given options."""
    from dataclasses import fields

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
    from hytrec.bench.efficiency import QUICK, EfficiencyConfig, run_efficiency

    return _run_benchmark(
        args, "efficiency", EfficiencyConfig(), QUICK, run_efficiency, progress=not args.no_progress
    )


def _benchmark_long_range(args: argparse.Namespace) -> int:
    from hytrec.bench.long_range import QUICK, LongRangeConfig, run_long_range

    if args.models_run:
        args.models_run = tuple(args.models_run)
    return _run_benchmark(
        args, "long-range", LongRangeConfig(), QUICK, run_long_range, progress=not args.no_progress
    )


def _benchmark_step(args: argparse.Namespace) -> int:
    from hytrec.bench.step_benchmark import QUICK, StepBenchConfig, run_step_benchmark

    return _run_benchmark(args, "step", StepBenchConfig(), QUICK, run_step_benchmark)


def _benchmark_kernels(args: argparse.Namespace) -> int:
    from hytrec.bench.kernel_benchmark import QUICK, KernelBenchConfig, run_kernel_benchmark

    return _run_benchmark(args, "kernels", KernelBenchConfig(), QUICK, run_kernel_benchmark)


def _benchmark_profile(args: argparse.Namespace) -> int:
    from hytrec.bench.profiling import QUICK, ProfileConfig, run_profile

    config = _config(args, ProfileConfig(), QUICK)
    output = (args.output or "benchmarks/results/profile-train-cpu").removesuffix(".json")
    run_profile(config, output)
    print(f"-> {output}.json, {output}.md and {output}.png")
    return 0


def _benchmark_cascade(args: argparse.Namespace) -> int:
    import torch

    from hytrec.bench.cascade import QUICK, CascadeConfig, run_cascade
    from hytrec.model.data import load_named

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    config = _config(args, CascadeConfig(), QUICK)
    output = (args.output or str(RESULTS / f"ulim-cascade-{config.dataset}")).removesuffix(".json")
    report = run_cascade(config, load_named(config.dataset), output)
    for row in report["rows"]:
        print(row)
    for name, metrics in report["next_category"].items():
        print(f"next category, {name}: HR@10 {metrics['HR@10']:.4f} MRR {metrics['MRR']:.4f}")
    for row in report.get("stage_swap", {}).get("rows", []):
        print(row)
    print(f"-> {output}.json and {output}.png")
    return 0


def _check_parity(args: argparse.Namespace) -> int:
    report = importlib.import_module(PARITY_REPORTS[args.model]).parity_report(seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from hytrec.bench.accuracy import baselines
    from hytrec.bench.reports import machine_info, provenance
    from hytrec.model.data import load_named
    from hytrec.model.evaluate import (
        EvalConfig,
        ModelReport,
        evaluate,
        leave_one_out,
        write_reports,
    )
    from hytrec.model.registry import load_model

    log = load_named(args.dataset, columns=column_map(args))
    split = leave_one_out(log)
    model = load_model(args.checkpoint)
    cfg = EvalConfig(filter_history=args.filter_history, max_len=args.max_len)
    report = evaluate(model, log, split, args.which, cfg)
    name = type(model).__name__ + (
        " + repeat head" if getattr(model, "repeat_head", None) is not None else ""
    )
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


def _benchmark_accuracy(args: argparse.Namespace) -> int:
    import torch

    from hytrec.bench.accuracy import PRESETS, own_data_preset, run_accuracy
    from hytrec.model.data import load_named

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    columns = column_map(args)
    if args.log and columns is not None:
        raise SystemExit("hytrec: --log is a saved EventLog; --columns reads --dataset's file")
    log = load_named(args.log or args.dataset, columns=columns)
    preset = PRESETS.get(args.dataset) or own_data_preset(args.dataset, log)
    tc = train_config(args, preset.train)
    # the presets' figures are committed; another file's go under runs/ (not tracked)
    if args.dataset in PRESETS:
        default = RESULTS / f"accuracy-{args.dataset}"
    else:
        default = Path("runs") / f"accuracy-{Path(args.dataset).name.split('.')[0] or 'data'}"
    stem = Path(args.output or default)
    seeds = tuple(int(v) for v in args.seeds.split(",")) if args.seeds else None
    run_accuracy(
        args.dataset,
        log,
        preset,
        stem,
        args.models,
        args.d_model,
        tc,
        seeds=seeds,
        semantic_ids=args.semantic_ids,
    )
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _head_cost(args: argparse.Namespace) -> int:
    import torch

    from hytrec.bench.head_benchmark import HeadCostConfig, run_head_cost
    from hytrec.model.data import load_named

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
    run_head_cost(cfg, load_named(cfg.dataset), output)
    print(f"-> {output}.json and {output}.png")
    return 0


def _head_calibration(args: argparse.Namespace) -> int:
    import torch

    from hytrec.bench.head_calibration import HeadCalibrationConfig, run_head_calibration

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    shifts = args.gate_shifts and tuple(float(x) for x in args.gate_shifts.split(","))
    given = {
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "heldout_fraction": args.heldout_fraction,
        "top_k": args.top_k,
        "held_out_events": args.held_out_events,
        "gate_shifts": shifts,
        "batch": args.batch,
        "seed": args.seed,
    }
    cfg = HeadCalibrationConfig(**{k: v for k, v in given.items() if v is not None})
    output = (args.output or "runs/head-calibration").removesuffix(".json")
    report = run_head_calibration(cfg, output)
    K = cfg.top_k

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    for name in ("in_period", "held_out"):
        part = report[name]
        print(
            f"{name} ({part['events']:,} events): hit@{K} model {f(part[f'model_hit@{K}'])}, "
            f"recency-frequency {f(part[f'recency_frequency_hit@{K}'])}, the model's own items "
            f"only {f(part[f'model_own_items_only_hit@{K}'])}; own items "
            f"{part['own_items_share_of_list']:.0%} of the list (mean P "
            f"{f(part['own_items_mean_p'])}, hit rate {f(part['own_items_hit_rate'])}), other "
            f"items mean P {f(part['other_items_mean_p'])}, hit rate "
            f"{f(part['other_items_hit_rate'])}; hit@{K} by gate shift "
            f"{part[f'hit@{K}_by_gate_shift']}"
        )
    print(f"-> {output}.json and {output}.png")
    return 0


def _demo(args) -> int:
    from dataclasses import fields
    from pathlib import Path

    from hytrec.bench.demo import DemoConfig, run_demo
    from hytrec.model.registry import spec
    from hytrec.model.repeat import RepeatConfig

    line = spec(args.model)
    if not line.streams:
        raise SystemExit(f"hytrec demo: model {args.model!r} does not stream")
    head = None if args.no_repeat_head else RepeatConfig()
    if line.name == "hytrec":
        model = replace(DemoConfig.model, repeat_head=head)
    else:
        takes_head = "repeat_head" in {f.name for f in fields(line.config)}
        model = line.config(d_model=64, **({"repeat_head": head} if takes_head else {}))
    configure_logging("warning")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # the producer's event-loop chatter
    run_demo(
        DemoConfig(
            dataset=args.dataset,
            columns=column_map(args),
            model=model,
            heldout_fraction=args.heldout_fraction,
            train_seconds=args.train_seconds,
            calibration_fraction=args.calibration_fraction,
            heldout_seconds=args.heldout_seconds,
            top_k=args.top_k,
            batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            device=args.device,
            output=Path(args.output),
        )
    )
    return 0


def _benchmark_index(args: argparse.Namespace) -> int:
    from hytrec.bench.index_benchmark import QUICK, BenchConfig, run_benchmark

    config = _config(args, BenchConfig(), QUICK)
    output = Path(args.output) if args.output else None
    if output is None:
        from hytrec.index.backend import select_backend

        output = RESULTS / f"index-{select_backend(config.backend)}.json"
    report = run_benchmark(config, output, progress=not args.no_progress)
    print(f"{len(report['rows'])} rows -> {output} and {output.with_suffix('.png')}")
    return 0
