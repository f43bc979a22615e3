"""`hytrec benchmark chaos`: effectively-once user state under kill -9 and rebalances.

One trial: an embedded broker (Tansu), real Taobao events (a missing dataset is an error;
`--synthetic` asks for generated events instead, and the JSON then says so) published in
paced chunks, and a consumer group of `hytrec worker` processes running
the model engine (an untrained HyTRec with seeded weights over the data's vocabulary; the
weights do not matter for delivery). While the events flow, workers are killed with SIGKILL
at seeded random moments and restarted, a worker is added and one is stopped. At the end
every user's latest snapshot in `user-state` must equal the offline replay of exactly that
user's events:

- `lost`: events a user's final state misses (its event count is short of the user's
  events; a user without any snapshot loses all of them);
- `double_applied`: events counted twice in a final state (the count is over);
- `state_mismatches`: users whose final state tensors differ from the offline replay's
  (a float part by more than `tolerance` times its largest magnitude, at least 1; an
  integer part at all). Scaled by the part because fp32 rounding is: the running input
  sums (`mean_sum.*`, magnitudes in the hundreds) differ by ~1e-4 between micro-batchings
  in every run, the TADN states and windows by < 1e-6;
- `vector_mismatches`: runs of events that some worker applied (killed ones included) whose
  user vector differs from the offline vector after the same events: a run applied on a
  wrong state (one missing events or holding some twice) shows here even when a later
  restore discarded it;
- `reapplied`: events applied again after a crash because the snapshot covering them was
  not yet written (their first application died with the worker): the work a crash costs;
- `accounting`: every worker incarnation's last accounting line (`accounting.py`), summed:
  `consumed == applied + dead_lettered + replays_skipped + in_flight` must hold in each,
  with `unaccounted` 0 (a killed worker's last line may show events in flight).

The engine of each worker process logs every run it applies (user, offset before, last
offset, count, vector) to its own file: `make_recording_engine` below.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RESULT_PATH = Path("benchmarks/results/chaos-cpu.json")
GROUP = "chaos"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ChaosConfig:
    dataset: str = "taobao"
    synthetic: bool = False  # generated events instead of the dataset
    users: int = 40  # the first N users of the log (the Taobao sample is sorted by user)
    max_events: int | None = None  # cap on events (the earliest in time)
    workers: int = 2
    kills: int = 5
    chaos_seconds: float = 45.0  # events are published over this span, kills happen in it
    chunks: int = 40  # the events go out in this many paced chunks
    seed: int = 0
    model: str = "hytrec"  # a registered streaming model, untrained, seeded weights
    d_model: int = 32
    batch_size: int = 64
    batch_wait_ms: float = 20.0
    snapshot_interval_s: float = 0.5
    partitions: int = 4
    tolerance: float = 1e-4
    settle_timeout_s: float = 90.0  # after the chaos, for every user's final snapshot
    # the disk tier on: each worker keeps 4 users in device slots and 4 in host memory, the
    # rest on disk (its own state directory)
    disk_tier: bool = False
    output: Path = Path("runs/chaos")


@dataclass
class ChaosReport:
    seed: int
    users: int
    events: int
    kills: int
    workers_added: int
    workers_removed: int
    incarnations: int
    worker_failures: int  # exits other than 0 or SIGTERM (stopped) and SIGKILL (killed)
    users_restored: int  # restores from snapshots, summed over all assignments
    lost: int
    double_applied: int
    state_mismatches: int
    vector_mismatches: int
    runs_logged: int
    reapplied: int
    max_state_diff: float
    max_vector_diff: float
    seconds: float
    timeline: list[str] = field(default_factory=list)
    accounting: dict = field(default_factory=dict)  # summed last lines of the incarnations
    unaccounted: int = 0  # incarnations' unaccounted events plus unbalanced lines

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.double_applied
            or self.state_mismatches
            or self.vector_mismatches
            or self.worker_failures
            or self.unaccounted
        )


# ---------------------------------------------------------------------------- the engine


def make_recording_engine():
    """The worker's `--engine hytrec.bench.chaos:make_recording_engine`: the model engine
    of $HYTREC_CHAOS_CHECKPOINT that appends every applied run to $HYTREC_CHAOS_LOG as a
    JSON line {u, base, last, n, v}."""
    import torch

    from hytrec.model.registry import load_model
    from hytrec.stream.engine import EngineConfig, RecommendationEngine, build_engine

    torch.set_num_threads(1)  # several workers share two cores

    class RecordingEngine(RecommendationEngine):
        def _apply(self, users, runs):
            pairs = zip(users, runs, strict=True)
            bases = [self.store.offset_of(u, run[0].event.partition) for u, run in pairs]
            slots, vectors = super()._apply(users, runs)
            for user, run, base, vector in zip(users, runs, bases, vectors.tolist(), strict=True):
                self._chaos_lines.append(
                    json.dumps(
                        {
                            "u": user,
                            "base": base,
                            "last": run[-1].event.offset,
                            "n": len(run),
                            "v": vector,
                        }
                    )
                )
            return slots, vectors

        def process(self, events):
            result = super().process(events)
            if self._chaos_lines:
                self._chaos_log.write("\n".join(self._chaos_lines) + "\n")
                self._chaos_log.flush()
                self._chaos_lines.clear()
            return result

    tiers = {}
    if os.environ.get("HYTREC_CHAOS_STATE_DIR"):  # ChaosConfig.disk_tier
        tiers = {"state_dir": os.environ["HYTREC_CHAOS_STATE_DIR"]}
        per_user = load_model(os.environ["HYTREC_CHAOS_CHECKPOINT"]).state_bytes_per_user()
        tiers |= {"state_budget_bytes": 4 * per_user, "host_budget_bytes": 4 * per_user}
    engine = build_engine(
        os.environ["HYTREC_CHAOS_CHECKPOINT"],
        config=EngineConfig(device="cpu", top_k=10, **tiers),
    )
    engine.__class__ = RecordingEngine
    engine._chaos_lines = []
    engine._chaos_log = open(os.environ["HYTREC_CHAOS_LOG"], "a")  # noqa: SIM115
    return engine


# ---------------------------------------------------------------------------- workers


class _Workers:
    """Worker subprocesses of one group; each start is a new incarnation with its own log."""

    def __init__(self, bootstrap: str, config: ChaosConfig, checkpoint: Path, directory: Path):
        self.bootstrap, self.config = bootstrap, config
        self.checkpoint, self.directory = checkpoint, directory
        self.running: dict[int, subprocess.Popen] = {}  # slot -> process
        self.incarnations = 0
        self.runs_log: dict[int, Path] = {}
        self.all: list[subprocess.Popen] = []

    def start(self, slot: int) -> subprocess.Popen:
        n = self.incarnations
        self.incarnations += 1
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HYTREC_CHAOS_CHECKPOINT": str(self.checkpoint),
            "HYTREC_CHAOS_LOG": str(self.directory / f"runs-{n}.jsonl"),
            "OMP_NUM_THREADS": "1",
        }
        c = self.config
        if c.disk_tier:
            env["HYTREC_CHAOS_STATE_DIR"] = str(self.directory / f"states-{n}")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hytrec.cli",
                "worker",
                "--engine",
                "hytrec.bench.chaos:make_recording_engine",
                "--bootstrap",
                self.bootstrap,
                "--embedded-broker",
                "--group",
                GROUP,
                "--batch-size",
                str(c.batch_size),
                "--batch-wait-ms",
                str(c.batch_wait_ms),
                "--snapshot-interval",
                str(c.snapshot_interval_s),
                "--behaviors-partitions",
                str(c.partitions),
                "--recommendations-partitions",
                str(c.partitions),
                "--data-dir",
                str(self.directory / f"faust-{n}"),
                "--log-every",
                "50",
            ],
            env=env,
            cwd=REPO,
            stdout=open(self.directory / f"worker-{n}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        self.running[slot] = process
        self.runs_log[slot] = self.directory / f"runs-{n}.jsonl"
        self.all.append(process)
        return process

    def busy(self, slot: int) -> bool:
        """Whether the slot's current worker has applied events."""
        path = self.runs_log.get(slot)
        return path is not None and path.exists() and path.stat().st_size > 0

    def kill(self, slot: int) -> int:
        process = self.running.pop(slot)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return process.pid

    def stop(self, slot: int, timeout_s: float = 30.0) -> None:
        from hytrec.stream.broker import stop_process

        stop_process(self.running.pop(slot), timeout_s)

    def stop_all(self) -> None:
        for slot in list(self.running):
            self.stop(slot)


def _schedule(config: ChaosConfig, rng: random.Random) -> list[tuple[float, str]]:
    """(time, action) pairs in the chaos span: kills spread over it (one per slice, at a
    random moment of the slice), a worker added a third of the way, one removed at 60 %."""
    span = config.chaos_seconds
    actions = [(span * 0.3, "add"), (span * 0.6, "remove")]
    width = span * 0.9 / config.kills
    for k in range(config.kills):
        actions.append((span * 0.05 + width * k + rng.uniform(0.1, 0.9) * width, "kill"))
    return sorted(actions)


# ---------------------------------------------------------------------------- a trial


def _model(events, config: ChaosConfig, directory: Path) -> Path:
    import torch

    from hytrec.model.registry import build_model, spec

    torch.manual_seed(config.seed)
    model = build_model(spec(config.model).config(d_model=config.d_model), events)
    return model.save(directory / "checkpoint")


def _events(config: ChaosConfig):
    """The first `users` users' events of the dataset, or generated ones when asked for;
    a missing dataset raises FileNotFoundError (no silent fallback)."""
    from hytrec.model.data import load_dataset, select
    from hytrec.model.synthetic import SyntheticConfig, generate

    if config.synthetic:
        events = generate(SyntheticConfig(seed=config.seed))
    else:
        events = load_dataset(config.dataset, on_bad_row="skip", progress=False)
    return select(events, events.user <= config.users)


def run_trial(config: ChaosConfig) -> ChaosReport:
    from hytrec.stream.broker import EmbeddedBroker, TopicConfig
    from hytrec.stream.replay import ReplayConfig, log_events, publish_events

    started = time.monotonic()
    rng = random.Random(config.seed)
    directory = config.output / f"seed-{config.seed}"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("runs-*.jsonl"):
        old.unlink()
    events = _events(config)
    checkpoint = _model(events, config, directory)
    payloads = list(log_events(events))
    if config.max_events:
        payloads = payloads[: config.max_events]
    timeline: list[str] = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - started:7.1f} s  {what}")
        log.info(what)

    topics = TopicConfig(
        behaviors_partitions=config.partitions, recommendations_partitions=config.partitions
    )
    positions: dict[int, tuple[int, int]] = {}
    with EmbeddedBroker(topics=topics, log_file=directory / "broker.log") as broker:
        workers = _Workers(broker.bootstrap, config, checkpoint, directory)
        kills = added = removed = 0
        try:
            for slot in range(config.workers):
                workers.start(slot)
            note(f"{config.workers} workers started")
            chunks = np.array_split(np.arange(len(payloads)), config.chunks)
            actions = _schedule(config, rng)
            chaos_start = time.monotonic()
            next_slot = config.workers
            restarts: list[tuple[float, int]] = []

            def tick(now: float) -> None:
                nonlocal kills, added, removed, next_slot
                for due, slot in sorted(restarts):
                    if due <= now:
                        restarts.remove((due, slot))
                        workers.start(slot)
                        note(f"worker slot {slot} restarted")
                if not actions or chaos_start + actions[0][0] > now:
                    return
                due, action = actions.pop(0)
                if action == "kill":
                    # a worker that is consuming (it applied events), so that the kill
                    # lands amid batches, checkpoints and rebalances, not during a start
                    busy = [s for s in sorted(workers.running) if workers.busy(s)]
                    if not busy:
                        actions.insert(0, (due + 0.5, action))
                        return
                    slot = rng.choice(busy)
                    pid = workers.kill(slot)
                    kills += 1
                    note(f"kill -9 worker slot {slot} (pid {pid})")
                    restarts.append((now + rng.uniform(0.5, 3.0), slot))
                elif action == "add":
                    workers.start(next_slot)
                    note(f"worker slot {next_slot} added")
                    next_slot += 1
                    added += 1
                elif action == "remove" and len(workers.running) > 1:
                    busy = [s for s in sorted(workers.running) if workers.busy(s)]
                    slot = (busy or sorted(workers.running))[0]
                    workers.stop(slot)
                    note(f"worker slot {slot} stopped (SIGTERM)")
                    removed += 1

            for c, chunk in enumerate(chunks):
                publish_events(
                    [payloads[i] for i in chunk],
                    broker.bootstrap,
                    ReplayConfig(progress=False),
                    on_delivery=lambda i, meta, chunk=chunk: positions.__setitem__(
                        int(chunk[i]), (meta.partition, meta.offset)
                    ),
                )
                chunk_end = chaos_start + config.chaos_seconds * (c + 1) / config.chunks
                while time.monotonic() < chunk_end:
                    tick(time.monotonic())
                    time.sleep(0.02)
            deadline = time.monotonic() + config.settle_timeout_s
            while (actions or restarts) and time.monotonic() < deadline:
                tick(time.monotonic())  # kills that were postponed, restarts
                time.sleep(0.02)
            note(f"all {len(payloads)} events published; waiting for the final snapshots")
            last_offset = {}
            for i, p in enumerate(payloads):
                last_offset[p["user_id"]] = positions[i][1]
            _save_positions(directory, payloads, positions)
            latest = _wait_final(broker.bootstrap, topics, last_offset, config.settle_timeout_s)
            note("every user's final snapshot is written")
        finally:
            workers.stop_all()
        failures = 0
        for process in workers.all:
            # -SIGTERM: stopped while still starting, before Faust handles the signal
            if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                failures += 1
                note(f"worker pid {process.pid} exited with {process.returncode}")
    report = _check(config, checkpoint, payloads, positions, latest, directory)
    report.kills, report.workers_added, report.workers_removed = kills, added, removed
    report.incarnations, report.worker_failures = workers.incarnations, failures
    report.users_restored = sum(
        int(m)
        for path in directory.glob("worker-*.log")
        for m in re.findall(rb"restored (\d+) of", path.read_bytes())
    )
    report.accounting, report.unaccounted = _accounting(directory, workers.incarnations)
    if report.unaccounted:
        note(f"{report.unaccounted} events unaccounted: {report.accounting}")
    report.seconds = round(time.monotonic() - started, 1)
    report.timeline = timeline
    return report


def _save_positions(directory: Path, payloads: list[dict], positions: dict) -> None:
    """Where each user's events landed, {user: [[partition, offset], ...]} in
    `positions.json`: with the workers' run logs, what a failed trial is read from."""
    where: dict[str, list] = defaultdict(list)
    for i, p in enumerate(payloads):
        where[p["user_id"]].append(list(positions[i]))
    (directory / "positions.json").write_text(json.dumps(where))


_ACCOUNTING = re.compile(
    rb"accounting: consumed (\d+) = applied (\d+) \+ dead-lettered (\d+) \+ replays skipped "
    rb"(\d+) \+ in flight (\d+); unaccounted (\d+)"
)
_ACCOUNTS = ("consumed", "applied", "dead_lettered", "replays_skipped", "in_flight", "unaccounted")


def _accounting(directory: Path, incarnations: int) -> tuple[dict, int]:
    """The last accounting line of every worker incarnation's log, summed; and how many
    events are unaccounted (their own count, plus any line that does not balance)."""
    total = dict.fromkeys(_ACCOUNTS, 0)
    unaccounted = 0
    for n in range(incarnations):
        path = directory / f"worker-{n}.log"
        lines = _ACCOUNTING.findall(path.read_bytes()) if path.exists() else []
        if not lines:
            continue  # killed before its first line: what it consumed is consumed again
        last = dict(zip(_ACCOUNTS, map(int, lines[-1]), strict=True))
        for name in _ACCOUNTS:
            total[name] += last[name]
        settled = sum(last[k] for k in ("applied", "dead_lettered", "replays_skipped"))
        unaccounted += last["unaccounted"] + abs(last["consumed"] - settled - last["in_flight"])
    total["balanced"] = unaccounted == 0
    return total, unaccounted


def _wait_final(bootstrap, topics, last_offset: dict[str, int], timeout_s: float) -> dict:
    """Latest snapshot per user, once every user's covers its last event."""
    from hytrec.stream.snapshots import read_snapshots

    deadline = time.monotonic() + timeout_s
    latest: dict = {}
    start: dict[int, int] = {}
    while True:
        found = read_snapshots(
            bootstrap, topics.state_topic(GROUP), list(range(topics.behaviors_partitions)), start
        )
        for user, (header, value) in found.latest.items():
            if user not in latest or header.applied_offset >= latest[user][0].applied_offset:
                latest[user] = (header, value)
        start = found.ends
        behind = [
            u
            for u, last in last_offset.items()
            if u not in latest or latest[u][0].applied_offset < last
        ]
        if not behind:
            return latest
        if time.monotonic() > deadline:
            log.warning("%d users never got a final snapshot", len(behind))
            return latest
        time.sleep(1.0)


# ---------------------------------------------------------------------------- the check


def _offline(model, payloads: list[dict], offsets: list[int]):
    """Per user: its final state tensors after one-event-at-a-time streaming from zero, and
    the user vector after each of its events (by offset)."""
    import torch

    from hytrec.model.batch import EventBatch
    from hytrec.model.events import Behavior

    by_user: dict[str, list[tuple[dict, int]]] = defaultdict(list)
    for p, offset in zip(payloads, offsets, strict=True):
        by_user[p["user_id"]].append((p, offset))
    users = sorted(by_user)
    state = model.new_state(len(users))
    vectors: dict[tuple[str, int], np.ndarray] = {}
    longest = max(len(v) for v in by_user.values())
    with torch.inference_mode():
        for t in range(longest):
            active = [i for i, u in enumerate(users) if len(by_user[users[i]]) > t]
            rows = [by_user[users[i]][t] for i in active]
            columns = [
                [model.items.get(p["item_id"]) for p, _ in rows],
                [model.categories.get(p["category_id"]) for p, _ in rows],
                [int(Behavior.parse(p["behavior"])) for p, _ in rows],
                [p["ts"] for p, _ in rows],
            ]
            batch = EventBatch(
                *(torch.tensor(c)[:, None] for c in columns),
                lengths=torch.ones(len(rows), dtype=torch.long),
            )
            out = model.step(state, torch.tensor(active), batch)
            for j, i in enumerate(active):
                vectors[(users[i], rows[j][1])] = out[j].numpy()
    finals = {u: {n: t[i].clone() for n, t in state.parts().items()} for i, u in enumerate(users)}
    counts = {u: len(v) for u, v in by_user.items()}
    return finals, vectors, counts


def _runs(directory: Path) -> list[dict]:
    runs = []
    for path in sorted(directory.glob("runs-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed worker
                continue
    return runs


def states_agree(got: dict, expected: dict, tolerance: float) -> tuple[bool, float]:
    """(whether a restored state equals the offline one, its largest float difference): a
    float part within `tolerance` times its largest magnitude (at least 1), an integer part
    exactly (see `state_mismatches`)."""
    import torch

    if got.keys() != expected.keys():
        raise ValueError(f"snapshot parts {sorted(got)} != the model's {sorted(expected)}")
    same, worst = True, 0.0
    for name, b in expected.items():
        a = got[name]
        if not a.is_floating_point():
            same &= torch.equal(a, b)
        elif a.numel():
            diff = float((a - b).abs().max())
            worst = max(worst, diff)
            same &= diff <= tolerance * max(1.0, float(b.abs().max()))
    return same, worst


def _check(config, checkpoint, payloads, positions, latest, directory) -> ChaosReport:
    from hytrec.model.registry import load_model
    from hytrec.stream.snapshots import decode_snapshot

    model = load_model(checkpoint).eval()
    offsets = [positions[i][1] for i in range(len(payloads))]
    finals, vectors, counts = _offline(model, payloads, offsets)
    tol = config.tolerance
    lost = double = mismatches = 0
    worst_state = 0.0
    for user, expected in finals.items():
        if user not in latest:
            lost += counts[user]
            mismatches += 1
            continue
        got = decode_snapshot(latest[user][1]).parts
        count = int(got["count"])
        lost += max(0, counts[user] - count)
        double += max(0, count - counts[user])
        same, diff = states_agree(got, expected, tol)
        worst_state = max(worst_state, diff)
        mismatches += not same
    runs = _runs(directory)
    vector_bad, worst_vector = 0, 0.0
    for run in runs:
        want = vectors.get((run["u"], run["last"]))
        if want is None:
            vector_bad += 1
            continue
        diff = float(np.abs(np.asarray(run["v"]) - want).max())
        worst_vector = max(worst_vector, diff)
        vector_bad += not np.allclose(run["v"], want, rtol=tol, atol=tol)
    applied = sum(run["n"] for run in runs)
    return ChaosReport(
        seed=config.seed,
        users=len(finals),
        events=len(payloads),
        kills=0,
        workers_added=0,
        workers_removed=0,
        incarnations=0,
        worker_failures=0,
        users_restored=0,
        lost=lost,
        double_applied=double,
        state_mismatches=mismatches,
        vector_mismatches=vector_bad,
        runs_logged=len(runs),
        reapplied=applied - len(payloads),
        max_state_diff=worst_state,
        max_vector_diff=worst_vector,
        seconds=0.0,
    )


# ---------------------------------------------------------------------------- command


CHECKS = (
    "lost",
    "double_applied",
    "state_mismatches",
    "vector_mismatches",
    "worker_failures",
    "unaccounted",
)


def run_benchmark(config: ChaosConfig, trials: int) -> dict:
    reports = []
    for t in range(trials):
        c = ChaosConfig(**{**asdict(config), "seed": config.seed + t})
        report = run_trial(c)
        print(
            f"trial {t}: seed {c.seed}, {report.events} events, {report.users} users, "
            f"{report.kills} kills, +{report.workers_added}/-{report.workers_removed} "
            f"workers: lost {report.lost}, double {report.double_applied}, state mismatches "
            f"{report.state_mismatches}, vector mismatches {report.vector_mismatches}, "
            f"unaccounted {report.unaccounted}, reapplied {report.reapplied} "
            f"({report.seconds} s)",
            flush=True,
        )
        reports.append(report)
    accounting = {
        name: sum(r.accounting.get(name, 0) for r in reports)
        for name in ("consumed", "applied", "dead_lettered", "replays_skipped", "in_flight")
    }
    return {
        "trials": len(reports),
        "events": sum(r.events for r in reports),
        **{name: sum(getattr(r, name) for r in reports) for name in CHECKS},
        "kills": sum(r.kills for r in reports),
        "reapplied": sum(r.reapplied for r in reports),
        # every incarnation's last line: consumed == applied + dead_lettered +
        # replays_skipped + in_flight (events a killed worker held are consumed again)
        "accounting": accounting,
        "dataset": "synthetic" if config.synthetic else config.dataset,
        "synthetic": config.synthetic,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "per_trial": [asdict(r) for r in reports],
    }


def add_parser(benchmarks) -> None:
    d = ChaosConfig()
    parser = benchmarks.add_parser(
        "chaos",
        help="kill -9 and rebalance workers mid-stream; check every user's final state",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--dataset", default=d.dataset, help="a dataset name or file")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="generated events instead of --dataset (recorded in the JSON); without it a "
        "missing dataset is an error",
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--users", type=int, default=200, help="the first N users' events")
    parser.add_argument("--max-events", type=int)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--kills", type=int, default=8, help="kill -9 per trial")
    parser.add_argument("--chaos-seconds", type=float, default=90.0)
    parser.add_argument("--chunks", type=int, default=90)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--model", default=d.model, help="a registered streaming model (`hytrec models`)"
    )
    parser.add_argument("--snapshot-interval", type=float, default=d.snapshot_interval_s)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument(
        "--disk-tier",
        action="store_true",
        help="each worker keeps 4 users in device slots and 4 in host memory, the rest on "
        "disk (LMDB, its own directory)",
    )
    parser.add_argument("--output", default=str(d.output), help="logs, checkpoints")
    parser.add_argument("--result", default=str(RESULT_PATH))
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from hytrec.bench.reports import machine_info, provenance, quiet_broker_clients
    from hytrec.model.registry import spec

    quiet_broker_clients()
    config = ChaosConfig(
        dataset=args.dataset,
        synthetic=args.synthetic,
        users=args.users,
        max_events=args.max_events,
        workers=args.workers,
        kills=args.kills,
        chaos_seconds=args.chaos_seconds,
        chunks=args.chunks,
        seed=args.seed,
        model=args.model,
        snapshot_interval_s=args.snapshot_interval,
        batch_size=args.batch_size,
        disk_tier=args.disk_tier,
        output=Path(args.output),
    )
    if not config.synthetic:
        try:
            _events(ChaosConfig(dataset=config.dataset, users=1))
        except FileNotFoundError as exc:
            print(
                f"hytrec benchmark chaos: dataset {config.dataset!r} not found ({exc}); "
                "give --dataset a file, or --synthetic for generated events",
                file=sys.stderr,
            )
            return 2
    if not spec(config.model).streams:
        print(f"hytrec benchmark chaos: model {config.model!r} does not stream", file=sys.stderr)
        return 2
    source = provenance()
    started = time.time()
    result = run_benchmark(config, args.trials)
    result["command"] = " ".join(["hytrec benchmark chaos", *sys.argv[3:]])
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["seconds"] = round(time.time() - started, 1)
    result.update(source)
    result["machine"] = machine_info()
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("trials", "events", *CHECKS)}))
    return 1 if any(result[k] for k in CHECKS) else 0
