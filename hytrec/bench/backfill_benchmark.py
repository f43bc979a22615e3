"""`hytrec benchmark backfill`: building every user's state by the backfill (whole
histories in long runs) against streaming the same log through the worker, in one run, on
one embedded broker, and whether both give the same states.

1. `events` events of the Taobao sample, in time order, are published to `behaviors`.
2. stream: a `hytrec worker` (its own consumer group) works through them at full speed, as
   a new deployment without a backfill would; `stream_events_per_s` = events / (first event
   consumed -> the recommendation answering every user's last event). Stopped gracefully,
   it writes every user's state to its user-state topic.
3. backfill: `hytrec.stream.backfill.backfill` in this process into another group's
   user-state topic, timed from its start (topics checked, `behaviors` read, states built,
   snapshots written and confirmed by the broker) to its end; `backfill_events_per_s` =
   events / that time; `speedup` = backfill / stream.
4. agreement: both topics are read back; per user, the states (`states_agree`, float parts
   within `tolerance` of the largest magnitude, integer parts and applied offsets exactly)
   and the user vectors after one more (the same) event applied to each state.

The model is a checkpoint (`--checkpoint`) or, by default, the stream benchmark's untrained
HyTRec with seeded weights (the cost of a step does not depend on the weights).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESULT_PATH = Path("benchmarks/results/backfill-cpu.json")


@dataclass(frozen=True)
class BackfillBenchConfig:
    dataset: str = "taobao"
    events: int = 50_000
    checkpoint: str | None = None
    d_model: int = 64
    seed: int = 0
    batch_size: int = 256  # the worker's micro-batch: B events ...
    batch_wait_ms: float = 20.0  # ... or W ms
    device: str = "cpu"
    tolerance: float = 1e-4
    worker_timeout_s: float = 900.0
    output: Path = Path("runs/backfill-benchmark")  # checkpoint, index, logs


def probe_vectors(model, parts: dict[str, dict]) -> np.ndarray:
    """The user vectors [U, d] (users sorted) after one more event (item 1, a minute after
    the user's newest) applied to each of these states (`SlotState.parts()` by user)."""
    import torch

    from hytrec.model.batch import EventBatch
    from hytrec.model.events import Behavior

    users = sorted(parts)
    state = model.new_state(len(users))
    slots = torch.arange(len(users))
    stacked = {n: torch.stack([parts[u][n] for u in users]) for n in parts[users[0]]}
    state.write(slots, stacked)
    one = torch.ones(len(users), 1, dtype=torch.long)
    ts = stacked["last_ts"][:, None] + 60
    batch = EventBatch(one, one, one * int(Behavior.CLICK), ts, lengths=one[:, 0])
    with torch.inference_mode():
        return model.step(state, slots, batch).numpy()


def _snapshots(bootstrap: str, group: str, partitions: list[int]) -> dict:
    from hytrec.stream.broker import TopicConfig
    from hytrec.stream.snapshots import decode_snapshot, read_snapshots

    found = read_snapshots(bootstrap, TopicConfig().state_topic(group), partitions)
    return {user: decode_snapshot(value) for user, (_, value) in found.latest.items()}


def compare(model, streamed: dict, backfilled: dict, tolerance: float) -> dict:
    """How the backfilled snapshots agree with the streamed ones, user by user."""
    from hytrec.bench.chaos import states_agree

    users = sorted(streamed)
    missing = sorted(set(streamed) ^ set(backfilled))
    both = [u for u in users if u in backfilled]
    agree, worst_state = 0, 0.0
    offsets_equal = 0
    for user in both:
        same, worst = states_agree(backfilled[user].parts, streamed[user].parts, tolerance)
        agree += same
        worst_state = max(worst_state, worst)
        offsets_equal += backfilled[user].applied == streamed[user].applied
    got = probe_vectors(model, {u: backfilled[u].parts for u in both})
    expected = probe_vectors(model, {u: streamed[u].parts for u in both})
    per_user = np.abs(got - expected).max(axis=1)
    return {
        "users_compared": len(both),
        "users_missing": missing[:20],
        "states_equal": int(agree),
        "applied_offsets_equal": int(offsets_equal),
        "state_max_abs_diff": worst_state,
        "vector_max_abs_diff": float(per_user.max()) if len(per_user) else 0.0,
        "vector_diff_per_user": per_user.tolist(),
    }


def run_benchmark(
    config: BackfillBenchConfig = BackfillBenchConfig(),
    result_path: Path | None = RESULT_PATH,
    command: str | None = None,
) -> dict:
    from hytrec.bench.demo import (
        Collector,
        DemoConfig,
        last_offsets,
        load_events,
        replay,
        start_worker,
        wait_until_answered,
        worker_group,
    )
    from hytrec.bench.reports import machine_info, provenance
    from hytrec.bench.stream_benchmark import model_checkpoint
    from hytrec.index import IndexConfig, build_from_checkpoint
    from hytrec.model.registry import load_model
    from hytrec.stream.backfill import BackfillConfig, backfill
    from hytrec.stream.broker import EmbeddedBroker, TopicConfig, stop_process
    from hytrec.stream.engine import EngineConfig, build_engine
    from hytrec.stream.replay import log_events

    run_dir = config.output
    run_dir.mkdir(parents=True, exist_ok=True)
    machine_before = machine_info()
    events, dataset = load_events(config.dataset)
    payloads = list(log_events(events))[: config.events]
    if len(payloads) < config.events:
        raise ValueError(f"{dataset} has {len(payloads):,} events, the run needs {config.events:,}")
    checkpoint, model_note = model_checkpoint(
        events, config.checkpoint, config.d_model, config.seed, run_dir / "checkpoint"
    )
    model = load_model(checkpoint)
    index_dir = run_dir / "index"
    build_from_checkpoint(checkpoint, IndexConfig(kind="flat")).save(index_dir)
    worker_config = DemoConfig(
        top_k=20,
        batch_size=config.batch_size,
        batch_wait_ms=config.batch_wait_ms,
        device=config.device,
    )
    users = {p["user_id"] for p in payloads}
    print(
        f"{dataset}: {len(payloads):,} events of {len(users):,} users; model: {model_note}",
        flush=True,
    )
    partitions = list(range(TopicConfig().behaviors_partitions))
    backfill_group = f"{worker_group('backfill')}"
    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        sent = replay(payloads, broker.bootstrap, None, "publish")
        collector = Collector(broker.bootstrap, model.version)
        worker = start_worker(checkpoint, index_dir, broker.bootstrap, worker_config, run_dir)
        try:
            wait_until_answered(
                collector, last_offsets(payloads, sent), worker, config.worker_timeout_s, "stream"
            )
            answered = list(collector.received)
            started = min(rec.received_at for _, rec in answered)
            stream_s = max(ms for ms, _ in answered) / 1000.0 - started
        finally:
            collector.close()
            stop_process(worker, timeout_s=60.0)  # a graceful stop writes every state
        print(f"stream (worker): {len(payloads) / stream_s:,.0f} events/s", flush=True)

        engine = build_engine(checkpoint, index_dir, config=EngineConfig(device=config.device))
        report = backfill(engine, broker.bootstrap, BackfillConfig(group=backfill_group))
        print(f"backfill: {report.events_per_s:,.0f} events/s", flush=True)
        streamed = _snapshots(broker.bootstrap, worker_group(), partitions)
        backfilled = _snapshots(broker.bootstrap, backfill_group, partitions)
    agreement = compare(model, streamed, backfilled, config.tolerance)
    stream_rate = len(payloads) / stream_s
    result = {
        "benchmark": "backfill",
        "device": config.device,
        "command": command or "hytrec benchmark backfill",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        **provenance(),
        "machine": {**machine_before, "load_average_1m_after": machine_info()["load_average_1m"]},
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "output"},
            "dataset": dataset,
            "model": model_note,
            "users": len(users),
            "backfill": asdict(BackfillConfig(group=backfill_group, progress=False)),
            "broker": "embedded Tansu (in-memory), 4 behaviors partitions",
        },
        "stream_events_per_s": stream_rate,
        "stream_seconds": stream_s,
        "backfill_events_per_s": report.events_per_s,
        "backfill_seconds": report.seconds,
        "backfill_read_seconds": report.read_seconds,
        "backfill_build_seconds": report.build_seconds,
        "backfill_write_seconds": report.write_seconds,
        "backfill_build_events_per_s": report.events_applied / report.build_seconds,
        "backfill_snapshot_bytes": report.snapshot_bytes,
        "backfill_users_written": report.users_written,
        "speedup": report.events_per_s / stream_rate,
        **{k: v for k, v in agreement.items() if k != "vector_diff_per_user"},
    }
    print_result(result)
    if result_path is not None:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, np.array(agreement["vector_diff_per_user"]), result_path.with_suffix(".png"))
        print(f"wrote {result_path} and {result_path.with_suffix('.png')}", flush=True)
    return result


def print_result(r: dict) -> None:
    c = r["config"]
    print(
        "\n".join(
            [
                "",
                f"== hytrec benchmark backfill: {c['events']:,} events of {c['users']:,} users "
                f"({c['dataset']}) on {r['device']} ==",
                f"stream (worker)  {r['stream_events_per_s']:>10,.0f} events/s "
                f"({r['stream_seconds']:.2f} s)",
                f"backfill         {r['backfill_events_per_s']:>10,.0f} events/s "
                f"({r['backfill_seconds']:.2f} s: read {r['backfill_read_seconds']:.2f}, build "
                f"{r['backfill_build_seconds']:.2f}, write {r['backfill_write_seconds']:.2f})",
                f"speedup          {r['speedup']:>10.1f}x",
                f"states equal     {r['states_equal']:,} of {r['users_compared']:,} users "
                f"(largest state difference {r['state_max_abs_diff']:.1e}, user vectors "
                f"{r['vector_max_abs_diff']:.1e}); applied offsets equal for "
                f"{r['applied_offsets_equal']:,}",
            ]
        ),
        flush=True,
    )


def plot(result: dict, vector_diffs: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["stream\n(worker)", "backfill\n(end to end)", "backfill\n(build stage)"]
    keys = ["stream_events_per_s", "backfill_events_per_s", "backfill_build_events_per_s"]
    rates = [result[k] for k in keys]
    bars = left.bar(names, rates, color=["tab:orange", "tab:blue", "tab:green"])
    left.bar_label(bars, labels=[f"{r:,.0f}" for r in rates])
    left.set_ylabel("events/s")
    left.set_title(f"{result['config']['events']:,} events: speedup {result['speedup']:.1f}x")
    floor = 1e-9
    right.hist(np.log10(np.maximum(vector_diffs, floor)), bins=30, color="tab:gray")
    right.axvline(np.log10(result["config"]["tolerance"]), color="tab:red", label="tolerance")
    right.set_xlabel("log10 max |user vector difference| per user")
    right.set_ylabel("users")
    right.set_title(f"{result['states_equal']:,} of {result['users_compared']:,} states equal")
    right.legend()
    fig.suptitle(
        f"hytrec backfill benchmark ({result['device']}, {result['machine']['cpus']} cpus)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(benchmarks) -> None:
    d = BackfillBenchConfig()
    parser = benchmarks.add_parser(
        "backfill",
        help="the backfill against streaming the same log through the worker: speed and "
        "equal states",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--dataset", default=d.dataset)
    parser.add_argument("--events", type=int, default=d.events)
    parser.add_argument("--checkpoint", help="a checkpoint (default: untrained HyTRec, seeded)")
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--output", default=str(d.output), help="checkpoint, index, logs")
    parser.add_argument("--result", default=str(RESULT_PATH), help="the JSON (PNG beside it)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from hytrec.bench.reports import quiet_broker_clients

    quiet_broker_clients()
    config = BackfillBenchConfig(
        dataset=args.dataset,
        events=args.events,
        checkpoint=args.checkpoint,
        d_model=args.d_model,
        batch_size=args.batch_size,
        batch_wait_ms=args.batch_wait_ms,
        device=args.device,
        output=Path(args.output),
    )
    command = "hytrec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_benchmark(config, Path(args.result), command)
    return 0 if result["states_equal"] == result["users_compared"] > 0 else 1
