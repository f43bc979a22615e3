"""Benchmark reports: where a figure came from (commit, processor, GPU), the command that
reruns it, and its JSON with a PNG beside it. Light imports only."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

RESULTS_SPEC = ":(top,exclude)benchmarks/results"
# the checkout this package runs from (not the caller's working directory)
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class ProvenanceWarning(UserWarning):
    """Figures that cannot be tied to a clean, existing commit."""


def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit of the code that runs: HEAD of the checkout holding this package, with
    "-dirty" when tracked files differ from it or untracked files (not ignored) are present,
    benchmark results excepted (a run of several benchmarks rewrites results, not code);
    "UNKNOWN (git failed: ...)" when git cannot say (no checkout, no git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--verify", "HEAD^{commit}")
        dirty = git("status", "--porcelain", "--untracked-files=normal", "--", ":/", RESULTS_SPEC)
    except OSError as error:
        return f"UNKNOWN (git failed: {error})"
    except subprocess.CalledProcessError as error:
        reason = (error.stderr or "").strip().splitlines() or [f"exit {error.returncode}"]
        return f"UNKNOWN (git failed: {reason[0]})"
    return head + ("-dirty" if dirty else "")


def provenance(root: Path = SOURCE_ROOT) -> dict:
    """{"git_commit", "provenance_ok"} for a report. Only a clean checkout's HEAD ties the
    figures to committed code; anything else is marked false and warned about (the CLI
    prints the warning), never left out or recorded as None."""
    commit = git_commit(root)
    ok = not commit.startswith("UNKNOWN") and not commit.endswith("-dirty")
    if not ok:
        warnings.warn(
            f"figures from {commit}: not a clean commit, so they cannot be reproduced from "
            "one (commit first, then run the benchmark from a clean tree)",
            ProvenanceWarning,
            stacklevel=2,
        )
    return {"git_commit": commit, "provenance_ok": ok}


def cpu_info() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields (empty off Linux)."""
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if info.exists():
        for line in info.read_text().split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def cpu_name() -> str:
    """e.g. 'AMD EPYC (family 26 model 2)': a VM may hide the exact model, but family and
    model still tell two processors apart."""
    import platform

    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def gpu_names() -> list[str]:
    """The CUDA devices torch sees (empty without torch imported, or without a GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_info() -> dict:
    """The machine a figure came from, read from the machine (never typed in); on a shared
    machine the load changes every figure."""
    import os
    import platform

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpus": len(os.sched_getaffinity(0)),
        "gpus": gpu_names(),
        "load_average_1m": os.getloadavg()[0],
    }


def quiet_broker_clients() -> None:
    """Warnings and up on the console, and only errors from the Kafka clients: a benchmark
    that starts and stops brokers and workers would print their reconnect chatter."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    for client in ("kafka", "aiokafka"):
        logging.getLogger(client).setLevel(logging.ERROR)


def command_line(benchmark: str, config, output: str | Path | None = None) -> str:
    """`hytrec benchmark BENCHMARK --field value ...` for every set field of the config
    dataclass, as the benchmark's options take them (a flag for a bool, numbers
    comma-separated, names one word each, shell-quoted): the command that reruns exactly
    this config (`tests/bench/test_reports.py` parses each benchmark's back)."""
    parts = [f"hytrec benchmark {benchmark}"]
    for field in fields(config):
        value, option = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(option if value else "--no-" + option[2:])
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            parts.append(" ".join([option, *map(shlex.quote, value)]))
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            # "--gate-shifts -1.0,0.0" would read the value as an option
            parts.append(
                f"{option}={shlex.quote(text)}"
                if text.startswith("-")
                else f"{option} {shlex.quote(text)}"
            )
    if output is not None:
        parts.append(f"--output {shlex.quote(str(output))}")
    return " ".join(parts)


def write_report(report: dict, output: str | Path, plot: Callable[[dict, Path], None]) -> None:
    """OUTPUT.json and OUTPUT.png (`plot(report, path)`); OUTPUT may end in .json."""
    stem = Path(output)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".png") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, stem.with_name(stem.name + ".png"))
