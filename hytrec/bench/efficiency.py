"""`hytrec benchmark efficiency`: what one new event costs as a user's history grows.

HyTRec and RecGRELA serve from a fixed-size per-user state: a new event is one `step`,
whatever the history length L. A softmax model (SASRec) keeps no such state and must
recompute the user vector over all L+1 events for every new event. For each L this
measures, side by side in one process:

    {hytrec,recgrela}_step_us       one event stepped into a state that has absorbed L events
    hytrec_compiled_step_us         the same through `CompiledStep` (torch.compile), timed in
                                    the same rounds: what the engine's --compile-step serves
    sasrec_recompute_us             SASRec's forward over the L+1 events (its cost per event)
    {hytrec,recgrela}_recompute_us  the parallel forward over the L+1 events (no state kept)
    *_train_tokens_per_s            forward+backward of the next-item loss over L events
    hytrec_compiled_train_tokens_per_s  the same with HyTRec's forward through torch.compile
                                    (inductor, one graph per L, compiled in the untimed
                                    warm-up call); the eager figure is what `train` runs
    *_train_mflop_per_token         the matrix-product work of that forward+backward, per token
                                    (counted, not timed: why one model is slower than another)

HiSAC serves from a bounded per-user map of codebook nodes (at most `node_cap`, then the
least voted is evicted): `hisac_step_us` is one event routed into a map built from L events
and the agents read back, timed in the same rounds; `hisac_nodes_held` how full that map
is, `hisac_evictions` how many nodes it has evicted. Its codebook is built by `hytrec
build-semantic-ids`'s builder over a clustered random item table (`hisac_parity.codebook_for`:
16 x 8 x 8 codes, 4 routes per item and level, 495 nodes over the 999 items), and its cap is
`hisac_node_cap`, below those 495: the short histories time the map under its cap, the long
ones the eviction path (the model's default cap, 1,024, is never reached by this codebook).
HiSAC has no recompute or training figure here: its training form reads rows of
`train_len` events (quadratic in them), and its recompute is the stream's own replay.

HSTU and HPGR serve from a KV cache of their last N events instead: their step and state
grow with N, not with L. `cache_rows` gives, per cache size N, one event stepped into a full
cache (`hstu_step_us`, `hpgr_step_us`: HPGR's step adds the session features and the
preference-guided selection of k = 32 keys of the N) and the states' bytes per user, beside
HyTRec's and RecGRELA's constant states.

Every figure is the median of repeated `time.perf_counter` timings after a warm-up call.
A measurement stops repeating once it has used `budget_s` (a full forward over 12k events
takes about a second on a CPU core), so the long lengths may have fewer repeats; the JSON's
`timed_calls` records, per figure, how many calls were timed, their min and max, and the
1-minute load average, so a figure taken while other processes shared the CPU shows as
such. On a small shared machine `--threads 1` gives far steadier figures than several
threads, which all stall when one of them is descheduled. A measurement that fails (e.g.
out of memory) is null, with the reason under `notes`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)
from tqdm import tqdm

from hytrec.bench.hisac_parity import codebook_for
from hytrec.bench.parity import UserEvents, pad_batch, random_user
from hytrec.bench.reports import cpu_info, machine_info, write_report
from hytrec.bench.timing import report_header, synchronized, time_calls
from hytrec.model.compiled_step import CompiledStep
from hytrec.model.hisac import HiSAC, HiSACConfig
from hytrec.model.hpgr import HPGR, HPGRConfig
from hytrec.model.hstu import HSTU, HSTUConfig
from hytrec.model.hytrec import EventBatch, HyTRec, HyTRecConfig
from hytrec.model.recgrela import RecGRELA, RecGRELAConfig
from hytrec.model.sasrec import SASRec, SASRecConfig
from hytrec.model.train import next_item_loss

aten = torch.ops.aten
STREAMED = ("hytrec", "recgrela")  # a per-user state, and a parallel form to train and recompute
STEPPED = (*STREAMED, "hisac")  # the models timed stepping one event into a held state
MEASURES = (
    "hytrec_step_us",
    "recgrela_step_us",
    "hisac_step_us",
    "sasrec_recompute_us",
    "hytrec_recompute_us",
    "recgrela_recompute_us",
    "hytrec_train_tokens_per_s",
    "recgrela_train_tokens_per_s",
    "sasrec_train_tokens_per_s",
    "hytrec_train_mflop_per_token",
    "recgrela_train_mflop_per_token",
    "sasrec_train_mflop_per_token",
)


@dataclass(frozen=True)
class EfficiencyConfig:
    """One run; written into the JSON with the command that reproduces it."""

    lengths: tuple[int, ...] = (100, 500, 1000, 2000, 5000, 10000, 12000)
    cache_sizes: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # HSTU's N (its KV cache)
    d_model: int = 64  # every model; HyTRec's and RecGRELA's other fields are their defaults
    sasrec_layers: int = 2  # the accuracy benchmark's SASRec
    sasrec_heads: int = 2
    build_chunk: int = 512  # events per `step` call while building the state up to L
    step_repeats: int = 100  # single-event steps timed per model and length (round-robin)
    recompute_repeats: int = 7  # full forwards timed per length and model
    train_iters: int = 3  # forward+backward iterations timed per length and model
    train_batch: int = 1
    budget_s: float = 15.0  # stop repeating a measurement after this much time (>= 1 timing)
    # Dropout off in both models for the training figures: with dropout > 0 PyTorch's CPU
    # scaled-dot-product attention leaves its fused kernel for the math one, which
    # materialises the T x T matrix; that would measure a fallback, not SASRec.
    train_dropout: float = 0.0
    threads: int | None = None  # torch threads; None = PyTorch's default
    device: str = "cpu"  # "cuda": models and states on the GPU, timings synchronize it
    compile_step: bool = True  # also time HyTRec's compiled step (about a minute to compile)
    # also time HyTRec's training with its forward compiled (about a minute per length)
    compile_train: bool = True
    # HiSAC's map cap: a long user of the benchmark's codebook reaches 495 nodes (about 400
    # after 500 events), so from there on its steps evict
    hisac_node_cap: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError("EfficiencyConfig: lengths must be >= 2")
        if min(self.build_chunk, self.step_repeats, self.recompute_repeats) < 1:
            raise ValueError("EfficiencyConfig: chunk and repeats must be >= 1")
        if min(self.train_iters, self.train_batch) < 1:
            raise ValueError("EfficiencyConfig: train_iters and train_batch must be >= 1")

    def hytrec(self) -> HyTRecConfig:
        return HyTRecConfig(d_model=self.d_model)

    def recgrela(self) -> RecGRELAConfig:
        return RecGRELAConfig(num_items=self.hytrec().num_items, d_model=self.d_model)

    def hstu(self, cache: int) -> HSTUConfig:
        return HSTUConfig(num_items=self.hytrec().num_items, d_model=self.d_model, max_len=cache)

    def hpgr(self, cache: int) -> HPGRConfig:
        return HPGRConfig(num_items=self.hytrec().num_items, d_model=self.d_model, max_len=cache)

    def hisac(self) -> HiSACConfig:
        return HiSACConfig(
            num_items=self.hytrec().num_items, d_model=self.d_model, node_cap=self.hisac_node_cap
        )

    def sasrec(self) -> SASRecConfig:
        # positions must cover the longest recompute (L + 1 events)
        return SASRecConfig(
            num_items=self.hytrec().num_items,
            d_model=self.d_model,
            layers=self.sasrec_layers,
            heads=self.sasrec_heads,
            max_len=max(self.lengths) + 1,
        )


QUICK = EfficiencyConfig(
    lengths=(8, 32),
    cache_sizes=(8, 16),
    d_model=16,
    build_chunk=8,
    step_repeats=3,
    recompute_repeats=2,
    train_iters=2,
    budget_s=1.0,
    compile_step=False,
    compile_train=False,
    hisac_node_cap=100,  # 71 nodes after 8 events: the 32-event map evicts
)


# ---------------------------------------------------------------------------- measurements


def _batch(user: UserEvents, start: int, stop: int, device, rows: int = 1) -> EventBatch:
    return pad_batch([user.run(start, stop)] * rows).to(device)


def _build_state(model, state, slot, user: UserEvents, start: int, stop: int, chunk: int):
    """Step events start..stop-1 into the slot, `chunk` per call: the state a server holds."""
    for a in range(start, stop, chunk):
        model.step(state, slot, _batch(user, a, min(a + chunk, stop), slot.device))


def _interleaved_step_us(
    models: dict, user: UserEvents, lengths: list[int], cfg, compiled: CompiledStep | None = None
) -> tuple[dict, dict, dict]:
    """({(stepper, L): [us, ...]}, {(model, L): its state's parts after L events}, the same
    after the timed event): one new event stepped into a state holding L events, for every
    stepped model (and HyTRec's compiled step, sharing HyTRec's states) and length, timed
    round-robin (one call per stepper and length per round, after a warm-up round). Load
    that comes and goes on a shared machine then lands on every length alike, so the
    flatness ratio compares like with like."""
    device = torch.device(cfg.device)
    slot = torch.tensor([0], device=device)
    saved, stepped, states, new_events = {}, {}, {}, {}
    steppers = {name: (name, models[name].step) for name in STEPPED}
    if compiled is not None:
        steppers["hytrec_compiled"] = ("hytrec", compiled)
    for name in STEPPED:
        states[name] = models[name].new_state(1, device)
        built = 0
        for L in lengths:  # each state is the previous length's, extended
            _build_state(models[name], states[name], slot, user, built, L, cfg.build_chunk)
            saved[name, L] = states[name].read(slot)
            built = L
    for L in lengths:
        new_events[L] = _batch(user, L, L + 1, device)
    times: dict = {(stepper, L): [] for stepper in steppers for L in lengths}
    for round_ in range(cfg.step_repeats + 1):
        for stepper, L in times:
            name, step_fn = steppers[stepper]
            states[name].write(slot, saved[name, L])  # untimed: exactly L events each time
            step = synchronized(device, partial(step_fn, states[name], slot))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(new_events[L])
            if round_:  # round 0 warms up
                times[stepper, L].append((time.perf_counter() - t0) * 1e6)
            stepped[name, L] = states[name].read(slot)  # untimed
    return times, saved, stepped


CACHED = {"hstu": (HSTU, EfficiencyConfig.hstu), "hpgr": (HPGR, EfficiencyConfig.hpgr)}


def _cache_rows(user: UserEvents, cfg: EfficiencyConfig) -> list[dict]:
    """Per cache size N: each KV-cache model's step of one event into a full cache (N events
    held), the median of `step_repeats` calls after a warm-up, the models taken in turn
    call by call, and its state's bytes per user."""
    device = torch.device(cfg.device)
    slot = torch.tensor([0], device=device)
    rows = []
    for N in sorted(set(cfg.cache_sizes)):
        steps, fulls, states, times = {}, {}, {}, {name: [] for name in CACHED}
        row = {"cache": N}
        for name, (model_class, config_of) in CACHED.items():
            torch.manual_seed(cfg.seed)
            model = model_class(config_of(cfg, N)).eval().to(device)
            states[name] = model.new_state(1, device)
            _build_state(model, states[name], slot, user, 0, N, cfg.build_chunk)
            fulls[name] = states[name].read(slot)
            steps[name] = synchronized(device, partial(model.step, states[name], slot))
            row[f"{name}_state_bytes"] = model.state_bytes_per_user()
        new_event = _batch(user, N, N + 1, device)
        for call in range(cfg.step_repeats + 1):
            for name in CACHED:
                states[name].write(slot, fulls[name])  # untimed: exactly N events each time
                t0 = time.perf_counter()
                steps[name](new_event)
                if call:  # call 0 warms up
                    times[name].append((time.perf_counter() - t0) * 1e6)
        for name, taken in times.items():
            row[f"{name}_step_us"] = round(statistics.median(taken), 2)
            row[f"{name}_step_us_min_max"] = [round(min(taken), 2), round(max(taken), 2)]
        rows.append(row)
    return rows


def _train_tokens_per_s(
    model, user: UserEvents, L: int, cfg: EfficiencyConfig, forward: Callable | None = None
) -> list[float]:
    """Forward+backward of the dense next-item loss (every position predicts the next item,
    full softmax over the items, as `train` does with negatives=0) over L events; `forward`
    (default: the model's own) computes the user vectors."""
    device = torch.device(cfg.device)
    inputs = _batch(user, 0, L, device, cfg.train_batch)
    target = _batch(user, 1, L + 1, device, cfg.train_batch).item.reshape(-1)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()

    def one_iteration():
        model.zero_grad(set_to_none=True)
        u = (forward or model)(inputs).reshape(-1, model.cfg.d_model)
        next_item_loss(model, u, target, 0, generator).backward()

    try:
        times = time_calls(synchronized(device, one_iteration), cfg.train_iters, cfg.budget_s)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return [cfg.train_batch * L / t for t in times]


# PyTorch's counter knows the CUDA attention kernels only; SASRec's CPU kernel skips the
# blocks a causal mask hides, so a causal call counts half of the full product.
def _cpu_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *_, **__) -> int:
    return sdpa_flop_count(query, key, value) // (2 if is_causal else 1)


def _cpu_attention_backward_flops(grad, query, key, value, *args, **__) -> int:
    is_causal = args[3] if len(args) > 3 else False
    return sdpa_backward_flop_count(grad, query, key, value) // (2 if is_causal else 1)


for _op, _formula in (
    (aten._scaled_dot_product_flash_attention_for_cpu, _cpu_attention_flops),
    (aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_attention_backward_flops),
):
    if _op not in flop_registry:
        register_flop_formula(_op)(_formula)


def _train_mflop_per_token(model, user: UserEvents, L: int, cfg: EfficiencyConfig) -> list:
    """Matrix-product MFLOP per token of one forward+backward of `_train_tokens_per_s`'s loss
    (mm, bmm, addmm, baddbmm, attention; not triangular solves or elementwise work)."""
    device = torch.device(cfg.device)
    inputs = _batch(user, 0, L, device, cfg.train_batch)
    target = _batch(user, 1, L + 1, device, cfg.train_batch).item.reshape(-1)
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            u = model(inputs).reshape(-1, model.cfg.d_model)
            next_item_loss(model, u, target, 0, torch.Generator().manual_seed(cfg.seed)).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return [counter.get_total_flops() / (cfg.train_batch * L) / 1e6]


def run_efficiency(
    cfg: EfficiencyConfig, output: str | Path | None = None, progress: bool = True
) -> dict:
    """Measure every length; write `output`.json and `output`.png when given."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    lengths = sorted(set(cfg.lengths))
    load_before = os.getloadavg()[0]  # other work on a shared machine skews timings
    device = torch.device(cfg.device)
    classes = {
        "hytrec": (HyTRec, cfg.hytrec()),
        "recgrela": (RecGRELA, replace(cfg.recgrela(), drop_path=cfg.train_dropout)),
        "sasrec": (SASRec, cfg.sasrec()),
    }
    models, trained = {}, {}
    for name, (model_class, model_cfg) in classes.items():
        torch.manual_seed(cfg.seed)
        models[name] = model_class(model_cfg).eval().to(device)
        # the training figures use the same weights with dropout off (see EfficiencyConfig)
        torch.manual_seed(cfg.seed)
        trained[name] = model_class(replace(model_cfg, dropout=cfg.train_dropout)).to(device)
    torch.manual_seed(cfg.seed)
    codebook = codebook_for(cfg.hisac().num_items, seed=cfg.seed)
    models["hisac"] = HiSAC(cfg.hisac(), codebook=codebook).eval().to(device)
    # one user, one history: length L uses its first L events, event L is the new one
    longest = max(*lengths, *cfg.cache_sizes)
    user = random_user(longest + 1, cfg.hytrec(), torch.Generator().manual_seed(cfg.seed))

    rows, notes, repeats = [], [], []
    bar = tqdm(total=len(lengths) * len(MEASURES), unit="meas", disable=not progress)

    def measure(L: int, name: str, fn: Callable, *args) -> float | None:
        """The median of fn(*args)'s values (one per timed call); its spread goes under
        `timed_calls`; a failure becomes null with its reason under `notes`."""
        bar.set_description(f"L={L} {name}")
        try:
            values = fn(*args)
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory at long L
            notes.append(
                {"length": L, "measure": name, "reason": f"{type(error).__name__}: {error}"}
            )
            values = []
        bar.update()
        spread = {"min": round(min(values), 2), "max": round(max(values), 2)} if values else {}
        load = round(os.getloadavg()[0], 2)  # > threads: others shared the CPU meanwhile
        repeats.append(
            {"length": L, "measure": name, "timed_calls": len(values), **spread, "load_1m": load}
        )
        return round(statistics.median(values), 2) if values else None

    def per_event_us(fn: Callable, calls: int) -> list[float]:
        return [t * 1e6 for t in time_calls(synchronized(device, fn), calls, cfg.budget_s)]

    # (a) the stream: the (L+1)-th event stepped into a held state, all lengths round-robin
    bar.set_description("steps, round-robin over L")
    compiled = None
    if cfg.compile_step:
        bar.set_description("compiling HyTRec's step")
        compiled = CompiledStep(models["hytrec"])
        if not compiled.warm_up():
            notes.append({"measure": "hytrec_compiled_step_us", "reason": compiled.reason})
            compiled = None
    step_times, states_at, states_after = _interleaved_step_us(models, user, lengths, cfg, compiled)
    # dynamic=False: one graph per length, each compiled in its measurement's warm-up call
    compiled_forward = (
        torch.compile(trained["hytrec"].forward, dynamic=False) if cfg.compile_train else None
    )
    for L in lengths:
        history = _batch(user, 0, L + 1, device)
        row: dict = {"length": L}
        for name in STEPPED:
            key = f"{name}_step_us"
            row[key] = measure(L, key, step_times.__getitem__, (name, L))
        hisac_map = states_at["hisac", L]
        row["hisac_nodes_held"] = int((hisac_map["node_key"] > 0).sum())  # of its node_cap
        row["hisac_evictions"] = int(hisac_map["evictions"].sum())
        # the timed event's own: a step that must make room costs more than one that need not
        row["hisac_step_evictions"] = (
            int(states_after["hisac", L]["evictions"].sum()) - row["hisac_evictions"]
        )
        row["hytrec_compiled_step_us"] = (
            measure(L, "hytrec_compiled_step_us", step_times.__getitem__, ("hytrec_compiled", L))
            if compiled is not None
            else None
        )
        # (b), (c) no state: the whole history again for the new event
        with torch.no_grad():
            for name in ("sasrec", *STREAMED):
                row[f"{name}_recompute_us"] = measure(
                    L,
                    f"{name}_recompute_us",
                    per_event_us,
                    partial(models[name].user_vector, history),
                    cfg.recompute_repeats,
                )
        for name in (*STREAMED, "sasrec"):
            key = f"{name}_train_tokens_per_s"
            row[key] = measure(L, key, _train_tokens_per_s, trained[name], user, L, cfg)
            key = f"{name}_train_mflop_per_token"
            row[key] = measure(L, key, _train_mflop_per_token, trained[name], user, L, cfg)
        key = "hytrec_compiled_train_tokens_per_s"
        row[key] = (
            measure(L, key, _train_tokens_per_s, trained["hytrec"], user, L, cfg, compiled_forward)
            if compiled_forward is not None
            else None
        )
        rows.append(row)
    bar.set_description("HSTU and HPGR steps by cache size")
    cache_rows = _cache_rows(user, cfg)
    bar.close()

    report = {
        **report_header("efficiency", cfg, output, device),
        "machine": {
            **machine_info(),
            "cpu_flags_avx512f": "avx512f" in cpu_info().get("flags", "").split(),
            "threads": torch.get_num_threads(),
            "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        },
        "config": asdict(cfg),
        "hytrec_config": asdict(cfg.hytrec()),
        "recgrela_config": asdict(classes["recgrela"][1]),
        "sasrec_config": asdict(cfg.sasrec()),
        "state_bytes_per_user": models["hytrec"].state_bytes_per_user(),
        "recgrela_state_bytes_per_user": models["recgrela"].state_bytes_per_user(),
        "hisac_config": asdict(models["hisac"].cfg),
        "hisac_state_bytes_per_user": models["hisac"].state_bytes_per_user(),
        "hstu_config": asdict(cfg.hstu(max(cfg.cache_sizes))),
        "hpgr_config": asdict(cfg.hpgr(max(cfg.cache_sizes))),
        "method": {
            "step_us": "median us of one step of a single event for one user whose state "
            f"holds L events (built by stepping them, {cfg.build_chunk} per call); fp32, "
            f"eval, no_grad; {cfg.step_repeats} calls per model and length, taken "
            "round-robin over the lengths after a warm-up round",
            "hisac_step_us": "the same for HiSAC: the event's routes accumulated into the "
            "user's node map (built from L events; full at node_cap, then evicting the least "
            "voted), the agents activated and read back; hisac_nodes_held, "
            "hisac_evictions: that map after the L events; hisac_step_evictions: the nodes "
            "the timed event itself evicted",
            "hytrec_compiled_step_us": "the same through CompiledStep (torch.compile, checked "
            "against the eager step when it warms up), its calls in the same rounds; null "
            "with compile_step off",
            "sasrec_recompute_us": "median us of SASRec.user_vector over the L+1 events",
            "hytrec_recompute_us": "median us of HyTRec.user_vector (parallel, chunked "
            "TADN) over the L+1 events: every long layer but the last at every position, the "
            "last layer, the short branch and the fusion at the last one",
            "recgrela_recompute_us": "median us of RecGRELA.user_vector (parallel, chunked "
            "linear attention) over the L+1 events",
            "hstu_step_us": "median us of one HSTU step of a single event into a KV cache "
            f"holding N events (its max_len), {cfg.step_repeats} calls after a warm-up; "
            "fp32, eval, no_grad",
            "hpgr_step_us": "the same for HPGR (selection by its own item table, k 32, w 8), "
            "its calls alternating with HSTU's",
            "train_tokens_per_s": f"batch {cfg.train_batch} x L tokens / median seconds of "
            "forward + backward of the full-softmax next-item loss (no optimizer step)",
            "hytrec_compiled_train_tokens_per_s": "the same with HyTRec's forward through "
            "torch.compile (inductor, dynamic=False: one graph per length, compiled in the "
            "untimed warm-up call; the backward through AOTAutograd); null with "
            "compile_train off",
            "train_mflop_per_token": "matrix-product MFLOP of that forward + backward per "
            "token, by torch.utils.flop_counter (mm, bmm, addmm, baddbmm; SDPA on CPU "
            "registered here, a causal call at half the full product); triangular solves "
            "and elementwise work are not counted",
            "kernels": "Backend.AUTO: the PyTorch forms on CPU; on CUDA the Triton step and, "
            "until the Triton chunked kernel is verified there, the PyTorch chunked form",
        },
        **derived(rows),
        "rows": rows,
        "cache_rows": cache_rows,
        "timed_calls": repeats,
        "notes": notes,
    }
    text = format_table(rows) + "\n\n" + format_cache_table(report)
    print(text, flush=True)
    if output is not None:
        write_report(report, output, plot)
    return report


def derived(rows: list[dict]) -> dict:
    """Headline ratios per streamed model: its step vs SASRec's recompute and vs its own
    recompute at the longest length, and how flat its step cost is across lengths
    (max / min; 1.0 = independent of the history)."""
    last = rows[-1]
    out: dict = {"max_length": last["length"]}
    for name in STEPPED:
        step = f"{name}_step_us"
        steps = [r[step] for r in rows if r[step]]
        prefix = "step" if name == "hytrec" else f"{name}_step"
        out[f"{prefix}_speedup_vs_sasrec_at_max_length"] = ratio(
            last["sasrec_recompute_us"], last[step]
        )
        if name in STREAMED:
            out[f"{prefix}_speedup_vs_{name}_recompute_at_max_length"] = ratio(
                last[f"{name}_recompute_us"], last[step]
            )
        out[f"{name}_step_flatness_max_over_min"] = (
            round(max(steps) / min(steps), 3) if steps else None
        )
    # issue 20: the compiled one-event step against the eager one, in the same rounds
    speedups = [
        ratio(r["hytrec_step_us"], r["hytrec_compiled_step_us"], 2)
        for r in rows
        if r.get("hytrec_compiled_step_us")
    ]
    out["hytrec_compiled_step_speedup_min_max"] = (
        [min(speedups), max(speedups)] if speedups else None
    )
    # issue 20's questions: HyTRec's training throughput and matrix-product work against
    # SASRec's at each length, and how flat its throughput is from L = 500 on
    out["hytrec_over_sasrec_train"] = [
        {
            "length": r["length"],
            "tokens_per_s": ratio(
                r["hytrec_train_tokens_per_s"], r["sasrec_train_tokens_per_s"], 2
            ),
            "mflop_per_token": ratio(
                r["hytrec_train_mflop_per_token"], r["sasrec_train_mflop_per_token"], 2
            ),
            # HyTRec's training forward compiled, against eager SASRec and eager HyTRec
            "compiled_tokens_per_s": ratio(
                r.get("hytrec_compiled_train_tokens_per_s"), r["sasrec_train_tokens_per_s"], 2
            ),
            "compiled_over_eager": ratio(
                r.get("hytrec_compiled_train_tokens_per_s"), r["hytrec_train_tokens_per_s"], 2
            ),
        }
        for r in rows
    ]
    speeds = [r["hytrec_train_tokens_per_s"] for r in rows if r["length"] >= 500]
    out["hytrec_train_flatness_from_500"] = (
        round(max(speeds) / min(speeds), 3) if speeds and all(speeds) else None
    )
    return out


def ratio(a: float | None, b: float | None, digits: int = 1) -> float | None:
    return round(a / b, digits) if a and b else None


def format_table(rows: list[dict]) -> str:
    heads = ("L", "HyTRec step us", "RecGRELA step us", "HiSAC step us", "SASRec recompute us")
    heads += ("HyTRec recompute us", "RecGRELA recompute us", "HyTRec train tok/s")
    heads += ("RecGRELA train tok/s", "SASRec train tok/s", "HyTRec train MFLOP/tok")
    heads += ("RecGRELA train MFLOP/tok", "SASRec train MFLOP/tok", "HyTRec compiled step us")
    heads += ("HyTRec compiled train tok/s", "HiSAC nodes held", "HiSAC step evictions")

    def cell(v):
        return "null" if v is None else f"{v:,.1f}"

    lines = [" | ".join(heads), " | ".join("---" for _ in heads)]
    for r in rows:
        more = ("hytrec_compiled_step_us", "hytrec_compiled_train_tokens_per_s")
        more += ("hisac_nodes_held", "hisac_step_evictions")
        figures = (r[m] for m in (*MEASURES, *more))
        lines.append(" | ".join([str(r["length"]), *(cell(v) for v in figures)]))
    return "\n".join(lines)


def format_cache_table(report: dict) -> str:
    constant = (
        report["state_bytes_per_user"],
        report["recgrela_state_bytes_per_user"],
        report["hisac_state_bytes_per_user"],
    )
    lines = [
        "cache N | HSTU step us | HPGR step us | HSTU state B/user | HPGR state B/user | "
        "HyTRec state B | RecGRELA state B | HiSAC state B",
        "--- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for r in report["cache_rows"]:
        lines.append(
            f"{r['cache']} | {r['hstu_step_us']:,.1f} | {r['hpgr_step_us']:,.1f} | "
            f"{r['hstu_state_bytes']:,} | {r['hpgr_state_bytes']:,} | "
            + " | ".join(f"{b:,}" for b in constant)
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: per-event cost vs L (log-log), HSTU's step at L = its cache size; right:
    training tokens/s vs L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]

    def series(key):
        pts = [(r["length"], r[key]) for r in rows if r.get(key)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (
        ("hytrec_step_us", "HyTRec step (streaming state)", "o-"),
        ("hytrec_compiled_step_us", "HyTRec step, compiled", "o:"),
        ("recgrela_step_us", "RecGRELA step (streaming state)", "D-"),
        ("hisac_step_us", "HiSAC step (node map, capped)", "P-"),
        ("hytrec_recompute_us", "HyTRec recompute over L+1", "s--"),
        ("recgrela_recompute_us", "RecGRELA recompute over L+1", "x--"),
        ("sasrec_recompute_us", "SASRec recompute over L+1", "^-"),
    ):
        left.plot(*series(key), style, label=label)
    cache = report.get("cache_rows") or []
    for name, label, style in (("hstu", "HSTU", "v:"), ("hpgr", "HPGR", "<:")):
        left.plot(
            [r["cache"] for r in cache],
            [r[f"{name}_step_us"] for r in cache],
            style,
            label=f"{label} step (KV cache of N = L events)",
        )
    left.set(xscale="log", yscale="log", xlabel="history length L (events)")
    left.set(ylabel="cost of one new event (us)", title="per-event cost")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for key, label, style in (
        ("hytrec_train_tokens_per_s", "HyTRec (chunked TADN)", "o-"),
        ("hytrec_compiled_train_tokens_per_s", "HyTRec, forward compiled", "o:"),
        ("recgrela_train_tokens_per_s", "RecGRELA (chunked linear attention)", "D-"),
        ("sasrec_train_tokens_per_s", "SASRec (SDPA)", "^-"),
    ):
        right.plot(*series(key), style, label=label)
    right.set(xscale="log", yscale="log", xlabel="sequence length L (events)")
    right.set(ylabel="tokens / s (forward + backward)", title="training throughput")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"{report['device']}, d_model {report['config']['d_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
