"""`hytrec benchmark kernels`: the parallel (training) TADN forms side by side, with
flash-linear-attention's gated delta rule as the public reference point.

With erase = 1 the TADN recurrence is exactly the gated delta rule (kernels/reference.py),
so fla's `chunk_gated_delta_rule(q, k, v, g=log_decay, beta, scale=1)` computes the same
read-outs and final state from the same inputs; every row here uses erase = 1 so that all
backends solve one problem. For each sequence length T (batch B, H heads of dk = dv):

    forward_ms, train_ms   medians of the forward, and of forward + backward (every input
                           and the initial state get gradients)
    train_tokens_per_s     B * T / train time
    max_abs_diff_vs_reference  the read-outs' and final state's largest difference from
                           the oracle (`kernels.reference.naive_tadn`, the token-by-token
                           recurrence in float64) on the same inputs: each backend's own
                           arithmetic error, the PyTorch form's included

Backends: PyTorch chunked (always), Triton chunked (CUDA with Triton installed), fla (CUDA
with `flash-linear-attention` importable). On CPU only PyTorch runs: Triton needs a GPU (its
interpreter measures nothing) and fla's chunked kernel does not run on CPU. fla refuses
fp32 inputs: run with `--dtype bfloat16` to compare with it (every backend then gets the
same bf16 q, k, v; gates and states stay fp32). A backend that fails gets a row with its
error instead of figures, and the others still run.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from hytrec.bench.parity import kernel_inputs
from hytrec.bench.reports import write_report
from hytrec.bench.timing import report_header, synchronized, time_calls
from hytrec.kernels import available_backends, naive_tadn, tadn_parallel
from hytrec.model.device import resolve_device


@dataclass(frozen=True)
class KernelBenchConfig:
    lengths: tuple[int, ...] = (256, 1024, 4096)
    batch: int = 4
    heads: int = 4
    head_dim: int = 64
    chunk_size: int = 64
    dtype: str = "float32"  # of q, k, v (gates and states stay fp32)
    repeats: int = 10
    budget_s: float = 10.0  # per figure: stop repeating after this long (>= 1 timed call)
    device: str = "auto"  # auto: CUDA when present
    seed: int = 0


QUICK = KernelBenchConfig(
    lengths=(16, 64), batch=1, heads=2, head_dim=8, chunk_size=16, repeats=2, budget_s=0.5
)


def _fla_under_tadn_signature(chunk_gated_delta_rule):
    """fla's kernel under the TADN signature (erase must be 1: fla has no erase gate)."""

    def fla(q, k, v, beta, erase, log_decay, initial_state):
        return chunk_gated_delta_rule(
            q=q,
            k=k,
            v=v,
            g=log_decay,
            beta=beta,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=True,
        )

    return fla


def backends_for(device: torch.device, chunk_size: int) -> tuple[dict, list[str]]:
    """{name: fn(q, k, v, beta, erase, log_decay, initial_state) -> (o, state)} and notes
    on the backends left out."""
    impls = {"torch": partial(tadn_parallel, backend="torch", chunk_size=chunk_size)}
    notes = []
    if device.type != "cuda":
        notes.append("triton and fla need a CUDA device: only the PyTorch form runs here")
        return impls, notes
    if "triton" in available_backends()["parallel"]:
        impls["triton"] = partial(tadn_parallel, backend="triton", chunk_size=chunk_size)
    else:
        notes.append("triton is not installed (the gpu extra)")
    try:  # fla's package imports its layers and models too: any missing dependency fails
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as error:  # noqa: BLE001 - whatever it is, the row says it
        notes.append(f"fla does not import ({type(error).__name__}: {error})"[:300])
    else:
        impls["fla"] = _fla_under_tadn_signature(chunk_gated_delta_rule)
    return impls, notes


def _inputs(cfg: KernelBenchConfig, T: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.seed + T)
    x = kernel_inputs(cfg.batch, T, cfg.heads, cfg.head_dim, cfg.head_dim, generator)
    x["erase"] = torch.ones_like(x["erase"])  # the gated delta rule: comparable with fla
    dtype = getattr(torch, cfg.dtype)
    return {n: t.to(device, dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}


def _measure(cfg, device, fn, x) -> dict:
    def forward():
        with torch.no_grad():
            fn(**x)

    grads = None

    def train():
        nonlocal grads
        leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
        o, state = fn(**leaves)
        if grads is None:  # fixed upstream gradients, made once
            grads = [torch.ones_like(o), torch.ones_like(state)]
        torch.autograd.backward([o, state], grads)

    forward_s = statistics.median(
        time_calls(synchronized(device, forward), cfg.repeats, cfg.budget_s)
    )
    train_s = statistics.median(time_calls(synchronized(device, train), cfg.repeats, cfg.budget_s))
    return {"forward_ms": forward_s * 1e3, "train_ms": train_s * 1e3}


def reference_outputs(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's read-outs and final state for inputs `x`, in float64: the inputs as
    every backend gets them (bf16 q, k, v included), upcast exactly."""
    return naive_tadn(**{n: t.double() for n, t in x.items()})


def max_abs_diff(o, state, reference: tuple[torch.Tensor, torch.Tensor]) -> float:
    ref_o, ref_state = reference
    return max(
        (o.double() - ref_o).abs().max().item(), (state.double() - ref_state).abs().max().item()
    )


def run_kernel_benchmark(cfg: KernelBenchConfig, output: str | Path | None = None) -> dict:
    device = resolve_device(cfg.device)
    impls, notes = backends_for(device, cfg.chunk_size)
    rows = []
    for T in tqdm(cfg.lengths, desc="kernels", unit="length"):
        x = _inputs(cfg, T, device)
        reference = reference_outputs(x)
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    o, state = fn(**x)
                diff = max_abs_diff(o, state, reference)
                timing = _measure(cfg, device, fn, x)
            except Exception as error:  # noqa: BLE001 - e.g. fla's dtype assertion, out of memory
                message = f"{type(error).__name__}: {error}"[:500]
                rows.append({"backend": name, "length": T, "error": message})
                continue
            rows.append(
                {
                    "backend": name,
                    "length": T,
                    "forward_ms": round(timing["forward_ms"], 4),
                    "train_ms": round(timing["train_ms"], 4),
                    "train_tokens_per_s": round(cfg.batch * T / timing["train_ms"] * 1e3, 1),
                    "max_abs_diff_vs_reference": diff,
                }
            )
    report = {
        **report_header("kernels", cfg, output, device),
        "config": asdict(cfg),
        "backends": list(impls),
        "notes": notes,
        "rows": rows,
    }
    print(format_table(report), flush=True)
    if output is not None:
        write_report(report, output, plot)
    return report


def format_table(report: dict) -> str:
    lines = [
        f"{report['device']} ({'; '.join(report['notes']) or 'every backend'})",
        "backend | T | forward ms | fwd+bwd ms | train tokens/s | max abs diff vs fp64 reference",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['backend']} | {r['length']} | error: {r['error'][:120]}")
            continue
        lines.append(
            f"{r['backend']} | {r['length']} | {r['forward_ms']:,.3f} | {r['train_ms']:,.3f} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['max_abs_diff_vs_reference']:.2e}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in report["backends"]:
        rows = [r for r in report["rows"] if r["backend"] == name and "error" not in r]
        ax.plot([r["length"] for r in rows], [r["train_tokens_per_s"] for r in rows], "o-")
        ax.lines[-1].set_label(name)
    c = report["config"]
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="tokens / s")
    ax.set_title(
        f"TADN forward + backward, B {c['batch']}, H {c['heads']}, d {c['head_dim']}, {c['dtype']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(report["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
