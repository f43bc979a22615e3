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


def _check_parity(args: argparse.Namespace) -> int:
    from hytrec.model.parity import parity_report

    report = parity_report(seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
