"""`hytrec benchmark state-store`: one engine holding far more users than its memory, with
the disk tier (`stream/disk_tier.py`) under the device slots and a host-memory budget.

1. The engine (an untrained HyTRec of the default configuration, seeded weights, 10,000
   items; the state's size does not depend on the weights) gets `users` users: a state
   built from a short history is written for each straight into the disk tier, with its
   own count and time (the progress bar shows the rate). The free disk space is checked
   first; when the states would not fit, the model's d_model is halved until they do, and
   the JSON says so.
2. Latency per tier, one user at a time, `latency_ops` times each: write and read of a
   device slot (`SlotState.write` / `read`), of host memory (a slot's state copied out to
   the host, and back into a slot) and of the disk (`DiskTier.get` of a random user of all
   those on disk, mostly not in the page cache, then `put_many` of it back): p50 and p99
   in microseconds.
3. The engine's events/s (`RecommendationEngine.process`: admission, step, index search,
   recommendations) at hot-set shares of 1 %, 10 % and 50 % of the users: `events` events
   of users drawn uniformly from the hot set, in batches of `batch_size`, after a warm-up
   pass of the same size; the tiers' reads and writes during each phase beside it.
4. The bytes on disk (the LMDB pages in use) and per user.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

RESULT_PATH = Path("benchmarks/results/state-store-cpu.json")
TS = 1_700_000_000


@dataclass(frozen=True)
class StateStoreBenchConfig:
    users: int = 1_000_000
    host_budget_mib: float = 1024.0
    device_budget_mib: float = 256.0  # the engine's default state budget
    hot_shares: tuple[float, ...] = (0.01, 0.1, 0.5)
    events: int = 20_000  # per hot share, timed (and as many again to warm up)
    batch_size: int = 256  # events per engine batch, as the worker's
    latency_ops: int = 2_000
    num_items: int = 10_000
    d_model: int = 64  # HyTRecConfig's default; halved while the states would not fit
    seed: int = 0
    device: str = "cpu"
    output: Path = Path("runs/state-store-benchmark")  # checkpoint, index, the disk tier


def _model(config: StateStoreBenchConfig, d_model: int):
    import torch

    from hytrec.model.events import Vocabulary
    from hytrec.model.hytrec import HyTRec, HyTRecConfig

    torch.manual_seed(config.seed)
    items = Vocabulary(f"i{n}" for n in range(1, config.num_items))
    categories = Vocabulary(f"c{n}" for n in range(1, 100))
    cfg = replace(
        HyTRecConfig(num_items=config.num_items, num_categories=100),
        d_model=d_model,
        dropout=0.0,
    )
    return HyTRec(cfg, items, categories).eval()


def _fitting_model(config: StateStoreBenchConfig, directory: Path):
    """The model at the largest d_model <= config.d_model whose states fit the free disk
    space (with 10 % and 5 GB to spare), and a note saying what was chosen and why."""
    free = shutil.disk_usage(directory).free
    d_model = config.d_model
    while True:
        model = _model(config, d_model)
        needed = config.users * model.state_bytes_per_user() * 1.1 + 5e9
        if needed <= free or d_model <= 8:
            break
        d_model //= 2
    note = f"untrained HyTRec (HyTRecConfig defaults, d_model={d_model}, seeded weights)"
    if d_model != config.d_model:
        note += (
            f"; d_model {config.d_model} would need {needed / 1e9:.0f} GB of disk, "
            f"{free / 1e9:.0f} GB are free"
        )
    return model, note, {"free_bytes": free, "needed_bytes": int(needed)}


def _events(users: list[str], count: int, rng: np.random.Generator, clock: list[int]):
    from hytrec.stream.schemas import BehaviorEvent

    owners = rng.integers(0, len(users), count)
    items = rng.integers(1, 9_000, count)
    out = []
    for owner, item in zip(owners.tolist(), items.tolist(), strict=True):
        clock[0] += 1
        out.append(
            BehaviorEvent(
                users[owner],
                f"i{item}",
                f"c{item % 99 + 1}",
                "pv",
                TS + clock[0],
                partition=0,
                offset=clock[0],
                received_at=0.0,
            )
        )
    return out


def _quantiles(samples_ns: list[int]) -> dict:
    us = np.array(samples_ns) / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


def tier_latencies(
    store, template: dict, users: list[str], ops: int, rng: np.random.Generator
) -> dict:
    """Write and read latency of one user's state per tier (see the module docstring)."""
    import torch

    slot = torch.tensor([0])
    stacked = {n: t[None] for n, t in template.items()}
    timings: dict[str, list[int]] = {k: [] for k in ("device", "host", "disk")}
    reads: dict[str, list[int]] = {k: [] for k in ("device", "host", "disk")}
    state = store.state
    for _ in tqdm(range(ops), desc="latency", leave=False):
        t0 = time.perf_counter_ns()
        state.write(slot, stacked)
        t1 = time.perf_counter_ns()
        state.read(slot)
        t2 = time.perf_counter_ns()
        timings["device"].append(t1 - t0)
        reads["device"].append(t2 - t1)
        # host: a slot's state copied out to host memory (an eviction), and back (a load)
        t0 = time.perf_counter_ns()
        kept = {name: t[0].to("cpu") for name, t in state.read(slot).items()}
        t1 = time.perf_counter_ns()
        state.write(slot, {n: t[None] for n, t in kept.items()})
        t2 = time.perf_counter_ns()
        timings["host"].append(t1 - t0)
        reads["host"].append(t2 - t1)
        # disk: a random user of the million (cold: mostly not in the page cache) read,
        # then written back
        user = users[int(rng.integers(len(users)))]
        t0 = time.perf_counter_ns()
        parts = store.disk.get(user)
        t1 = time.perf_counter_ns()
        store.disk.put_many([(user, parts)])
        t2 = time.perf_counter_ns()
        reads["disk"].append(t1 - t0)
        timings["disk"].append(t2 - t1)
    return {
        tier: {"write": _quantiles(timings[tier]), "read": _quantiles(reads[tier])}
        for tier in timings
    }


def run_benchmark(
    config: StateStoreBenchConfig = StateStoreBenchConfig(),
    result_path: Path | None = RESULT_PATH,
    command: str | None = None,
) -> dict:
    import torch

    from hytrec.bench.reports import machine_info, provenance
    from hytrec.index import IndexConfig, build_from_checkpoint
    from hytrec.stream.engine import EngineConfig, RecommendationEngine

    run_dir = config.output
    run_dir.mkdir(parents=True, exist_ok=True)
    machine_before = machine_info()
    model, model_note, space = _fitting_model(config, run_dir)
    checkpoint = model.save(run_dir / "checkpoint")
    index = build_from_checkpoint(checkpoint, IndexConfig(kind="flat"))
    engine_config = EngineConfig(
        device=config.device,
        state_budget_bytes=int(config.device_budget_mib * 2**20),
        host_budget_bytes=int(config.host_budget_mib * 2**20),
        state_dir=str(run_dir / "states"),
    )
    engine = RecommendationEngine(model, index, engine_config)
    store = engine.store
    print(
        f"{config.users:,} users of {store.bytes_per_user:,} B: {store.num_slots:,} device "
        f"slots, {store.host_users:,} in host memory, the rest on disk; model: {model_note}",
        flush=True,
    )
    rng = np.random.default_rng(config.seed)
    clock = [0]
    users = [f"user-{n}" for n in range(config.users)]

    # a realistic state (a short history applied), written for every user with its own time
    engine.apply(_events(["template"], 30, rng, clock))
    template = store.export_users(["template"])["template"].parts
    store.forget(["template"])
    started = time.perf_counter()
    chunk = 2_000
    with tqdm(total=config.users, desc="populate", unit="user") as bar:
        for start in range(0, config.users, chunk):
            batch = []
            for n, user in enumerate(users[start : start + chunk], start):
                parts = dict(template)
                parts["last_ts"] = torch.tensor(TS + n % 1000)
                batch.append((user, parts))
            store.disk.put_many(batch)
            bar.update(len(batch))
    populate_s = time.perf_counter() - started
    print(f"populated in {populate_s:.0f} s ({config.users / populate_s:,.0f} users/s)", flush=True)
    latencies = tier_latencies(store, template, users, config.latency_ops, rng)

    def run(events, what: str) -> None:
        for start in tqdm(range(0, len(events), config.batch_size), desc=what, leave=False):
            engine.process(events[start : start + config.batch_size])

    phases = []
    order = rng.permutation(config.users)
    for share in config.hot_shares:
        hot = [users[i] for i in order[: max(1, int(share * config.users))]]
        run(_events(hot, config.events, rng, clock), f"hot {share:.0%} warm-up")
        timed = _events(hot, config.events, rng, clock)
        before = (store.disk.reads, store.disk.writes, store.evictions)
        started = time.perf_counter()
        run(timed, f"hot {share:.0%}")
        seconds = time.perf_counter() - started
        phases.append(
            {
                "hot_share": share,
                "hot_users": len(hot),
                "events": config.events,
                "seconds": seconds,
                "events_per_s": config.events / seconds,
                "disk_reads": store.disk.reads - before[0],
                "disk_writes": store.disk.writes - before[1],
                "slot_evictions": store.evictions - before[2],
            }
        )
        print(
            f"hot set {share:.0%} ({len(hot):,} users): {phases[-1]['events_per_s']:,.0f} "
            f"events/s, {phases[-1]['disk_reads']:,} disk reads",
            flush=True,
        )
    disk_bytes = store.disk.bytes_on_disk
    result = {
        "benchmark": "state-store",
        "device": config.device,
        "command": command or "hytrec benchmark state-store",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        **provenance(),
        "machine": {**machine_before, "load_average_1m_after": machine_info()["load_average_1m"]},
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "output"},
            "model": model_note,
            "store": "LMDB (lmdb==3.0.0) under device slots and a host-memory budget",
            **space,
        },
        "bytes_per_user": store.bytes_per_user,
        "device_slots": store.num_slots,
        "host_users": store.host_users,
        "users_on_disk": len(store.disk),
        "populate_seconds": populate_s,
        "disk_bytes": disk_bytes,
        "disk_bytes_per_user": disk_bytes / max(1, len(store.disk)),
        "latency": latencies,
        "phases": phases,
    }
    engine.close()
    print_result(result)
    if result_path is not None:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, result_path.with_suffix(".png"))
        print(f"wrote {result_path} and {result_path.with_suffix('.png')}", flush=True)
    return result


def print_result(r: dict) -> None:
    lines = [
        "",
        f"== hytrec benchmark state-store: {r['config']['users']:,} users of "
        f"{r['bytes_per_user']:,} B ==",
        f"tiers: {r['device_slots']:,} device slots, {r['host_users']:,} users in host memory, "
        f"{r['users_on_disk']:,} on disk ({r['disk_bytes'] / 1e9:,.1f} GB, "
        f"{r['disk_bytes_per_user']:,.0f} B per user)",
    ]
    for tier, ops in r["latency"].items():
        lines.append(
            f"{tier:<7} write p50 {ops['write']['p50_us']:>8.1f} us  p99 "
            f"{ops['write']['p99_us']:>8.1f} us   read p50 {ops['read']['p50_us']:>8.1f} us  "
            f"p99 {ops['read']['p99_us']:>8.1f} us"
        )
    for phase in r["phases"]:
        lines.append(
            f"hot set {phase['hot_share']:>4.0%} ({phase['hot_users']:>9,} users): "
            f"{phase['events_per_s']:>8,.0f} events/s, {phase['disk_reads']:,} disk reads, "
            f"{phase['disk_writes']:,} writes"
        )
    print("\n".join(lines), flush=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shares = [f"{p['hot_share']:.0%}" for p in result["phases"]]
    rates = [p["events_per_s"] for p in result["phases"]]
    bars = left.bar(shares, rates, color="tab:blue")
    left.bar_label(bars, labels=[f"{r:,.0f}" for r in rates])
    left.set_xlabel("hot set (share of the users)")
    left.set_ylabel("engine events/s")
    left.set_title(f"{result['config']['users']:,} users, {result['host_users']:,} fit in host")
    tiers = list(result["latency"])
    x = np.arange(len(tiers))
    for offset, op, color in ((-0.2, "write", "tab:orange"), (0.2, "read", "tab:green")):
        p50 = [result["latency"][t][op]["p50_us"] for t in tiers]
        p99 = [result["latency"][t][op]["p99_us"] for t in tiers]
        right.bar(x + offset, p50, 0.4, color=color, label=f"{op} p50")
        right.scatter(x + offset, p99, color="black", marker="_", s=200)
    right.scatter([], [], color="black", marker="_", label="p99")
    right.set_xticks(x, tiers)
    right.set_yscale("log")
    right.set_ylabel("microseconds per user (log)")
    right.set_title("latency per tier")
    right.legend()
    fig.suptitle(f"hytrec state-store benchmark ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(benchmarks) -> None:
    d = StateStoreBenchConfig()
    parser = benchmarks.add_parser(
        "state-store",
        help="an engine with far more users than memory: the disk tier's latency and the "
        "engine's events/s by hot-set share",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--host-budget-mib", type=float, default=d.host_budget_mib)
    parser.add_argument("--device-budget-mib", type=float, default=d.device_budget_mib)
    parser.add_argument(
        "--hot-shares", default=",".join(str(s) for s in d.hot_shares), help="e.g. 0.01,0.1,0.5"
    )
    parser.add_argument("--events", type=int, default=d.events, help="per hot share")
    parser.add_argument("--latency-ops", type=int, default=d.latency_ops)
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--output", default=str(d.output), help="checkpoint and disk tier")
    parser.add_argument("--result", default=str(RESULT_PATH), help="the JSON (PNG beside it)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    config = StateStoreBenchConfig(
        users=args.users,
        host_budget_mib=args.host_budget_mib,
        device_budget_mib=args.device_budget_mib,
        hot_shares=tuple(float(s) for s in args.hot_shares.split(",") if s),
        events=args.events,
        latency_ops=args.latency_ops,
        d_model=args.d_model,
        device=args.device,
        output=Path(args.output),
    )
    command = "hytrec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_benchmark(config, Path(args.result), command)
    return 0
