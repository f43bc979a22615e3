"""Timing for the benchmarks: repeated calls after a warm-up, GPU work waited for, and
which device a figure was taken on."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from hytrec.bench.reports import command_line, cpu_name, provenance


def time_calls(
    fn: Callable[[], object],
    repeats: int,
    budget_s: float,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Wall seconds of up to `repeats` calls of `fn` after one untimed warm-up call
    (first-call allocations and lazy init are not what we measure); `setup`, if any, runs
    untimed before every call. Stops early once `budget_s` is spent, after at least one
    timed call."""
    times: list[float] = []
    began = None
    while len(times) < repeats:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if began is None:  # the warm-up call
            began = time.perf_counter()
            continue
        times.append(elapsed)
        if time.perf_counter() - began > budget_s:
            break
    return times


def synchronized(device: torch.device, fn: Callable[[], object]) -> Callable[[], object]:
    """`fn`, waiting for the device's queued work before returning (GPU calls are
    asynchronous: without this a timer measures the launch, not the work)."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def device_name(device: torch.device | None = None) -> str:
    """e.g. 'cpu: AMD EPYC (family 25 model 17), 2 threads' (a VM may hide the exact
    model) or 'cuda: NVIDIA H200'."""
    if device is not None and device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"cpu: {cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"


def report_header(benchmark: str, config, output: str | Path | None, device) -> dict:
    """What every benchmark report starts with: what ran, where, when, from which commit,
    and the command that reruns it."""
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "command": command_line(benchmark, config, output),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "torch": torch.__version__,
    }
