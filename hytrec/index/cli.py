"""`hytrec` subcommands of the index package."""


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec` and `hytrec benchmark`."""
