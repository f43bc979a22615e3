"""The main job end to end, `hytrec demo` / `make demo`: train, index, stream, measure.

1. Load the Taobao sample from the shared data folder (else synthetic events) and cut it in
   time: the earlier part trains the model, the last `heldout_fraction` is held out.
2. Train a small model (HyTRec with the repeat/explore head, or another registered one,
   with or without it) on the earlier part, or reuse
   the cached checkpoint of the same data and configuration; build and save the exact
   FAISS index of its items. With the head, the last `calibration_fraction` of the earlier
   part's time span is left out of training and the head's gate bias is fitted on it
   (`calibration.fit_gate_bias`): later events than any training target, as the held-out
   ones are; the stream still reads the whole earlier part.
3. Start the embedded broker and a worker process, and wait until a probe event comes back
   as a recommendation (so start-up time is not counted as latency).
4. Replay the earlier part at full speed (the users' long-term state builds up through the
   stream, which measures throughput), then the held-out part paced over about
   `heldout_seconds` (which measures event-to-recommendation latency without a backlog).
5. Score every held-out event against the recommendation its user had just before it,
   beside five baselines on the same events (popularity, the user's recent items, the
   user's items by frequency and by recency-frequency, item-to-item transitions;
   `hit_rates`), also on the events
   whose item is new to the user; print a summary, write JSON (with the commit and the
   machine it ran on) and a plot; stop the worker and the broker.

`python -m hytrec.bench.demo SUMMARY.json` prints a saved summary the way the demo does
(the README's demo block is that print of `benchmarks/results/demo-cpu.json`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hytrec.bench.reports import machine_info, provenance
from hytrec.index import IndexConfig, build_from_checkpoint
from hytrec.index.semantic_ids import SemanticIdConfig
from hytrec.index.semantic_ids import build_from_checkpoint as build_semantic_ids
from hytrec.model.base import CheckpointError, read_checkpoint_meta
from hytrec.model.calibration import GateCalibrationConfig, calibrate_checkpoint
from hytrec.model.codebook import SemanticIds, SemanticIdsError
from hytrec.model.data import (
    TAOBAO_WINDOW,
    ColumnMap,
    DataError,
    cache_dir,
    load_named,
    select,
    utc_date,
)
from hytrec.model.device import resolve_device
from hytrec.model.evaluate import leave_one_out, paired_bootstrap
from hytrec.model.events import EventLog
from hytrec.model.hisac import HiSACConfig
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.registry import load_model, spec_of
from hytrec.model.repeat import RepeatConfig
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.synthetic import generate
from hytrec.model.train import TrainConfig, train
from hytrec.stream.broker import EmbeddedBroker, die_with_parent, stop_process
from hytrec.stream.replay import SYNTHETIC, ReplayConfig, log_events, publish_events
from hytrec.stream.schemas import Recommendation
from hytrec.stream.tail import read_topic

log = logging.getLogger(__name__)
PROBE_USER = "demo-probe"  # the readiness probe's user; left out of every figure


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "taobao"  # a dataset name or file; "synthetic", or a missing one, generates
    columns: ColumnMap | None = None  # how to read `dataset` when it is a file of one's own
    heldout_fraction: float = 0.2  # the last part of the log's time span, replayed and scored
    # any registered model's config; its vocabulary sizes come from the data
    model: object = HyTRecConfig(d_model=64, dropout=0.2, repeat_head=RepeatConfig())
    # the accuracy harness's Taobao settings: 26 steps per epoch over up to 200 events each;
    # the head passes recent-items from its third epoch (accuracy-taobao.json's history)
    train: TrainConfig = TrainConfig(
        epochs=40, patience=3, valid_users=None, negatives=1024, batch_size=32, max_len=200
    )
    train_seconds: float = 300.0  # training stops after this long (first run only: cached)
    # with a repeat head: the last part of the training history's time span, not trained on,
    # that fits the head's gate bias (0: the gate as trained)
    calibration_fraction: float = 0.1
    calibration: GateCalibrationConfig = GateCalibrationConfig()
    top_k: int = 20
    heldout_seconds: float = 30.0  # the held-out replay is paced to take about this long
    batch_size: int = 256  # worker micro-batch: B events ...
    batch_wait_ms: float = 20.0  # ... or W ms
    device: str = "auto"  # training and worker; auto: CUDA when present
    worker_timeout_s: float = 300.0  # longest wait for the worker to answer everything
    sample_users: int = 3
    output: Path = Path("runs/demo")


@dataclass
class Sent:
    """Where each replayed event landed: filled by the producer's delivery callbacks."""

    partition: np.ndarray
    offset: np.ndarray
    sent_ms: np.ndarray  # the producer's record timestamp

    @classmethod
    def empty(cls, n: int) -> Sent:
        return cls(np.full(n, -1), np.full(n, -1), np.zeros(n, dtype=np.int64))

    def record(self, i: int, metadata) -> None:
        self.partition[i], self.offset[i], self.sent_ms[i] = (
            metadata.partition,
            metadata.offset,
            metadata.timestamp,
        )


@dataclass
class Collector:
    """Reads `recommendations` in a thread: (record timestamp ms, recommendation) pairs, of
    one model version only when `model_version` is given."""

    bootstrap: str
    model_version: str | None = None
    received: list[tuple[int, Recommendation]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="demo-collector", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for record in read_topic(
            self.bootstrap, "recommendations", idle_timeout_s=float("inf"), stop=self.stop
        ):
            rec = Recommendation.from_json(record.value)
            if self.model_version in (None, rec.model_version):
                self.received.append((record.timestamp, rec))

    def latest_offsets(self) -> dict[str, int]:
        """user -> source offset of the newest event answered so far."""
        latest: dict[str, int] = {}
        for _, rec in list(self.received):
            latest[rec.user_id] = max(latest.get(rec.user_id, -1), rec.source_offset)
        return latest

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


# ---------------------------------------------------------------------------- data and model


def load_events(dataset: str, columns: ColumnMap | None = None) -> tuple[EventLog, str]:
    """(events, description): the named data, or synthetic events when it is absent (a file
    read through `columns` must be there)."""
    if dataset != "synthetic":
        try:
            events = load_named(dataset, columns=columns)
        except FileNotFoundError as err:
            if columns is not None:
                raise
            print(f"{err}; using synthetic events instead", flush=True)
        else:
            if dataset == "taobao":  # the sample has a few rows outside the dataset's 9 days
                start, end = TAOBAO_WINDOW
                events = select(events, (events.ts >= start) & (events.ts < end))
            return events, dataset
    return generate(SYNTHETIC), "synthetic"


def time_cut(events: EventLog, heldout_fraction: float) -> int:
    """The time from which events are held out: the last fraction of the time span."""
    first, last = int(events.ts.min()), int(events.ts.max())
    return int(last - heldout_fraction * (last - first))


def semantic_ids_for(events: EventLog, history: EventLog, config: DemoConfig, device: str):
    """The semantic-IDs directory HiSAC routes through: beside a SASRec trained on the
    demo's history (half the training time), built once and cached with it."""
    sasrec = SASRecConfig(d_model=64, layers=2, heads=2, max_len=50)
    source = replace(config, model=sasrec, train_seconds=config.train_seconds / 2)
    checkpoint, _ = trained_checkpoint(events, history, source, device)
    directory = checkpoint / "semantic-ids"
    try:
        SemanticIds.load(directory)
    except SemanticIdsError:
        print(f"building semantic IDs over {checkpoint}'s item table", flush=True)
        build_semantic_ids(checkpoint, SemanticIdConfig()).save(directory)
    return directory


def trained_checkpoint(
    events: EventLog, history: EventLog, config: DemoConfig, device: str
) -> tuple[Path, bool]:
    """(checkpoint directory, reused): train on `history`, or reuse the cached result of the
    same data and configuration. HiSAC without semantic IDs first gets them: a SASRec
    trained (and cached) the same way, its item table coded by `build-semantic-ids`."""
    if isinstance(config.model, HiSACConfig) and config.model.semantic_ids is None:
        codes = semantic_ids_for(events, history, config, device)
        config = replace(config, model=replace(config.model, semantic_ids=str(codes)))
    model_config, name = config.model, spec_of(config.model).name  # train() sizes it
    calibrating = getattr(model_config, "repeat_head", None) is not None
    calibrating = calibrating and config.calibration_fraction > 0
    calibration = replace(config.calibration, top_k=config.top_k)  # the demo's list
    if calibrating:
        calibration_start = time_cut(history, config.calibration_fraction)
        training_log = select(history, history.ts < calibration_start)
    else:
        training_log = history
    train_config = replace(
        config.train,
        time_budget_s=config.train_seconds,
        device=device,
        negatives=config.train.negatives if len(events.items) > 4 * config.train.negatives else 0,
    )
    identity = json.dumps(
        {
            "events": [len(history), int(history.ts.sum()), int(history.item.sum())],
            "items": len(events.items),
            "model": [name, asdict(model_config)],
            "train": asdict(replace(train_config, device="")),
            "calibration": calibrating and [config.calibration_fraction, asdict(calibration)],
        },
        sort_keys=True,
    )
    directory = cache_dir() / "demo" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    try:
        load_model(directory)
        reused = True
    except CheckpointError:
        print(
            f"training {name} on {len(training_log):,} events for up to "
            f"{config.train_seconds:.0f} s on {device} (cached for the next run in {directory})",
            flush=True,
        )
        # `select` keeps the whole log's vocabulary, so held-out events of new items apply
        split = leave_one_out(training_log)
        result = train(model_config, training_log, split, train_config, directory, "demo")
        print(
            f"trained {len(result.history)} epochs in {result.train_seconds:.0f} s; "
            f"validation NDCG@10 {result.valid.get('NDCG@10', float('nan')):.4f}",
            flush=True,
        )
        reused = False
    # a checkpoint cached before its calibration finished is calibrated now
    if calibrating and "gate_calibration" not in read_checkpoint_meta(directory)["extra"]:
        fit = calibrate_checkpoint(directory, history, calibration_start, calibration)
        print(calibration_line(fit), flush=True)
    return directory, reused


# ---------------------------------------------------------------------------- processes


def start_worker(
    checkpoint: Path | None,
    index: Path | None,
    bootstrap: str,
    config: DemoConfig,
    run_dir: Path,
    engine: str | None = None,
    name: str = "worker",
) -> subprocess.Popen:
    """`hytrec worker` in a process that dies with this one, serving the checkpoint (or the
    engine factory MODULE:CALLABLE); its own consumer group (`worker_group(name)`) and
    run_dir/<name>.log."""
    source = (
        [f"--engine={engine}"] if engine else [f"--checkpoint={checkpoint}", f"--index={index}"]
    )
    data_dir = run_dir / "faust" / name
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    command = [
        sys.executable,
        "-m",
        "hytrec.cli",
        "worker",
        *source,
        f"--bootstrap={bootstrap}",
        "--embedded-broker",
        f"--group={worker_group(name)}",
        f"--device={config.device}",
        f"--top-k={config.top_k}",
        f"--batch-size={config.batch_size}",
        f"--batch-wait-ms={config.batch_wait_ms}",
        f"--data-dir={data_dir}",
    ]
    return subprocess.Popen(
        command,
        stdout=open(run_dir / f"{name}.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(os.getpid()),
    )


def worker_group(name: str = "worker") -> str:
    """The consumer group `start_worker` gives a worker of this name: one per process."""
    return f"hytrec-demo-{os.getpid()}" + ("" if name == "worker" else f"-{name}")


def wait_until_answered(
    collector: Collector,
    last_offset: dict[str, int],
    worker: subprocess.Popen,
    timeout_s: float,
    what: str,
) -> None:
    """Until each user's newest answered offset reaches `last_offset[user]`."""
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(last_offset), desc=what, unit="user", leave=False) as bar:
        while True:
            latest = collector.latest_offsets()
            done = sum(latest.get(u, -1) >= o for u, o in last_offset.items())
            bar.update(done - bar.n)
            if done == len(last_offset):
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}; see its log")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: {len(last_offset) - done} of {len(last_offset)} users unanswered "
                    f"after {timeout_s:.0f} s"
                )
            time.sleep(0.1)


def replay(payloads: list[dict], bootstrap: str, speed: float | None, desc: str) -> Sent:
    sent = Sent.empty(len(payloads))
    publish_events(payloads, bootstrap, ReplayConfig(speed=speed), len(payloads), sent.record)
    if (sent.offset < 0).any():
        raise RuntimeError(f"{desc}: {(sent.offset < 0).sum()} events have no delivery report")
    return sent


def last_offsets(payloads: list[dict], sent: Sent) -> dict[str, int]:
    return {p["user_id"]: int(sent.offset[i]) for i, p in enumerate(payloads)}


# ---------------------------------------------------------------------------- figures


def latency_ms(received, payloads: list[dict], sent: Sent) -> np.ndarray:
    """Producer send of an event -> the worker's send of the recommendation answering it."""
    sent_at = {
        (int(sent.partition[i]), int(sent.offset[i])): int(sent.sent_ms[i])
        for i in range(len(payloads))
    }
    out = [
        ms - sent_at[(rec.source_partition, rec.source_offset)]
        for ms, rec in received
        if (rec.source_partition, rec.source_offset) in sent_at
    ]
    return np.asarray(out, dtype=np.float64)


class TransitionBaseline:
    """The item-transition baseline (`hytrec.model.heuristics.ItemTransition`, on payloads):
    the items that most often directly followed the user's last item in a user's history
    events, then the most popular ones."""

    def __init__(self, history: list[dict], top_k: int):
        self.top_k = top_k
        self.popularity = Counter(p["item_id"] for p in history)
        self.popular = [item for item, _ in self.popularity.most_common(top_k)]
        self.follows: dict[str, Counter] = {}
        last: dict[str, str] = {}  # user -> its previous item
        for p in history:
            previous = last.get(p["user_id"])
            if previous is not None:
                self.follows.setdefault(previous, Counter())[p["item_id"]] += 1
            last[p["user_id"]] = p["item_id"]
        self._cache: dict[str, list[str]] = {}

    def recommend(self, last_item: str | None) -> list[str]:
        """Successors by count (ties by popularity), then the popular items: top_k."""
        if last_item not in self._cache:
            follows = self.follows.get(last_item, Counter())
            ranked = sorted(follows, key=lambda i: (-follows[i], -self.popularity[i]))
            top = list(dict.fromkeys(ranked[: self.top_k] + self.popular))[: self.top_k]
            self._cache[last_item] = top
        return self._cache[last_item]


def user_frequency(past: list[str], top_k: int) -> list[str]:
    """The user's items by count, ties by recency (`heuristics.UserFrequency`)."""
    newest = {item: n for n, item in enumerate(past)}
    counts = Counter(past)
    return sorted(counts, key=lambda i: (-counts[i], -newest[i]))[:top_k]


def recency_frequency(past: list[str], top_k: int) -> list[str]:
    """The user's items by count / (1 + distinct items touched since its newest event), ties
    by recency (`heuristics.RecencyFrequency`; equal ratios give equal floats, both correctly
    rounded)."""
    newest_first = list(dict.fromkeys(reversed(past)))  # k: distinct items touched since
    counts = Counter(past)
    ranked = sorted(range(len(newest_first)), key=lambda k: (-counts[newest_first[k]] / (1 + k), k))
    return [newest_first[k] for k in ranked[:top_k]]


def hit_rates(
    received, history: list[dict], heldout: list[dict], sent: Sent, top_k: int
) -> dict[str, float | int]:
    """Each held-out event whose user had a recommendation before it counts once: a hit when
    its item is in that recommendation; the baselines are scored on the same events and
    from the same information, the user's events up to the one that recommendation
    answered (the worker answers a user's newest event of each micro-batch, so the events
    just before one may not have reached its recommendation yet), and so are the events
    whose item is new to the user (where the user's own items cannot hit). For reference,
    `recent_items_hit@K_all_events`: the user's recent items knowing every earlier event.
    The `_no_lag` figures: every list again, on the events whose recommendation knew every
    earlier event of the user (it answered the user's event just before): what a worker
    that keeps up with each user's pace is scored on. A replay thousands of times faster
    than real time puts a user's next events in the micro-batch still being answered, and
    a recommendation several events old costs a model that reads the last events more
    than a rule that counts them.

    Beside hit@K, NDCG@K (1 / log2(2 + rank) for a hit at 0-based rank) says how high the
    list put the item; `vs_best_heuristic` gives, for each metric, the model's difference to
    the best baseline on it with a 95 % interval (paired bootstrap over users, each user's
    events together: `paired_bootstrap` with events as weights)."""
    recs_by_user: dict[str, list[tuple[int, list[str]]]] = {}
    for _, rec in sorted(received, key=lambda pair: pair[1].source_offset):
        recs_by_user.setdefault(rec.user_id, []).append((rec.source_offset, rec.items))
    transition = TransitionBaseline(history, top_k)
    seen: dict[str, list[str]] = {}  # user -> items in time order, for the user baselines
    for p in history:
        seen.setdefault(p["user_id"], []).append(p["item_id"])
    in_history = {user: len(items) for user, items in seen.items()}
    heldout_offsets: dict[str, list[int]] = {}  # user -> offsets of its held-out events so far
    names = (
        "model",
        "popularity",
        "recent_items",
        "user_frequency",
        "recency_frequency",
        "item_transition",
    )
    new_hits, no_lag_hits = Counter(), Counter()
    scored = new_scored = all_events_hits = no_lag = 0
    per_user: dict[str, Counter] = {}  # user -> its events, hits and gains per list
    for i, p in enumerate(heldout):
        user, item, offset = p["user_id"], p["item_id"], int(sent.offset[i])
        mine = recs_by_user.get(user, [])
        before = bisect.bisect_left(mine, (offset,)) - 1
        past = seen.setdefault(user, [])
        offsets = heldout_offsets.setdefault(user, [])
        if before >= 0:
            answered, recommended = mine[before]
            # what the recommendation knew: the history (all answered before the held-out
            # replay) and the held-out events up to the one it answered
            known = past[: in_history.get(user, 0) + bisect.bisect_right(offsets, answered)]
            lists = {
                "model": recommended[:top_k],
                "popularity": transition.popular,
                "recent_items": list(dict.fromkeys(reversed(known)))[:top_k],
                "user_frequency": user_frequency(known, top_k),
                "recency_frequency": recency_frequency(known, top_k),
                "item_transition": transition.recommend(known[-1] if known else None),
            }
            scored += 1
            new = item not in past
            new_scored += new
            current = len(known) == len(past)  # it answered the user's event just before
            no_lag += current
            mine_scored = per_user.setdefault(user, Counter())
            mine_scored["events"] += 1
            mine_scored["events_no_lag"] += current
            for name in names:
                hit = item in lists[name]
                gain = 1.0 / np.log2(2 + lists[name].index(item)) if hit else 0.0
                new_hits[name] += hit and new
                no_lag_hits[name] += hit and current
                mine_scored[f"{name}_hit"] += hit
                mine_scored[f"{name}_ndcg"] += gain
                mine_scored[f"{name}_hit_no_lag"] += hit and current
            all_events_hits += item in list(dict.fromkeys(reversed(past)))[:top_k]
        past.append(item)
        offsets.append(offset)
    rate = lambda n, d: n / d if d else float("nan")  # noqa: E731
    totals = sum(per_user.values(), Counter())  # hits and gains per list, over all users
    return {
        "scored_events": scored,
        **{f"{name}_hit@{top_k}": rate(totals[f"{name}_hit"], scored) for name in names},
        **{f"{name}_ndcg@{top_k}": rate(totals[f"{name}_ndcg"], scored) for name in names},
        f"recent_items_hit@{top_k}_all_events": rate(all_events_hits, scored),
        "new_item_events": new_scored,
        **{
            f"{name}_hit@{top_k}_new_items": rate(new_hits[name], new_scored)
            for name in ("model", "popularity", "item_transition")
        },
        "vs_best_heuristic": {
            f"{metric}@{top_k}": against_best_heuristic(per_user, names[1:], metric)
            for metric in ("hit", "ndcg")
        },
        "no_lag_events": no_lag,
        **{f"{name}_hit@{top_k}_no_lag": rate(no_lag_hits[name], no_lag) for name in names},
        "vs_best_heuristic_no_lag": {
            f"hit@{top_k}": against_best_heuristic(per_user, names[1:], "hit", "_no_lag")
        },
    }


def against_best_heuristic(
    per_user: dict[str, Counter], heuristics, metric: str, subset: str = ""
) -> dict:
    """The model's difference in `metric` ("hit" or "ndcg") per scored event to the best of
    `heuristics` on it, with a 95 % interval: per-user means weighted by the user's events,
    users resampled (their events stay together), the same users for both sides. subset:
    the suffix of the counters of a subset of the events ("_no_lag"; "": all of them)."""
    users = [u for u in per_user.values() if u[f"events{subset}"]]
    if not users:
        return {"heuristic": None, "diff": float("nan"), "diff_ci95": [float("nan")] * 2}
    events = np.array([u[f"events{subset}"] for u in users], dtype=np.float64)

    def means(name: str) -> np.ndarray:
        return np.array([u[f"{name}_{metric}{subset}"] for u in users]) / events

    best = max(heuristics, key=lambda name: float(np.average(means(name), weights=events)))
    out = paired_bootstrap(means("model"), means(best), weights=events)
    return {"heuristic": best, "diff": out["diff"], "diff_ci95": out["diff_ci"]}


def sample_users(received, events: list[dict], count: int, shown: int = 5) -> list[dict]:
    """The most active users: their last events and their final recommendation, each item
    with its score and where it came from (repeat / explore, or ULIM's category)."""
    final = {rec.user_id: rec for _, rec in received}
    by_user: dict[str, list[dict]] = {}
    for p in events:
        by_user.setdefault(p["user_id"], []).append(p)
    busiest = sorted(by_user, key=lambda u: -len(by_user[u]))[:count]
    samples = []
    for user in busiest:
        rec = final.get(user)
        seen = {p["item_id"] for p in by_user[user]}
        samples.append(
            {
                "user_id": user,
                "events": len(by_user[user]),
                "recent": [
                    f"{_time(p['ts'])} {p['behavior']:<12} item {p['item_id']} "
                    f"(category {p['category_id']})"
                    for p in by_user[user][-shown:]
                ],
                "recommended": [
                    f"{item} ({score:.2f}{', ' + source if source else ''})"
                    f"{' seen' if item in seen else ''}"
                    for item, score, source in zip(
                        rec.items[:10],
                        rec.scores[:10],
                        (rec.sources or [""] * len(rec.items))[:10],
                        strict=True,
                    )
                ]
                if rec
                else [],
            }
        )
    return samples


def _time(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%m-%d %H:%M")


def latency_histogram(ax, latencies: np.ndarray) -> None:
    """Event-to-recommendation latencies (ms) on a matplotlib axis, p50 and p99 marked."""
    if len(latencies):
        ax.hist(latencies, bins=50, color="tab:blue")
        for q, style in ((50, "--"), (99, ":")):
            value = np.percentile(latencies, q)
            ax.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.0f} ms")
        ax.legend()
    ax.set_xlabel("event -> recommendation (ms)")
    ax.set_ylabel("recommendations")


def plot(summary: dict, latencies: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    latency_histogram(left, latencies)
    left.set_title(f"latency, held-out replay at {summary['heldout_rate_eps']:.0f} events/s")
    k, q = summary["top_k"], summary["quality"]
    names = [
        "model",
        "recent_items",
        "user_frequency",
        "recency_frequency",
        "item_transition",
        "popularity",
    ]
    labels = [
        summary["model"] + (" +\nrepeat head" if summary.get("repeat_head") else ""),
        "recent\nitems",
        "user\nfrequency",
        "recency-\nfrequency",
        "item\ntransition",
        "popularity",
    ]
    x = np.arange(len(names))
    right.bar(x - 0.2, [q[f"{n}_hit@{k}"] for n in names], 0.4, label="all held-out events")
    new = [q.get(f"{n}_hit@{k}_new_items", 0.0) for n in names]  # the user's own items: 0
    right.bar(x + 0.2, new, 0.4, label=f"items new to the user ({q['new_item_events']:,})")
    right.set_xticks(x, labels)
    right.set_ylabel(f"hit@{k} of the next event")
    right.set_title(f"{q['scored_events']:,} held-out events")
    lagless = q[f"recent_items_hit@{k}_all_events"]
    right.axhline(lagless, color="gray", linestyle=":", label="recent items, every event known")
    right.set_ylim(0, 1.3 * max(lagless, *(q[f"{n}_hit@{k}"] for n in names)))  # legend room
    right.legend(fontsize="small")
    fig.suptitle(f"hytrec demo on {summary['dataset']} ({summary['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the job


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Run the whole job; return the summary (also written to config.output)."""
    run_dir = config.output
    run_dir.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(config.device))
    events, dataset = load_events(config.dataset, config.columns)
    cut = time_cut(events, config.heldout_fraction)
    history_log = select(events, events.ts < cut)
    heldout_log = select(events, events.ts >= cut)
    if len(history_log) < len(events) // 10:  # e.g. a file with a few events years early
        raise DataError(
            f"{dataset}: the last {config.heldout_fraction:.0%} of the time span (from "
            f"{utc_date(cut)}) holds {len(heldout_log):,} of the {len(events):,} events, "
            f"leaving {len(history_log):,} to train on: a few events long before the others "
            f"stretch the span (the first at {utc_date(int(events.ts.min()))}, 99 % after "
            f"{utc_date(int(np.quantile(events.ts, 0.01, method='inverted_cdf')))}); leave them "
            "out of the file "
            "(`hytrec data inspect` shows the span)"
        )
    print(
        f"{dataset}: {len(events):,} events of {len(events.users):,} users, "
        f"{len(events.items):,} items; {len(history_log):,} before {_time(cut)} train and "
        f"warm the stream, {len(heldout_log):,} after it are held out",
        flush=True,
    )
    checkpoint, reused = trained_checkpoint(events, history_log, config, device)
    if reused:
        print(f"reusing the trained checkpoint {checkpoint}", flush=True)
    index_dir = run_dir / "index"
    build_from_checkpoint(checkpoint, IndexConfig(kind="flat")).save(index_dir)
    history, heldout = list(log_events(history_log)), list(log_events(heldout_log))
    span = max(heldout[-1]["ts"] - heldout[0]["ts"], 1)
    speed = span / config.heldout_seconds

    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        worker = start_worker(checkpoint, index_dir, broker.bootstrap, config, run_dir)
        collector = Collector(broker.bootstrap)
        try:
            print(f"broker at {broker.bootstrap}; worker pid {worker.pid} starting", flush=True)
            probe = [dict(heldout[0], user_id=PROBE_USER)]
            probe_sent = replay(probe, broker.bootstrap, None, "probe")
            wait_until_answered(
                collector,
                last_offsets(probe, probe_sent),
                worker,
                config.worker_timeout_s,
                "worker start",
            )
            started = time.time()
            history_sent = replay(history, broker.bootstrap, None, "history")
            wait_until_answered(
                collector,
                last_offsets(history, history_sent),
                worker,
                config.worker_timeout_s,
                "history answered",
            )
            history_s = time.time() - started
            print(f"replaying held-out events at {speed:.0f}x real time", flush=True)
            before = len(collector.received)
            started = time.time()
            heldout_sent = replay(heldout, broker.bootstrap, speed, "held-out")
            wait_until_answered(
                collector,
                last_offsets(heldout, heldout_sent),
                worker,
                config.worker_timeout_s,
                "held-out answered",
            )
            heldout_s = time.time() - started
        finally:
            collector.close()
            stop_process(worker, timeout_s=20.0)
    received = [(ms, rec) for ms, rec in collector.received if rec.user_id != PROBE_USER]
    heldout_received = [(ms, rec) for ms, rec in collector.received[before:]]
    latencies = latency_ms(heldout_received, heldout, heldout_sent)
    summary = {
        "dataset": dataset,
        "model": spec_of(config.model).name,
        "repeat_head": getattr(config.model, "repeat_head", None) is not None,
        "device": device,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": machine_info(),
        "checkpoint": str(checkpoint),
        "checkpoint_reused": reused,
        "gate_calibration": read_checkpoint_meta(checkpoint)["extra"].get("gate_calibration"),
        "top_k": config.top_k,
        "batch": {"max_events": config.batch_size, "max_wait_ms": config.batch_wait_ms},
        "events_in": len(history) + len(heldout),
        "recommendations_out": len(received),
        "users": len({p["user_id"] for p in history + heldout}),
        "history_events": len(history),
        "history_seconds": round(history_s, 2),
        "history_rate_eps": len(history) / history_s,
        "heldout_events": len(heldout),
        "heldout_seconds": round(heldout_s, 2),
        "heldout_rate_eps": len(heldout) / heldout_s,
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
            "max": float(latencies.max()),
            "recommendations": len(latencies),
        },
        "quality": hit_rates(received, history, heldout, heldout_sent, config.top_k),
        "sample_users": sample_users(received, history + heldout, config.sample_users),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, latencies, run_dir / "demo.png")
    print_summary(summary, run_dir)
    return summary


def summary_lines(s: dict) -> list[str]:
    """The figures of a summary as the demo prints them (and the README shows them)."""
    lat, machine = s["latency_ms"], s["machine"]
    commit = s["git_commit"][:12] if s["provenance_ok"] else f"{s['git_commit']} (NOT clean)"
    return [
        f"== hytrec demo: {s['dataset']} on {s['device']} ==",
        f"code                 commit {commit}, {s['date'][:10]}; {machine['cpu']}, "
        f"{machine['cpus']} cpus, gpu {', '.join(machine['gpus']) or 'none'}",
        f"events in            {s['events_in']:,} ({s['users']:,} users)",
        f"recommendations out  {s['recommendations_out']:,}",
        f"full-speed replay    {s['history_events']:,} events in {s['history_seconds']:.1f} s "
        f"= {s['history_rate_eps']:,.0f} events/s end to end",
        f"paced replay         {s['heldout_events']:,} events at {s['heldout_rate_eps']:,.0f} "
        f"events/s: latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms",
        *calibration_lines(s),
        *quality_lines(s),
    ]


def calibration_lines(s: dict) -> list[str]:
    """The head's gate calibration, where the served model had one."""
    fit = s.get("gate_calibration")
    return [calibration_line(fit)] if fit else []


def calibration_line(fit: dict) -> str:
    """A gate calibration's report (`calibration.calibrate_checkpoint`) in one line."""
    k = fit["top_k"]
    by_shift = fit[f"hit@{k}_by_shift"]
    return (
        f"gate calibration     bias {fit['gate_bias']:+.2f}: hit@{k} "
        f"{by_shift[str(fit['shift'])]:.3f} against {by_shift['0.0']:.3f} as trained, on "
        f"{fit['events']:,} events after the training period (not trained on)"
    )


def served_name(s: dict) -> str:
    """The served model as the summary lines name it."""
    return s["model"] + (" with the repeat head" if s.get("repeat_head") else "")


def quality_lines(s: dict) -> list[str]:
    """The hit rates of a summary: the served model beside every baseline."""
    k, q = s["top_k"], s["quality"]
    model = served_name(s)
    return [
        f"next-event hit@{k}    {model} {q[f'model_hit@{k}']:.3f} | user's recent items "
        f"{q[f'recent_items_hit@{k}']:.3f} | user frequency {q[f'user_frequency_hit@{k}']:.3f} "
        f"| recency-frequency {q[f'recency_frequency_hit@{k}']:.3f} | item transition "
        f"{q[f'item_transition_hit@{k}']:.3f} | popularity "
        f"{q[f'popularity_hit@{k}']:.3f} ({q['scored_events']:,} held-out events)",
        *ranking_lines(s),
        f"  knowing every earlier event (no micro-batch lag): user's recent items "
        f"{q[f'recent_items_hit@{k}_all_events']:.3f}",
        *no_lag_lines(s),
        f"  items new to the user: {model} {q[f'model_hit@{k}_new_items']:.3f} | item "
        f"transition {q[f'item_transition_hit@{k}_new_items']:.3f} | popularity "
        f"{q[f'popularity_hit@{k}_new_items']:.3f} ({q['new_item_events']:,} events)",
    ]


def no_lag_lines(s: dict) -> list[str]:
    """hit@K on the events whose recommendation knew every earlier event of the user
    (summaries before these were measured have none)."""
    k, q = s["top_k"], s["quality"]
    if "no_lag_events" not in q:
        return []
    model = served_name(s)
    v = q["vs_best_heuristic_no_lag"][f"hit@{k}"]
    low, high = v["diff_ci95"]
    best = (v["heuristic"] or "none").replace("_", "-")
    return [
        f"  answers that knew every earlier event ({q['no_lag_events']:,} events): hit@{k} "
        f"{model} {q[f'model_hit@{k}_no_lag']:.3f} | user's recent items "
        f"{q[f'recent_items_hit@{k}_no_lag']:.3f} | recency-frequency "
        f"{q[f'recency_frequency_hit@{k}_no_lag']:.3f}; minus the best heuristic "
        f"{v['diff']:+.3f} [{low:+.3f}, {high:+.3f}] against {best}",
    ]


def ranking_lines(s: dict) -> list[str]:
    """NDCG of every list and the model against the best heuristic (summaries before these
    were measured have neither)."""
    k, q = s["top_k"], s["quality"]
    if "vs_best_heuristic" not in q:
        return []
    model = served_name(s)

    def versus(metric: str, label: str) -> str:
        v = q["vs_best_heuristic"][f"{metric}@{k}"]
        low, high = v["diff_ci95"]
        best = v["heuristic"].replace("_", "-")
        return f"{label} {v['diff']:+.3f} [{low:+.3f}, {high:+.3f}] against {best}"

    return [
        f"next-event NDCG@{k}   {model} {q[f'model_ndcg@{k}']:.3f} | user's recent items "
        f"{q[f'recent_items_ndcg@{k}']:.3f} | user frequency {q[f'user_frequency_ndcg@{k}']:.3f} "
        f"| recency-frequency {q[f'recency_frequency_ndcg@{k}']:.3f} | item transition "
        f"{q[f'item_transition_ndcg@{k}']:.3f} | popularity {q[f'popularity_ndcg@{k}']:.3f}",
        f"  {model} minus the best heuristic (95 % interval over users): "
        f"{versus('hit', f'hit@{k}')}, {versus('ndcg', f'NDCG@{k}')}",
    ]


def print_summary(s: dict, run_dir: Path) -> None:
    lines = ["", *summary_lines(s)]
    for user in s["sample_users"]:
        lines.append(f"user {user['user_id']} ({user['events']} events), latest:")
        lines += [f"    {line}" for line in user["recent"]]
        lines.append(f"  recommended: {', '.join(user['recommended'])}")
    lines.append(f"summary: {run_dir / 'summary.json'}, plot: {run_dir / 'demo.png'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":  # print a saved summary: python -m hytrec.bench.demo SUMMARY.json
    print("\n".join(summary_lines(json.loads(Path(sys.argv[1]).read_text()))))
