"""`hytrec benchmark long-range`: can a model use an event thousands of steps back?

Each user's last event is the answer to a key event `distance` steps earlier, with random
fillers between (`synthetic.long_range_log`): a model that reads only its last n < distance
events cannot see the key and can only guess among the answers (accuracy 1 / keys), one
with long memory can name it. For each distance, these models (or those named in
`models_run`) are trained and tested on other users:

    HyTRec 3:1        the whole history, through the TADN state (3 TADN : 1 softmax layer)
    TADN-only         the whole history, TADN layers only (no softmax layer, no short branch)
    softmax-only      every long layer a softmax over the last `long_window` events
    SASRec (last N)   the last `sasrec_max_len` events, as the harness and the stream feed it
    HyTRec 3:1, long-first fusion   HyTRec 3:1 whose fusion gate starts on the long branch

Training fits only the answer (cross-entropy of the last position's user vector over all
items): the fillers are noise by construction, so next-item targets on them would only
dilute the one signal the task has. Every epoch draws `train_users` new users: with a fixed
training set a model that sees only the last events can name each training user's answer
from its fillers alone (training loss near 0, test accuracy at chance), which says nothing
about memory. Training stops when an epoch names every answer of its new users, or at the
time budget. Per distance and model: test accuracy (the answer ranked first among all
items) and the answer's mean rank, the epochs run and the training seconds; the same
trained model tested on users with longer histories (every `test_distances` entry above
its own: does what it learned hold further back than it was trained?); and what one new
event costs a model serving a user with that history (a streaming step into a state
holding `distance` events; SASRec's forward over its window). Writes STEM.json and
STEM.png.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hytrec.bench.reports import machine_info, write_report
from hytrec.bench.timing import report_header, synchronized, time_calls
from hytrec.model.batch import EventBatch
from hytrec.model.data import user_bounds
from hytrec.model.evaluate import history_batch
from hytrec.model.events import EventLog
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.registry import build_model
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.synthetic import long_range_log


@dataclass(frozen=True)
class LongRangeConfig:
    distances: tuple[int, ...] = (100, 300, 1000)  # events between the key and answer
    test_distances: tuple[int, ...] = (3000, 5000)  # also tested there, trained shorter
    keys: int = 8  # key -> answer pairs (chance accuracy 1 / keys)
    fillers: int = 500  # filler items drawn uniformly between them
    train_users: int = 256  # new users every epoch
    test_users: int = 128
    epochs: int = 200  # at most; stops early once an epoch names every answer of its users
    batch_users: int = 16  # users per batch, at most ...
    batch_tokens: int = 16_384  # ... and at most this many events a batch
    lr: float = 3e-3
    d_model: int = 32
    sasrec_max_len: int = 200
    time_budget_s: float = 300.0  # training seconds per model and distance, at most
    step_repeats: int = 30  # timed single-event steps (or SASRec forwards) per cell
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    models_run: tuple[str, ...] | None = None  # these rows of `models()` only; None: all

    def __post_init__(self) -> None:
        if not self.distances or min(self.distances + self.test_distances) < 2:
            raise ValueError("LongRangeConfig: distances must be >= 2")
        if min(self.train_users, self.test_users, self.epochs, self.step_repeats) < 1:
            raise ValueError("LongRangeConfig: users, epochs and repeats must be >= 1")
        unknown = sorted(set(self.models_run or ()) - set(self.models(every=True)))
        if unknown:
            raise ValueError(f"LongRangeConfig: unknown models {unknown}")

    def models(self, every: bool = False) -> dict:
        """The compared rows (those in `models_run`, unless `every`); the long-first row is
        HyTRec 3:1 whose fusion gate starts at g = sigmoid(2) = 0.88 on the long branch."""
        hytrec = HyTRecConfig(d_model=self.d_model, dropout=0.0)
        rows = {
            "HyTRec 3:1": hytrec,
            "TADN-only": replace(hytrec, use_short=False, softmax_every=0),
            "softmax-only": replace(hytrec, softmax_every=1),
            f"SASRec (last {self.sasrec_max_len})": SASRecConfig(
                d_model=self.d_model, layers=2, heads=2, max_len=self.sasrec_max_len, dropout=0.0
            ),
            "HyTRec 3:1, long-first fusion": replace(hytrec, fusion_gate_bias=2.0),
        }
        if every or self.models_run is None:
            return rows
        return {name: rows[name] for name in self.models_run}


QUICK = LongRangeConfig(
    distances=(4, 12),
    test_distances=(20,),
    keys=3,
    fillers=10,
    train_users=12,
    test_users=6,
    epochs=2,
    batch_tokens=64,
    d_model=8,
    sasrec_max_len=5,
    step_repeats=2,
)


def _inputs(log: EventLog, max_len: int | None, device: torch.device):
    """Every user's events but the last (the key, then the fillers) and the answers."""
    _, starts, ends = user_bounds(log)
    stops = ends - 1  # the answer is each user's last event
    batch = history_batch(log, starts, stops, max_len).to(device)
    return batch, torch.from_numpy(log.item[stops]).to(device)


def _rows(batch: EventBatch, rows: np.ndarray) -> EventBatch:
    return EventBatch(*(getattr(batch, f.name)[rows] for f in fields(batch)))


def _rows_per_batch(cfg: LongRangeConfig, distance: int) -> int:
    return max(1, min(cfg.batch_users, cfg.batch_tokens // distance))


def _answer_logits(model, batch: EventBatch) -> torch.Tensor:
    """[B, num_items] scores after each row's last event (padding at -inf), with gradients
    (`user_vector` serves without them)."""
    rows = torch.arange(len(batch.lengths), device=batch.lengths.device)
    return model.score(model(batch)[rows, batch.lengths - 1])


def _users(cfg: LongRangeConfig, distance: int, max_len: int | None, draw: tuple, device):
    """The inputs and answers of new users with this distance; `draw` seeds them apart
    (training epochs (0, epoch), the test users (1,))."""
    count = cfg.test_users if draw == (1,) else cfg.train_users
    log = long_range_log(count, distance, cfg.keys, cfg.fillers, (cfg.seed, distance, *draw))
    return _inputs(log, max_len, device)


def _train(model, cfg: LongRangeConfig, distance: int, max_len: int | None, device) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    rows_per_batch = _rows_per_batch(cfg, distance)
    began, epochs, losses = time.perf_counter(), 0, []
    for epoch in range(cfg.epochs):
        batch, answers = _users(cfg, distance, max_len, (0, epoch), device)
        model.train()
        total, correct = 0.0, 0
        order = rng.permutation(len(answers))
        for b in range(0, len(order), rows_per_batch):
            rows = order[b : b + rows_per_batch]
            logits = _answer_logits(model, _rows(batch, rows))
            loss = F.cross_entropy(logits, answers[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(rows)
            correct += int((logits.argmax(-1) == answers[rows]).sum())
        epochs += 1
        losses.append(round(total / len(answers), 4))
        out_of_time = time.perf_counter() - began > cfg.time_budget_s
        if correct == len(answers) or out_of_time:
            break
    model.eval()
    return {
        "epochs_run": epochs,
        "train_seconds": round(time.perf_counter() - began, 1),
        "loss_by_epoch": losses,
        "hit_time_budget": out_of_time and correct < len(answers),
    }


@torch.no_grad()
def _test(model, cfg: LongRangeConfig, distance: int, max_len: int | None, device) -> dict:
    batch, answers = _users(cfg, distance, max_len, (1,), device)
    rows_per_batch = _rows_per_batch(cfg, distance)
    ranks = []
    for b in range(0, len(answers), rows_per_batch):
        rows = np.arange(b, min(b + rows_per_batch, len(answers)))
        logits = _answer_logits(model, _rows(batch, rows))
        target = logits.gather(1, answers[rows, None])
        ranks.append((logits > target).sum(-1))  # 0 = the answer ranks first
    ranks = torch.cat(ranks).double()
    return {"accuracy": float((ranks == 0).double().mean()), "mean_rank": float(ranks.mean())}


@torch.no_grad()
def _event_cost_us(model, log: EventLog, max_len: int | None, cfg: LongRangeConfig) -> float:
    """Median us of what one new event costs for a user with this history: one streaming
    step into a state holding it, or (a model without a state here: SASRec) the forward
    over its window."""
    device = torch.device(cfg.device)
    _, starts, ends = user_bounds(log)
    user = history_batch(log, starts[:1], ends[:1]).to(device)  # the first user, answer included
    T = int(user.lengths[0]) - 1  # the history; event T is the new one
    if max_len is not None:  # SASRec: the user vector over the last max_len events
        window = _slice(user, max(0, T + 1 - max_len), T + 1)
        call, setup = (lambda: model.user_vector(window)), None
    else:
        state, slot = model.new_state(1, device), torch.tensor([0], device=device)
        for a in range(0, T, 512):  # the history, 512 events per step call
            model.step(state, slot, _slice(user, a, min(a + 512, T)))
        saved, event = state.read(slot), _slice(user, T, T + 1)
        call, setup = (lambda: model.step(state, slot, event)), (lambda: state.write(slot, saved))
    times = time_calls(synchronized(device, call), cfg.step_repeats, 30.0, setup)
    return round(statistics.median(times) * 1e6, 1)


def _slice(batch: EventBatch, start: int, stop: int) -> EventBatch:
    """Events start..stop-1 of a one-row batch."""
    columns = (batch.item, batch.category, batch.behavior, batch.ts)
    length = torch.tensor([stop - start], device=batch.lengths.device)
    return EventBatch(*(c[:, start:stop] for c in columns), length)


def run_long_range(
    cfg: LongRangeConfig, output: str | Path | None = None, progress: bool = True
) -> dict:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()[0]
    device = torch.device(cfg.device)
    models = cfg.models()
    rows = []
    bar = tqdm(total=len(cfg.distances) * len(models), unit="model", disable=not progress)
    for distance in sorted(set(cfg.distances)):
        longer = sorted(d for d in set(cfg.test_distances) if d > distance)
        for name, model_cfg in models.items():
            bar.set_description(f"distance {distance}: {name}")
            max_len = getattr(model_cfg, "max_len", None)  # SASRec's window
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg, long_range_log(1, distance, cfg.keys, cfg.fillers))
            model = model.to(device)
            trained = _train(model, cfg, distance, max_len, device)
            rows.append(
                {
                    "distance": distance,
                    "model": name,
                    "reads": "whole history" if max_len is None else f"last {max_len} events",
                    **_test(model, cfg, distance, max_len, device),
                    **trained,
                    "tested_longer": [
                        {"distance": d, **_test(model, cfg, d, max_len, device)} for d in longer
                    ],
                    "event_cost_us": _event_cost_us(
                        model, long_range_log(1, distance, cfg.keys, cfg.fillers), max_len, cfg
                    ),
                }
            )
            bar.update()
    bar.close()
    report = {
        **report_header("long-range", cfg, output, device),
        "machine": {
            **machine_info(),
            "threads": torch.get_num_threads(),
            "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        },
        "config": asdict(cfg),
        "model_configs": {name: asdict(c) for name, c in models.items()},
        "chance_accuracy": 1 / cfg.keys,
        "method": __doc__.split("\n\n", 1)[1].strip(),
        "rows": rows,
    }
    print(format_table(report), flush=True)
    if output is not None:
        write_report(report, output, plot)
    return report


def format_table(report: dict) -> str:
    lines = [
        "distance | model | reads | accuracy | mean rank | epochs | train s | event cost us",
        "---: | --- | --- | ---: | ---: | ---: | ---: | ---:",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['distance']:,} | {r['model']} | {r['reads']} | {r['accuracy']:.3f} | "
            f"{r['mean_rank']:.1f} | {r['epochs_run']} | {r['train_seconds']} | "
            f"{r['event_cost_us']:,.0f}"
        )
    longer = [(r, t) for r in report["rows"] for t in r["tested_longer"]]
    if longer:
        lines += [
            "",
            "trained at | model | tested at | accuracy | mean rank",
            "---: | --- | ---: | ---: | ---:",
        ]
        for r, t in longer:
            lines.append(
                f"{r['distance']:,} | {r['model']} | {t['distance']:,} | {t['accuracy']:.3f} | "
                f"{t['mean_rank']:.1f}"
            )
    lines.append(f"chance accuracy (a guess among the answers): {report['chance_accuracy']:.3f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: test accuracy against the distance it was trained at, per model, chance
    dashed; middle: each trained model tested on longer histories (one line per model and
    training distance); right: what one new event costs against the distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    names = list(dict.fromkeys(r["model"] for r in report["rows"]))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    for name in names:
        mine = [r for r in report["rows"] if r["model"] == name]
        distance = [r["distance"] for r in mine]
        left.plot(distance, [r["accuracy"] for r in mine], "o-", color=colours[name], label=name)
        right.plot(
            distance, [r["event_cost_us"] for r in mine], "o-", color=colours[name], label=name
        )
        for k, r in enumerate(mine):
            chain = [r] + r["tested_longer"]
            middle.plot(
                [t["distance"] for t in chain],
                [t["accuracy"] for t in chain],
                marker="o",
                ls=styles[k % len(styles)],
                color=colours[name],
                label=f"{name}, trained at {r['distance']:,}",
            )
    for axis in (left, middle):
        axis.axhline(report["chance_accuracy"], color="grey", ls="--", label="chance (a guess)")
        axis.set(xscale="log", ylim=(0, 1.05), ylabel="test accuracy (answer ranked first)")
    left.set(xlabel="events between the key and its answer", title="trained and tested there")
    middle.set(xlabel="events between the key and its answer (test users)")
    middle.set(title="tested on longer histories than trained on")
    right.set(xscale="log", yscale="log", xlabel="history length (events)")
    right.set(ylabel="cost of one new event (us)", title="serving cost per event")
    for axis in (left, middle, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6 if axis is middle else 8)
    fig.suptitle(f"{report['device']}, d_model {report['config']['d_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
