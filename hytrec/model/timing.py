"""Timing for the benchmarks: repeated calls after a warm-up, GPU work waited for, and
which device a figure was taken on."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hytrec.model.reports import cpu_name


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when present, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
