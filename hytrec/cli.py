"""The `hytrec` command line: one entry point, subcommands registered by each package."""
import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, adding its subcommands with a `func` default.
COMMAND_MODULES = (
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hytrec", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
