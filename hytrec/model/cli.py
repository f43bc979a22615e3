"""`hytrec` subcommands of the model package."""


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec` and `hytrec benchmark`."""
