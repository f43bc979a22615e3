"""`hytrec benchmark step`: streaming-step events/s against the memory-bandwidth roofline.

A streaming step is memory-bound: for each new event the server reads the user's state and
writes it back, and does O(state) arithmetic on it. So the ceiling on events/s is the
device's memory bandwidth divided by the bytes one event must move:

    kernel  (`kernels.tadn_step`, one TADN layer, U users with `run_length` events each)
            bytes/event = 2 * H * dk * dv * 4 / run_length          the state, read + written
                        + H * (2 dk + 2 dv + 3) * 4                 q, k, v, o, three gates
    model   (`HyTRec.step`, the whole serving step of the default model at `d_model`)
            bytes/event = 2 * state_bytes_per_user / run_length     every part of the state

(the weights are read once per call and ignored: they are small next to U states). The
roofline is the device's copy bandwidth measured in the same run (`dst.copy_(src)` of
`copy_mib` MiB, read + write counted); `roofline_fraction` = achieved / roofline. The pool
holds at least `pool_mib` MiB of states (and twice the largest batch), and every timed call
draws its users' slots afresh at random (untimed), so a call finds its states in memory,
not left in a cache by the call before (an H200's L2 holds 50 MB).

Each figure, the copy bandwidth included, is the median of timed calls after a warm-up
(`time_calls`, with a device synchronize on CUDA). On CPU only the PyTorch backend runs
(Triton needs a GPU, or its interpreter, which measures nothing); on CUDA every installed
backend runs.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hytrec.bench.parity import kernel_inputs
from hytrec.bench.reports import write_report
from hytrec.bench.timing import report_header, synchronized, time_calls
from hytrec.kernels import available_backends, tadn_step
from hytrec.model.device import resolve_device
from hytrec.model.hytrec import EventBatch, HyTRec, HyTRecConfig

FLOAT_BYTES = 4


@dataclass(frozen=True)
class StepBenchConfig:
    users: tuple[int, ...] = (1, 16, 256, 2048)  # U per call; a GPU run wants up to ~65536
    head_dims: tuple[int, ...] = (16, 32, 64, 128)  # dk = dv of the kernel rows
    heads: int = 2
    run_length: int = 1  # events per user per call
    d_model: int = 64  # of the model rows (HyTRec defaults otherwise)
    repeats: int = 10
    budget_s: float = 5.0  # per figure: stop repeating after this long (>= 1 timed call)
    copy_mib: int = 512  # the bandwidth probe's buffer
    pool_mib: int = 1024  # the state pool holds at least this much (far beyond the caches)
    device: str = "auto"  # auto: CUDA when present
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.users or min(self.users) < 1 or self.run_length < 1:
            raise ValueError("StepBenchConfig: users and run_length must be >= 1")


QUICK = StepBenchConfig(
    users=(1, 8), head_dims=(8, 16), repeats=2, budget_s=0.5, copy_mib=8, pool_mib=8
)


def kernel_bytes_per_event(heads: int, head_dim: int, run_length: int) -> int:
    state = 2 * heads * head_dim * head_dim * FLOAT_BYTES  # read + written back
    inputs = heads * (2 * head_dim + 2 * head_dim + 3) * FLOAT_BYTES  # q, k, v, o, gates
    return state // run_length + inputs


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def copy_bandwidth_gb_s(device: torch.device, mib: int, repeats: int, budget_s: float) -> float:
    """The median of `repeats` copies of `mib` MiB, read + write bytes per second, in GB/s."""
    src = torch.ones(mib * 2**20 // FLOAT_BYTES, device=device)
    dst = torch.empty_like(src)
    times = time_calls(synchronized(device, lambda: dst.copy_(src)), max(repeats, 3), budget_s)
    return 2 * src.numel() * FLOAT_BYTES / statistics.median(times) / 1e9


def pool_slots(cfg: StepBenchConfig, bytes_per_user: int) -> int:
    return max(2 * max(cfg.users), cfg.pool_mib * 2**20 // bytes_per_user)


def _events_per_s(cfg, device, users, num_slots, generator, step) -> float:
    """users * run_length / median seconds of `step(slots)`, fresh random slots per call."""
    slots = torch.empty(0)

    def draw():
        nonlocal slots
        slots = torch.randperm(num_slots, generator=generator)[:users].to(device)

    call = synchronized(device, lambda: step(slots))
    times = time_calls(call, cfg.repeats, cfg.budget_s, setup=synchronized(device, draw))
    return users * cfg.run_length / statistics.median(times)


def _kernel_events_per_s(cfg, device, backend, users, head_dim, generator) -> float:
    H, M = cfg.heads, cfg.run_length
    num_slots = pool_slots(cfg, H * head_dim * head_dim * FLOAT_BYTES)
    pool = torch.zeros(num_slots, H, head_dim, head_dim, device=device)
    x = {
        n: t.to(device)
        for n, t in kernel_inputs(users, M, H, head_dim, head_dim, generator).items()
    }
    x.pop("initial_state")
    lengths = torch.full((users,), M, device=device)

    def step(slots):
        tadn_step(pool, slots, lengths, **x, backend=backend)

    return _events_per_s(cfg, device, users, num_slots, generator, step)


def _model_events_per_s(cfg, model, state, device, users, generator) -> float:
    M, n = cfg.run_length, model.cfg.num_items

    def ids(high):
        return torch.randint(1, high, (users, M), generator=generator).to(device)

    ts = 1_500_000_000 + torch.arange(M).repeat(users, 1).to(device) * 60
    batch = EventBatch(
        ids(n),
        ids(model.cfg.num_categories),
        ids(4),
        ts,
        lengths=torch.full((users,), M, device=device),
    )
    with torch.inference_mode():
        return _events_per_s(
            cfg,
            device,
            users,
            state.num_slots,
            generator,
            lambda slots: model.step(state, slots, batch),
        )


def run_step_benchmark(cfg: StepBenchConfig, output: str | Path | None = None) -> dict:
    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    peak = copy_bandwidth_gb_s(device, cfg.copy_mib, cfg.repeats, cfg.budget_s)
    backends = available_backends()["step"] if device.type == "cuda" else ["torch"]
    torch.manual_seed(cfg.seed)
    model = HyTRec(HyTRecConfig(d_model=cfg.d_model, dropout=0.0)).to(device).eval()
    state = model.new_state(pool_slots(cfg, model.state_bytes_per_user()), device)
    model_bytes = 2 * model.state_bytes_per_user() // cfg.run_length

    rows = []
    jobs = [("kernel", b, u, d) for b in backends for d in cfg.head_dims for u in cfg.users]
    jobs += [("model", "auto", u, None) for u in cfg.users]
    for level, backend, users, head_dim in tqdm(jobs, desc="step benchmark", unit="row"):
        try:
            if level == "kernel":
                rate = _kernel_events_per_s(cfg, device, backend, users, head_dim, generator)
                moved = kernel_bytes_per_event(cfg.heads, head_dim, cfg.run_length)
                state_bytes = cfg.heads * head_dim * head_dim * FLOAT_BYTES
            else:
                rate = _model_events_per_s(cfg, model, state, device, users, generator)
                moved, state_bytes = model_bytes, model.state_bytes_per_user()
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory at the largest U
            rows.append({"level": level, "backend": backend, "users": users, "error": str(error)})
            continue
        achieved = rate * moved / 1e9
        rows.append(
            {
                "level": level,
                "backend": backend,
                "users": users,
                "heads": cfg.heads if level == "kernel" else model.cfg.long_heads,
                "head_dim": head_dim,
                "state_bytes_per_user": state_bytes,
                "bytes_per_event": moved,
                "events_per_s": _sig(rate),
                "achieved_gb_s": _sig(achieved),
                "roofline_events_per_s": _sig(peak * 1e9 / moved),
                "roofline_fraction": _sig(achieved / peak),
            }
        )
    report = {
        **report_header("step", cfg, output, device),
        "load_average_1m": os.getloadavg()[0],
        "config": asdict(cfg),
        "copy_bandwidth_gb_s": _sig(peak),
        "model_state_bytes_per_user": model.state_bytes_per_user(),
        "best_roofline_fraction": max((r.get("roofline_fraction", 0) for r in rows), default=0),
        "rows": rows,
    }
    print(format_table(report), flush=True)
    if output is not None:
        write_report(report, output, plot)
    return report


def format_table(report: dict) -> str:
    lines = [
        f"{report['device']}: copy bandwidth {report['copy_bandwidth_gb_s']:,.1f} GB/s",
        "level  | backend | users | head dim | bytes/event | events/s | GB/s | of roofline",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['level']} {r['backend']} U={r['users']}: {r['error']}")
            continue
        lines.append(
            f"{r['level']:<6} | {r['backend']:<7} | {r['users']:>5} | {r['head_dim'] or '-':>8} | "
            f"{r['bytes_per_event']:>11,} | {r['events_per_s']:>10,.0f} | "
            f"{r['achieved_gb_s']:>6.2f} | {r['roofline_fraction']:>6.1%}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: events/s vs users per state size; right: the fraction of the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in report["rows"]:
        if "error" not in r:
            size = f"{r['state_bytes_per_user'] / 1024:g} KiB"
            label = f"{r['level']} {r['backend']}, state {size}/user"
            series.setdefault(label, []).append(r)
    for label, rows in series.items():
        users = [r["users"] for r in rows]
        left.plot(users, [r["events_per_s"] for r in rows], "o-", label=label)
        right.plot(users, [r["roofline_fraction"] for r in rows], "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="users per step call", ylabel="events / s")
    left.set_title("streaming step throughput")
    right.set(xscale="log", xlabel="users per step call", ylabel="achieved / copy bandwidth")
    right.set_title(f"fraction of the roofline ({report['copy_bandwidth_gb_s']:,.0f} GB/s copy)")
    right.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(report["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
