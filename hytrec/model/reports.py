"""Benchmark reports: where a figure came from (commit, processor), the command that
reruns it, and its JSON with a PNG beside it. Light imports only."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

RESULTS_SPEC = ":(top,exclude)benchmarks/results"


def git_commit() -> str | None:
    """HEAD, with "-dirty" when tracked files other than benchmark results differ from it
    (a run of several benchmarks rewrites results, not code); None outside a checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", RESULTS_SPEC],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


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


def machine_info() -> dict:
    """The machine a figure came from; on a shared machine the load changes every figure."""
    import os
    import platform

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m": os.getloadavg()[0],
    }


def command_line(benchmark: str, config, output: str | Path | None = None) -> str:
    """`hytrec benchmark BENCHMARK --field value ...` for every set field of the config
    dataclass (tuples comma-separated): the command that reruns exactly this config."""
    parts = [f"hytrec benchmark {benchmark}"]
    for field in fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts.append(f"--{field.name.replace('_', '-')} {value}")
    if output is not None:
        parts.append(f"--output {output}")
    return " ".join(parts)


def write_report(report: dict, output: str | Path, plot: Callable[[dict, Path], None]) -> None:
    """OUTPUT.json and OUTPUT.png (`plot(report, path)`); OUTPUT may end in .json."""
    stem = Path(output)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".png") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, stem.with_name(stem.name + ".png"))
