"""`hytrec train`, `hytrec models` and `hytrec data`: the model package's subcommands, and
the dataset options every command that reads events shares (`dataset_argument`,
`data_file_arguments`, `column_map`: pass its result to `data.load_named`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path


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
        "calibrate-gate",
        help="fit a checkpoint's repeat-head gate bias on events after its training period",
        description="Rank each event from --since on (each after every earlier event of its "
        "user) under shifts of the repeat head's gate logit; save the shift with the most "
        "hits@K into the checkpoint (`hytrec demo` does this on the last tenth of its "
        "training span). The events must come after every event the model trained on.",
    )
    dataset_argument(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a repeat head")
    p.add_argument(
        "--since",
        required=True,
        help="the first time calibrated on: unix seconds or an ISO date/time (UTC if no zone)",
    )
    p.add_argument("--top-k", type=int, default=20, help="hit@K, the criterion")
    p.add_argument(
        "--max-events", type=int, default=10_000, help="a seeded sample of them (0: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_calibrate_gate)

    p = commands.add_parser(
        "models",
        help="the registered models: name, config, streaming, index query, fidelity",
    )
    p.set_defaults(func=_models)

    data = commands.add_parser(
        "data", help="inspect an event file (your own CSV/TSV) or convert it to an EventLog"
    ).add_subparsers(dest="data", required=True, metavar="ACTION")
    for action, text in (
        ("inspect", "print what a file holds as --columns reads it"),
        ("convert", "write a file as a saved EventLog (what --dataset STEM reads fastest)"),
    ):
        p = data.add_parser(
            action,
            help=text,
            description=f"{text[0].upper()}{text[1:]}: counts, events per user, the time "
            "span, the bad rows with their line numbers and how each behaviour word mapped.",
        )
        p.add_argument("source", metavar="FILE", help=DATASET_HELP)
        data_file_arguments(p)
        if action == "convert":
            p.add_argument(
                "--out", required=True, help="EventLog stem: writes STEM.npz and STEM.vocab.json"
            )
        p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
        p.set_defaults(func=_data)


DATASET_HELP = (
    "a dataset name (taobao, foursquare, beauty, sports, ml100k, ml-latest), a saved "
    "EventLog (STEM), or a file: a CSV/TSV (gzipped or not) or Parquet read through --columns"
)


def dataset_argument(p: argparse.ArgumentParser) -> None:
    """--dataset (required) and the options that read a file of one's own."""
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    data_file_arguments(p)


def data_file_arguments(p: argparse.ArgumentParser) -> None:
    """--columns and the options that go with it (`ColumnMap.from_options`)."""
    g = p.add_argument_group("a file of your own (CSV/TSV, gzipped or not, or Parquet)")
    g.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="which columns hold what: user=COL,item=COL,ts=COL required, behavior=COL and "
        "category=COL optional; header names, or 0-based field numbers with --no-header",
    )
    g.add_argument(
        "--behaviors",
        metavar="STAGE=WORD,...;...",
        help="how your behaviour words map to the funnel stages (click, redirect, "
        "activation, wake_up, product_click, stay, collection, add_to_cart, payment), e.g. "
        "'product_click=view;add_to_cart=basket;payment=order'; words not listed try the "
        "built-in aliases (pv, view, fav, cart, buy, purchase, ...)",
    )
    g.add_argument(
        "--unknown-behavior",
        metavar="error|skip|STAGE",
        help="a behaviour word nothing maps: error (the default: stop and list every such "
        "word), skip (leave its rows out) or a stage such as click",
    )
    g.add_argument(
        "--time-format",
        help="unix (seconds, the default), unix-ms, iso, or a strptime pattern such as "
        "'%%d/%%m/%%Y %%H:%%M'; a time without a zone is UTC",
    )
    g.add_argument(
        "--delimiter", help="field separator (default: tab for *.tsv, else comma; 'tab' = tab)"
    )
    g.add_argument(
        "--no-header",
        action="store_true",
        help="the file has no header line: --columns gives 0-based field numbers",
    )


def column_map(args: argparse.Namespace):
    """The `ColumnMap` of --columns and its options, or None without --columns (a dataset
    name, a saved EventLog or a file of a known format)."""
    from hytrec.model.data import ColumnMap

    options = {
        "--behaviors": args.behaviors,
        "--unknown-behavior": args.unknown_behavior,
        "--time-format": args.time_format,
        "--delimiter": args.delimiter,
        "--no-header": args.no_header or None,
    }
    if args.columns is None:
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            raise SystemExit(f"hytrec: {', '.join(given)} go with --columns")
        return None
    try:
        return ColumnMap.from_options(
            args.columns,
            behaviors=args.behaviors,
            delimiter=args.delimiter,
            header=not args.no_header,
            time_format=args.time_format or "unix",
            unknown_behavior=args.unknown_behavior or "error",
        )
    except ValueError as err:
        raise SystemExit(f"hytrec: {err}") from None


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
    "init_from": str,
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
    log = load_named(args.dataset, columns=column_map(args))
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


def unix_seconds(text: str) -> int:
    """Unix seconds from "1512345678" or an ISO date/time ("2017-12-02", "...T20:47"; UTC
    when it has no zone)."""
    from hytrec.model.data import parse_time

    for time_format in ("unix", "iso"):
        try:
            return parse_time(text, time_format)
        except ValueError:
            pass
    raise SystemExit(f"hytrec: --since {text!r} is neither unix seconds nor an ISO date")


def _calibrate_gate(args: argparse.Namespace) -> int:
    from hytrec.model.calibration import GateCalibrationConfig, calibrate_checkpoint
    from hytrec.model.data import load_named

    log = load_named(args.dataset, columns=column_map(args))
    cfg = GateCalibrationConfig(
        top_k=args.top_k, max_events=args.max_events or None, seed=args.seed
    )
    try:
        report = calibrate_checkpoint(args.checkpoint, log, unix_seconds(args.since), cfg)
    except ValueError as err:  # no head, no events, another vocabulary: the message says
        print(f"hytrec calibrate-gate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    from hytrec.model.registry import describe

    print(json.dumps(describe(), indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    """`hytrec data inspect|convert`: the summary, and for convert the saved EventLog. Inspect
    reports unmapped behaviour words instead of stopping on them."""
    from hytrec.model.data import load_named_with_report, summary, summary_text

    columns = column_map(args)
    stops = columns is not None and columns.unknown_behavior == "error"
    if args.data == "inspect" and stops:  # list the unmapped words rather than stop on them
        columns = replace(columns, unknown_behavior="skip")
    events, report = load_named_with_report(args.source, columns, cache=False)
    described = summary(events, report)
    print(summary_text(described))
    if args.data == "inspect" and stops and described["unmapped_words"]:
        print(
            "convert, train and the other commands stop on the unmapped words until "
            "--behaviors or --unknown-behavior says what they are",
            file=sys.stderr,
        )
    if args.data == "convert":
        stem = Path(args.out)
        events.save(stem)
        described["saved"] = str(stem)
        print(
            f"-> {stem.with_suffix('.npz')} and {stem.with_suffix('.vocab.json')} "
            f"(--dataset {stem})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(described, f, indent=2)
            f.write("\n")
    return 0
