"""`hytrec benchmark stream`: the streaming pipeline's throughput and latency, side by side
with what a bare consumer reads from the same broker.

One run, one embedded broker (Tansu), one `hytrec worker` process:

1. `events` events of the Taobao sample (synthetic ones when the data is absent), in time
   order, are published to `behaviors` before anything reads them.
2. raw: a bare aiokafka consumer (no group, every partition assigned, from the beginning)
   reads those events; `raw_consume_events_per_s` = events / (first fetch -> last record),
   the median of `raw_repeats` reads (one read takes ~0.1-0.2 s, so one alone is noisy).
3. plumbing: a worker serving the model-free `RecentItemsEngine` (recent_engine.py) works
   through the same events with its own consumer group: Faust, parsing, batching and
   publishing without the model, the index or snapshots; `plumbing_events_per_s`, measured
   like the engine's below, bounds what any model could reach through this pipeline.
4. engine: the model worker starts with a fresh consumer group and works through the same
   events at full speed; `engine_events_per_s` = events / (first event consumed -> the
   recommendation answering every user's last event). `ratio` = engine / raw.
5. latency: `paced_events` further events are published at a fixed `rate` events/s (their
   times are rewritten to one second apart, after the preloaded ones, so that the replay's
   `speed` is the input rate); latency is the producer's send of an event -> the worker's
   send of the recommendation answering it (p50, p99).
6. engine only: after the broker is gone, the same engine (checkpoint, index, batch size)
   in this process over the same events in log order: `engine_only_events_per_s`, what the
   model step and the search cost without Kafka, Faust or snapshots.

The model is a checkpoint (`--checkpoint`) or, by default, an untrained HyTRec with seeded
weights over the data's vocabulary: the cost of a step does not depend on the weights, so
the figures hold for a trained model of the same configuration (the JSON says which).
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

RESULT_PATH = Path("benchmarks/results/stream-cpu.json")
PLUMBING_ENGINE = "hytrec.stream.recent_engine:RecentItemsEngine"


@dataclass(frozen=True)
class StreamBenchConfig:
    dataset: str = "taobao"  # a dataset name or file; "synthetic" or a missing one generates
    events: int = 50_000  # preloaded: read by the bare consumer, then by the worker
    paced_events: int = 10_000  # published at `rate` after the full-speed phase
    rate: float = 1000.0  # events/s of the paced phase
    raw_repeats: int = 5  # bare-consumer reads; the median counts
    checkpoint: str | None = None  # None: an untrained, seeded HyTRec over the vocabulary
    d_model: int = 64  # of the untrained model (the demo's size)
    seed: int = 0
    top_k: int = 20
    batch_size: int = 256  # the worker's micro-batch: B events ...
    batch_wait_ms: float = 20.0  # ... or W ms
    device: str = "cpu"
    worker_timeout_s: float = 600.0
    output: Path = Path("runs/stream-benchmark")  # checkpoint, index, logs


# ---------------------------------------------------------------------------- setup


def model_checkpoint(
    events, checkpoint: str | None, d_model: int, seed: int, directory: Path
) -> tuple[Path, str]:
    """(checkpoint directory, description): the given checkpoint, or an untrained HyTRec
    (the demo's configuration at `d_model`) with seeded weights over the data's vocabulary,
    saved in `directory`. The cost of a step does not depend on the weights."""
    if checkpoint:
        return Path(checkpoint), f"checkpoint {checkpoint}"
    import torch

    from hytrec.bench.demo import DemoConfig
    from hytrec.model.hytrec import HyTRec

    torch.manual_seed(seed)
    model_config = replace(
        DemoConfig().model,
        d_model=d_model,
        dropout=0.0,
        num_items=len(events.items),
        num_categories=len(events.categories),
    )
    model = HyTRec(model_config, events.items, events.categories)
    model.save(directory)
    return directory, f"untrained HyTRec, seeded weights (torch.manual_seed({seed}))"


async def _raw_consume(bootstrap: str, topic: str, count: int, timeout_s: float) -> dict:
    """A bare aiokafka consumer reading `count` records of `topic` from the beginning."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-bench-raw",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,  # Tansu answers a long poll only after half of it
    )
    await consumer.start()
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise RuntimeError(f"topic {topic!r} has no partitions")
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got, nbytes = 0, 0
        deadline = time.monotonic() + timeout_s
        first = time.perf_counter()  # the first fetch (and the offset reset) counts too
        with tqdm(total=count, desc="raw consume", unit="ev", leave=False) as bar:
            while got < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw consumer read {got} of {count} events")
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    got += len(records)
                    nbytes += sum(len(r.value) for r in records)
                    bar.update(len(records))
                last = time.perf_counter()
    finally:
        await consumer.stop()
    seconds = last - first
    return {"events": got, "seconds": seconds, "events_per_s": got / seconds, "bytes": nbytes}


def raw_consume(
    bootstrap: str, count: int, topic: str = "behaviors", timeout_s=120.0, repeats: int = 1
) -> dict:
    """The median read (by events/s) of `repeats` reads of `count` records, each by a new
    consumer from the beginning; every read's events/s under `events_per_s_each`."""
    reads = [asyncio.run(_raw_consume(bootstrap, topic, count, timeout_s)) for _ in range(repeats)]
    reads.sort(key=lambda r: r["events_per_s"])
    return {**reads[len(reads) // 2], "events_per_s_each": [r["events_per_s"] for r in reads]}


def engine_only_rate(
    checkpoint: Path, index_dir: Path, payloads: list[dict], sent, config: StreamBenchConfig
) -> float:
    """Events/s of the model engine in this process over `payloads` (with the partitions and
    offsets they were sent to), in log order, `batch_size` events per batch."""
    from hytrec.stream.engine import EngineConfig, build_engine
    from hytrec.stream.schemas import BehaviorEvent

    engine = build_engine(
        checkpoint, index_dir, config=EngineConfig(top_k=config.top_k, device=config.device)
    )
    events = [
        BehaviorEvent(
            p["user_id"],
            p["item_id"],
            p["category_id"],
            p["behavior"],
            p["ts"],
            partition=int(sent.partition[i]),
            offset=int(sent.offset[i]),
            received_at=0.0,
        )
        for i, p in enumerate(payloads)
    ]
    started = time.perf_counter()
    for start in tqdm(range(0, len(events), config.batch_size), desc="engine only", leave=False):
        engine.process(events[start : start + config.batch_size])
    return len(events) / (time.perf_counter() - started)


def _paced_payloads(payloads: list[dict], after_ts: int) -> list[dict]:
    """The events with times one second apart, after `after_ts`: replayed at speed X, they
    go out at exactly X events/s, and every one is newer than its user's earlier events."""
    return [dict(p, ts=after_ts + 1 + i) for i, p in enumerate(payloads)]


# ---------------------------------------------------------------------------- the run


def run_benchmark(
    config: StreamBenchConfig = StreamBenchConfig(),
    result_path: Path | None = RESULT_PATH,
    command: str | None = None,
) -> dict:
    """Run the three phases; return the result (also written to `result_path` when given,
    with a latency histogram beside it)."""
    # the demo's pieces (and torch, FAISS) load only here: `hytrec --help` stays quick
    from hytrec.bench.demo import (
        Collector,
        DemoConfig,
        last_offsets,
        latency_ms,
        load_events,
        replay,
        start_worker,
        wait_until_answered,
    )
    from hytrec.bench.reports import machine_info, provenance
    from hytrec.index import IndexConfig, build_from_checkpoint
    from hytrec.stream.broker import EmbeddedBroker, stop_process
    from hytrec.stream.recent_engine import RecentItemsEngine
    from hytrec.stream.replay import log_events

    def full_speed(collector, worker, what: str) -> tuple[float, float, int]:
        """(events/s, seconds, recommendations) of a worker working through the preload."""
        wait_until_answered(
            collector, last_offsets(preload, preload_sent), worker, config.worker_timeout_s, what
        )
        answered = list(collector.received)
        # first event consumed: the earliest receive time among the answers (each answers
        # its user's newest event in a batch, so this is within one batch of the first)
        started = min(rec.received_at for _, rec in answered)
        seconds = max(ms for ms, _ in answered) / 1000.0 - started
        return config.events / seconds, seconds, len(answered)

    run_dir = config.output
    run_dir.mkdir(parents=True, exist_ok=True)
    machine_before = machine_info()
    events, dataset = load_events(config.dataset)
    payloads = list(log_events(events))
    needed = config.events + config.paced_events
    if len(payloads) < needed:
        raise ValueError(f"{dataset} has {len(payloads):,} events, the run needs {needed:,}")
    preload = payloads[: config.events]
    paced = _paced_payloads(payloads[config.events : needed], max(p["ts"] for p in preload))
    checkpoint, model_note = model_checkpoint(
        events, config.checkpoint, config.d_model, config.seed, run_dir / "checkpoint"
    )
    model_version = json.loads((checkpoint / "checkpoint.json").read_text())["version"]
    index_dir = run_dir / "index"
    build_from_checkpoint(checkpoint, IndexConfig(kind="flat")).save(index_dir)
    worker_config = DemoConfig(
        top_k=config.top_k,
        batch_size=config.batch_size,
        batch_wait_ms=config.batch_wait_ms,
        device=config.device,
    )
    print(
        f"{dataset}: {config.events:,} preloaded events of "
        f"{len({p['user_id'] for p in preload}):,} users, then {config.paced_events:,} at "
        f"{config.rate:,.0f} events/s; model: {model_note}",
        flush=True,
    )

    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        preload_sent = replay(preload, broker.bootstrap, None, "preload")
        raw = raw_consume(
            broker.bootstrap,
            config.events,
            timeout_s=config.worker_timeout_s,
            repeats=config.raw_repeats,
        )
        print(f"raw consumer: {raw['events_per_s']:,.0f} events/s", flush=True)

        collector = Collector(broker.bootstrap, RecentItemsEngine.model_version)
        worker = start_worker(
            None, None, broker.bootstrap, worker_config, run_dir, PLUMBING_ENGINE, "plumbing"
        )
        try:
            plumbing_rate, plumbing_s, _ = full_speed(collector, worker, "plumbing (no model)")
        finally:
            collector.close()
            stop_process(worker, timeout_s=20.0)
        print(f"plumbing (no model): {plumbing_rate:,.0f} events/s", flush=True)

        collector = Collector(broker.bootstrap, model_version)
        worker = start_worker(checkpoint, index_dir, broker.bootstrap, worker_config, run_dir)
        try:
            engine_rate, engine_s, engine_recs = full_speed(
                collector, worker, "engine (preloaded events)"
            )
            print(f"engine: {engine_rate:,.0f} events/s", flush=True)

            before = len(collector.received)
            paced_started = time.time()
            paced_sent = replay(paced, broker.bootstrap, config.rate, "paced")
            paced_publish_s = time.time() - paced_started
            wait_until_answered(
                collector,
                last_offsets(paced, paced_sent),
                worker,
                config.worker_timeout_s,
                "latency (paced events)",
            )
        finally:
            collector.close()
            stop_process(worker, timeout_s=20.0)
    latencies = latency_ms(collector.received[before:], paced, paced_sent)
    engine_only = engine_only_rate(checkpoint, index_dir, preload, preload_sent, config)
    print(f"engine only (no Kafka): {engine_only:,.0f} events/s", flush=True)
    result = {
        "benchmark": "stream",
        "device": config.device,
        "command": command or "hytrec benchmark stream",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        **provenance(),
        "machine": {**machine_before, "load_average_1m_after": machine_info()["load_average_1m"]},
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "output"},
            "dataset": dataset,
            "model": model_note,
            "users_preloaded": len({p["user_id"] for p in preload}),
            "paced_ts": "rewritten to 1 s apart after the preloaded events (fixed input rate)",
            "broker": "embedded Tansu (in-memory), 4 behaviors partitions",
        },
        "raw_consume_events_per_s": raw["events_per_s"],
        "raw_consume_seconds": raw["seconds"],
        "raw_consume_events_per_s_each": raw["events_per_s_each"],
        "engine_events_per_s": engine_rate,
        "engine_seconds": engine_s,
        "engine_recommendations": engine_recs,
        "ratio": engine_rate / raw["events_per_s"],
        "plumbing_events_per_s": plumbing_rate,
        "plumbing_seconds": plumbing_s,
        "plumbing_ratio": plumbing_rate / raw["events_per_s"],
        "engine_only_events_per_s": engine_only,
        "paced_input_events_per_s": len(paced) / paced_publish_s,
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p99": float(np.percentile(latencies, 99)),
        "latency_ms_max": float(latencies.max()),
        "latency_recommendations": len(latencies),
    }
    print_result(result)
    if result_path is not None:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, latencies, result_path.with_suffix(".png"))
        print(f"wrote {result_path} and {result_path.with_suffix('.png')}", flush=True)
    return result


def print_result(r: dict) -> None:
    c = r["config"]
    print(
        "\n".join(
            [
                "",
                f"== hytrec benchmark stream: {c['dataset']} on {r['device']} ==",
                f"raw consumer      {r['raw_consume_events_per_s']:>10,.0f} events/s "
                f"({c['events']:,} events in {r['raw_consume_seconds']:.2f} s)",
                f"engine            {r['engine_events_per_s']:>10,.0f} events/s "
                f"({c['events']:,} events in {r['engine_seconds']:.2f} s, "
                f"{r['engine_recommendations']:,} recommendations)",
                f"ratio             {r['ratio']:>10.3f}",
                f"plumbing          {r['plumbing_events_per_s']:>10,.0f} events/s "
                f"(the same worker without the model: ratio {r['plumbing_ratio']:.3f})",
                f"engine only       {r['engine_only_events_per_s']:>10,.0f} events/s "
                "(model step + search in one process, no Kafka)",
                f"latency at {r['paced_input_events_per_s']:,.0f} events/s: "
                f"p50 {r['latency_ms_p50']:.0f} ms, p99 {r['latency_ms_p99']:.0f} ms "
                f"({r['latency_recommendations']:,} recommendations)",
            ]
        ),
        flush=True,
    )


def plot(result: dict, latencies: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hytrec.bench.demo import latency_histogram

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["raw consumer", "plumbing\n(no model)", "engine only\n(no Kafka)", "engine"]
    keys = ["raw_consume", "plumbing", "engine_only", "engine"]
    rates = [result[f"{key}_events_per_s"] for key in keys]
    bars = left.bar(names, rates, color=["tab:gray", "tab:blue", "tab:green", "tab:orange"])
    left.bar_label(bars, labels=[f"{r:,.0f}" for r in rates])
    left.set_yscale("log")
    left.set_ylabel("events/s (log)")
    events, ratio = result["config"]["events"], result["ratio"]
    left.set_title(f"full speed, {events:,} events (ratio {ratio:.3f})")
    latency_histogram(right, latencies)
    right.set_title(f"latency at {result['paced_input_events_per_s']:,.0f} events/s")
    fig.suptitle(f"hytrec stream benchmark ({result['device']}, {result['machine']['cpus']} cpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line


def add_parser(benchmarks) -> None:
    d = StreamBenchConfig()
    parser = benchmarks.add_parser(
        "stream",
        help="stream engine throughput vs a bare consumer, and latency at a fixed rate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--dataset", default=d.dataset)
    parser.add_argument("--events", type=int, default=d.events, help="preloaded events")
    parser.add_argument("--paced-events", type=int, default=d.paced_events)
    parser.add_argument("--rate", type=float, default=d.rate, help="paced input, events/s")
    parser.add_argument("--raw-repeats", type=int, default=d.raw_repeats, help="bare reads")
    parser.add_argument("--checkpoint", help="HyTRec checkpoint (default: untrained, seeded)")
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--output", default=str(d.output), help="checkpoint, index, logs")
    parser.add_argument("--result", default=str(RESULT_PATH), help="the JSON (PNG beside it)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from hytrec.bench.reports import quiet_broker_clients

    quiet_broker_clients()
    config = StreamBenchConfig(
        dataset=args.dataset,
        events=args.events,
        paced_events=args.paced_events,
        rate=args.rate,
        raw_repeats=args.raw_repeats,
        checkpoint=args.checkpoint,
        d_model=args.d_model,
        top_k=args.top_k,
        batch_size=args.batch_size,
        batch_wait_ms=args.batch_wait_ms,
        device=args.device,
        output=Path(args.output),
    )
    command = "hytrec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_benchmark(config, Path(args.result), command)
    return 0 if all(math.isfinite(result[k]) for k in ("engine_events_per_s", "ratio")) else 1
