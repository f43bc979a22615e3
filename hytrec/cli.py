"""The `hytrec` command line: one entry point, subcommands registered by each package."""

import argparse
import importlib
import sys

# Each module defines `register(commands, benchmarks)`: `commands` takes top-level
# subcommands (`hytrec worker`), `benchmarks` those under `hytrec benchmark`. Every parser
# sets a `func(args) -> int` default.
COMMAND_MODULES = (
    "hytrec.model.cli",
    "hytrec.index.cli",
    "hytrec.stream.cli",
    "hytrec.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hytrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    benchmark = commands.add_parser(
        "benchmark", help="measure and write JSON under benchmarks/results/"
    )
    benchmarks = benchmark.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hytrec.model.data import DataError, DatasetNotFoundError

    try:
        return int(args.func(args) or 0)
    except (DataError, DatasetNotFoundError) as err:  # bad input: its message says where
        print(f"hytrec {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
