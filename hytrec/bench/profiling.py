"""`hytrec benchmark profile`: where one HyTRec training step and one streaming step spend
their time, by module and by operator (torch profiler, CPU).

The training step is what `hytrec benchmark efficiency` times: forward + backward of the
full-softmax next-item loss over L events of one user (dropout off). The streaming step is
one `HyTRec.step` of one event for `step_users` users. Each is run once untimed (warm-up),
then once under the profiler.

By module: every operator is charged to the innermost module whose `forward` ran it
(forward hooks open a profiler scope per module); a backward node is charged to the module
whose forward operator created it (autograd's sequence numbers link the two). Operators
outside any submodule are `HyTRec (own)`: time features, the short branch's windows, the
read-outs; `loss` is the next-item loss. By operator: the profiler's self time per aten
operator, forward and backward together. Times are self CPU times under the profiler,
which adds a few microseconds per operator: read the shares, not the absolute figures.
Writes STEM.json, STEM.md (the tables) and STEM.png.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from hytrec.bench.parity import pad_batch, random_user
from hytrec.bench.reports import write_report
from hytrec.bench.timing import report_header, time_calls
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.model.train import next_item_loss

SCOPE = "module::"
OWN = "HyTRec (own)"
LOSS = "loss"


@dataclass(frozen=True)
class ProfileConfig:
    lengths: tuple[int, ...] = (100, 1000, 12000)
    d_model: int = 64  # HyTRec's other fields are its defaults, as in `benchmark efficiency`
    batch: int = 1  # rows of L events in the training step
    step_users: int = 1  # users of the streaming step (one event each)
    top_ops: int = 12  # operators listed per length
    repeats: int = 3  # unprofiled timings (the streaming step: 10x as many)
    threads: int | None = 1
    device: str = "cpu"  # the profiler is set up for CPU activities only
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError("ProfileConfig: lengths must be >= 2")
        if min(self.batch, self.step_users, self.top_ops) < 1:
            raise ValueError("ProfileConfig: batch, step_users and top_ops must be >= 1")
        if self.device != "cpu":
            raise ValueError("ProfileConfig: only device 'cpu' is profiled")

    def hytrec(self, dropout: float) -> HyTRecConfig:
        return HyTRecConfig(d_model=self.d_model, dropout=dropout)


QUICK = ProfileConfig(lengths=(8, 40), d_model=16, top_ops=5, repeats=1)


class _StepScope:
    """A module's `step` (the serving form, which hooks do not see) inside a profiler scope;
    `remove` restores the method."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module = module

        def step(*args, method=module.step, **kwargs):
            with record_function(SCOPE + name):
                return method(*args, **kwargs)

        module.step = step  # an instance attribute shadows the method

    def remove(self) -> None:
        del self.module.step


def _module_scopes(model: torch.nn.Module) -> list:
    """Open a profiler scope named after each submodule around its forward (and its `step`,
    if it has one); returns handles to remove when done."""
    open_scopes: dict[int, list] = {}
    handles: list = []

    def enter(module, _args):
        scope = record_function(SCOPE + module.profile_name)
        scope.__enter__()
        open_scopes.setdefault(id(module), []).append(scope)

    def leave(module, _args, _out):
        open_scopes[id(module)].pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        if name:
            module.profile_name = name
            handles += [
                module.register_forward_pre_hook(enter),
                module.register_forward_hook(leave),
            ]
            if callable(getattr(module, "step", None)):
                handles.append(_StepScope(module, name))
    return handles


def _scope_of(event) -> str:
    """The innermost module scope (or the loss scope) around a profiler event."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(SCOPE):
            return parent.name.removeprefix(SCOPE)
        if parent.name == LOSS:
            return LOSS
        parent = parent.cpu_parent
    return OWN


def _in_backward(event) -> bool:
    while event is not None:
        if event.name.startswith("autograd::engine::evaluate_function"):
            return True
        event = event.cpu_parent
    return False


def _by_module(events) -> dict[str, dict[str, float]]:
    """{module: {"forward_ms", "backward_ms"}} from one profiled step."""
    forward: Counter = Counter()
    backward: Counter = Counter()
    created_in: dict[int, str] = {}
    for e in events:
        if _in_backward(e):
            continue
        scope = _scope_of(e)
        forward[scope] += e.self_cpu_time_total
        if e.sequence_nr >= 0:
            created_in.setdefault(e.sequence_nr, scope)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            backward[created_in.get(e.sequence_nr, OWN)] += e.cpu_time_total
    return {
        name: {"forward_ms": forward[name] / 1e3, "backward_ms": backward[name] / 1e3}
        for name in sorted(forward.keys() | backward.keys())
    }


def _by_operator(table, top: int) -> list[dict]:
    ops = [e for e in table if e.key.startswith("aten::")]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    return [
        {"operator": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
        for e in ops[:top]
    ]


def _profiled(model: torch.nn.Module, fn, repeats: int) -> tuple[object, float, float]:
    """(profile of one call, its profiled ms, the median wall ms of `repeats` unprofiled
    calls after a warm-up)."""
    wall_ms = 1e3 * statistics.median(time_calls(fn, repeats, budget_s=60.0))
    handles = _module_scopes(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return prof, sum(e.self_cpu_time_total for e in prof.events()) / 1e3, wall_ms


def profile_training_step(model: HyTRec, L: int, cfg: ProfileConfig) -> dict:
    user = random_user(L + 1, model.cfg, torch.Generator().manual_seed(cfg.seed))
    inputs = pad_batch([user.run(0, L)] * cfg.batch)
    target = pad_batch([user.run(1, L + 1)] * cfg.batch).item.reshape(-1)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()

    def one_step():
        model.zero_grad(set_to_none=True)
        u = model(inputs).reshape(-1, model.cfg.d_model)
        with record_function(LOSS):
            loss = next_item_loss(model, u, target, 0, generator)
        loss.backward()

    prof, total_ms, wall_ms = _profiled(model, one_step, cfg.repeats)
    model.zero_grad(set_to_none=True)
    return {
        "length": L,
        "wall_ms": wall_ms,
        "total_ms": total_ms,
        "operators": _by_operator(prof.key_averages(), cfg.top_ops),
        "modules": _by_module(prof.events()),
    }


def profile_streaming_step(model: HyTRec, cfg: ProfileConfig) -> dict:
    model.eval()
    U = cfg.step_users
    state = model.new_state(U)
    slots = torch.arange(U)
    generator = torch.Generator().manual_seed(cfg.seed)
    users = [random_user(2, model.cfg, generator) for _ in range(U)]
    model.step(state, slots, pad_batch([u.run(0, 1) for u in users]))  # one event already held
    batch = pad_batch([u.run(1, 2) for u in users])
    saved = state.read(slots)

    def one_step():
        state.write(slots, saved)
        model.step(state, slots, batch)

    prof, total_ms, wall_ms = _profiled(model, one_step, 10 * cfg.repeats)
    return {
        "users": U,
        "wall_ms": wall_ms,
        "total_ms": total_ms,
        "operators": _by_operator(prof.key_averages(), cfg.top_ops),
        "modules": _by_module(prof.events()),
    }


def group_of(module: str) -> str:
    """Readable groups: `long_blocks.0.mixer` stays, `long_blocks.0.mixer.q_proj` joins its
    mixer, embeddings are one group."""
    if module.endswith("_emb"):
        return "embeddings"
    parts = module.split(".")
    if parts[0] in ("long_blocks", "short_blocks") and len(parts) > 3:
        return ".".join(parts[:3])
    return module if len(parts) < 3 else ".".join(parts[:3])


def grouped(modules: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, times in modules.items():
        g = out.setdefault(group_of(name), {"forward_ms": 0.0, "backward_ms": 0.0})
        g["forward_ms"] += times["forward_ms"]
        g["backward_ms"] += times["backward_ms"]
    return out


def run_profile(cfg: ProfileConfig, output: str | Path | None = None) -> dict:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_model = HyTRec(cfg.hytrec(dropout=0.0))
    torch.manual_seed(cfg.seed)
    serve_model = HyTRec(cfg.hytrec(dropout=HyTRecConfig.dropout)).eval()
    training = []
    for L in sorted(set(cfg.lengths)):
        row = profile_training_step(train_model, L, cfg)
        row["modules"] = grouped(row["modules"])
        training.append(row)
    streaming = profile_streaming_step(serve_model, cfg)
    streaming["modules"] = grouped(streaming["modules"])
    report = {
        **report_header("profile", cfg, output, torch.device(cfg.device)),
        "load_average_1m": os.getloadavg()[0],
        "config": asdict(cfg),
        "method": __doc__.split("\n\n", 1)[1].strip(),
        "training": training,
        "streaming": streaming,
    }
    text = format_markdown(report)
    print(text, flush=True)
    if output is not None:
        write_report(report, output, plot)
        Path(str(output).removesuffix(".json") + ".md").write_text(text)
    return report


def _module_table(modules: dict[str, dict[str, float]], total_ms: float) -> list[str]:
    lines = ["| module | forward ms | backward ms | share |", "|---|---:|---:|---:|"]
    rows = sorted(modules.items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"]))
    for name, t in rows:
        both = t["forward_ms"] + t["backward_ms"]
        if both < 0.005 * total_ms:
            continue
        lines.append(
            f"| {name} | {t['forward_ms']:.1f} | {t['backward_ms']:.1f} | "
            f"{100 * both / total_ms:.0f} % |"
        )
    return lines


def _operator_table(operators: list[dict], total_ms: float) -> list[str]:
    lines = ["| operator | self ms | calls | share |", "|---|---:|---:|---:|"]
    for op in operators:
        lines.append(
            f"| `{op['operator']}` | {op['self_ms']:.1f} | {op['calls']} | "
            f"{100 * op['self_ms'] / total_ms:.0f} % |"
        )
    return lines


def format_markdown(report: dict) -> str:
    lines = [
        "# Where a HyTRec step spends its time (CPU)",
        "",
        f"`{report['command']}` at {report['git_commit']}, {report['date']}, "
        f"{report['device']}, load average {report['load_average_1m']:.1f} "
        f"(torch {report['torch']}). Generated by `hytrec/bench/profiling.py`; times are "
        "self CPU times under the profiler: read the shares.",
        "",
    ]
    for row in report["training"]:
        lines += [
            f"## Training step, L = {row['length']:,}: forward + backward "
            f"{row['wall_ms']:.1f} ms ({row['total_ms']:.1f} ms under the profiler)",
            "",
            *_module_table(row["modules"], row["total_ms"]),
            "",
            *_operator_table(row["operators"], row["total_ms"]),
            "",
        ]
    s = report["streaming"]
    lines += [
        f"## Streaming step, {s['users']} user(s), one event each: {s['wall_ms']:.2f} ms "
        f"({s['total_ms']:.2f} ms under the profiler)",
        "",
        *_module_table(s["modules"], s["total_ms"]),
        "",
        *_operator_table(s["operators"], s["total_ms"]),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Share of each module group in the training step, one bar per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["training"]
    totals = Counter()
    for row in rows:
        for name, t in row["modules"].items():
            totals[name] += (t["forward_ms"] + t["backward_ms"]) / row["total_ms"]
    names = [n for n, _ in totals.most_common(9)]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = [f"L={r['length']:,}" for r in rows]
    bottom = [0.0] * len(rows)
    for name in [*names, "other"]:
        shares = []
        for row in rows:
            t = row["modules"]
            if name == "other":
                rest = sum(
                    v["forward_ms"] + v["backward_ms"] for n, v in t.items() if n not in names
                )
                shares.append(100 * rest / row["total_ms"])
            else:
                v = t.get(name, {"forward_ms": 0.0, "backward_ms": 0.0})
                shares.append(100 * (v["forward_ms"] + v["backward_ms"]) / row["total_ms"])
        ax.bar(labels, shares, bottom=bottom, label=name)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    ax.set(ylabel="% of the profiled training step", title="HyTRec training step by module")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"{report['device']}, {report['git_commit'][:12]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
