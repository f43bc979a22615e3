"""Does a model with the repeat head keep its probabilities on the next days? Where its top K
comes from, scored offline on the demo's time cut.

`hytrec benchmark head-calibration --checkpoint DIR` loads a checkpoint with a repeat head
(a demo's, trained on the events before the cut) and ranks, offline, each held-out event of
the demo (the last `heldout_fraction` of the time span) after every earlier event of its
user: what the stream scores without micro-batch lag. Beside it, the "in-period" events:
each user's last event before the cut, the test target of the leave-one-out split the demo
trains on (never a training target, never used to pick the epoch). For both it reports

- hit@K of the model and of recency-frequency (the best heuristic on Taobao);
- the model's top K split into the user's own items (the head's buffer can copy them) and
  the others (only the explore side reaches them): the share of the list, the mean
  probability the model gives them (exp of its log P(i)) and how often one is the next
  item. Where the mean probability of a part is far above its hit rate, that part is
  overconfident on these events;
- hit@K with the list kept to the user's own items;
- hit@K with the head's gate logit shifted by each of `gate_shifts` from the bias the
  checkpoint serves with (`RepeatHead.gate_bias`: 0 as trained, else what the demo's
  calibration fitted, `calibration.py`): how much a better calibrated gate would change.

Writes STEM.json and STEM.png.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from hytrec.bench.demo import load_events, time_cut
from hytrec.bench.reports import machine_info, write_report
from hytrec.bench.timing import report_header
from hytrec.model.calibration import events_since, recorded_mixture, scored_batches, user_starts
from hytrec.model.evaluate import ranking_scores
from hytrec.model.events import EventLog
from hytrec.model.heuristics import RecencyFrequency
from hytrec.model.registry import load_model


@dataclass(frozen=True)
class HeadCalibrationConfig:
    checkpoint: str = ""  # a checkpoint with a repeat head, trained before the cut
    dataset: str = "taobao"  # the demo's dataset (`demo.load_events`)
    heldout_fraction: float = 0.2  # the demo's cut
    top_k: int = 20  # the demo's list length
    held_out_events: int | None = 6000  # a seeded sample of the held-out events (None: all)
    gate_shifts: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0, 3.0)
    batch: int = 128
    seed: int = 0


def event_sets(events: EventLog, cfg: HeadCalibrationConfig) -> dict[str, np.ndarray]:
    """Rows of the scored events, each with at least one earlier event of its user: the
    held-out ones (a sample) and each user's last event before the cut."""
    cut = time_cut(events, cfg.heldout_fraction)
    held = events_since(events, cut)
    if cfg.held_out_events is not None and cfg.held_out_events < len(held):
        rng = np.random.default_rng(cfg.seed)
        held = np.sort(rng.choice(held, cfg.held_out_events, replace=False))
    before = np.nonzero(events.ts < cut)[0]
    last = before[np.r_[events.user[before][1:] != events.user[before][:-1], True]]
    return {"held_out": held, "in_period": last[last > user_starts(events)[last]]}


def score_events(model, events: EventLog, rows: np.ndarray, cfg: HeadCalibrationConfig) -> dict:
    """The figures of the module docstring over the events `rows`."""
    rf = RecencyFrequency(len(events.items))
    K, n = cfg.top_k, len(rows)
    count = dict.fromkeys(("rf", "own_only", "own_slots", "own_hits", "other_hits"), 0)
    mass = {"own": 0.0, "other": 0.0}
    shifted = dict.fromkeys(cfg.gate_shifts, 0)
    for chunk, read, whole in scored_batches(model, events, rows, cfg.batch, "scoring"):
        target = torch.from_numpy(events.item[chunk])[:, None]  # [B, 1]
        with torch.no_grad():
            count["rf"] += int((ranking_scores(rf, whole).topk(K, -1).indices == target).sum())
        mixture = recorded_mixture(model, read)
        for shift in cfg.gate_shifts:
            shifted[shift] += int((mixture.log_p(shift).topk(K, -1).indices == target).sum())
        scores = mixture.log_p()  # [B, N] log P(i), as served
        top = scores.topk(K, -1).indices
        # the user's own items: any earlier event's, read by the model or not
        own = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, whole.item, True)
        own[:, 0] = False  # padding
        own_top = own.gather(1, top)  # [B, K]
        hit = top == target
        p = scores.gather(1, top).exp()
        count["own_slots"] += int(own_top.sum())
        count["own_hits"] += int((hit & own_top).sum())
        count["other_hits"] += int((hit & ~own_top).sum())
        mass["own"] += float(p[own_top].sum())
        mass["other"] += float(p[~own_top].sum())
        own_scores = scores.masked_fill(~own, float("-inf"))
        count["own_only"] += int((own_scores.topk(K, -1).indices == target).sum())
    own_slots, other_slots = count["own_slots"], K * n - count["own_slots"]
    rate = lambda a, b: a / b if b else None  # noqa: E731
    return {
        "events": n,
        f"model_hit@{K}": rate(shifted.get(0.0, 0), n),
        f"recency_frequency_hit@{K}": rate(count["rf"], n),
        f"model_own_items_only_hit@{K}": rate(count["own_only"], n),
        "own_items_share_of_list": rate(own_slots, K * n),
        "own_items_mean_p": rate(mass["own"], own_slots),
        "own_items_hit_rate": rate(count["own_hits"], own_slots),
        "other_items_mean_p": rate(mass["other"], other_slots),
        "other_items_hit_rate": rate(count["other_hits"], other_slots),
        f"hit@{K}_by_gate_shift": {str(s): rate(h, n) for s, h in shifted.items()},
    }


def run_head_calibration(cfg: HeadCalibrationConfig, output: str | None = None) -> dict:
    if 0.0 not in cfg.gate_shifts:
        raise ValueError("HeadCalibrationConfig.gate_shifts must hold 0.0 (the served gate)")
    model = load_model(cfg.checkpoint).eval()
    if getattr(model, "repeat_head", None) is None:
        raise ValueError(f"{cfg.checkpoint}: the model has no repeat head to calibrate")
    events, dataset = load_events(cfg.dataset)
    report = {
        **report_header("head-calibration", cfg, output, torch.device("cpu")),
        "machine": machine_info(),
        "config": asdict(cfg),
        "dataset": dataset,
        "model": type(model).__name__,
        "gate_bias": float(model.repeat_head.gate_bias),
    }
    for name, rows in event_sets(events, cfg).items():
        report[name] = score_events(model, events, rows, cfg)
    if output is not None:
        write_report(report, output, _plot)
    return report


def _plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = report["config"]["top_k"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("in_period", "tab:blue"), ("held_out", "tab:red")):
        part = report[name]
        by_shift = part[f"hit@{K}_by_gate_shift"]
        shifts = [float(s) for s in by_shift]
        left.plot(shifts, list(by_shift.values()), "o-", color=color, label=f"{name}: model")
        left.axhline(part[f"recency_frequency_hit@{K}"], color=color, linestyle=":",
                     label=f"{name}: recency-frequency")  # fmt: skip
    left.set_xlabel("shift of the head's gate logit (0: as served; > 0: more copying)")
    left.set_ylabel(f"hit@{K}")
    left.legend(fontsize=8)
    labels, x = ["own items", "other items"], np.arange(2)
    for offset, name in ((-0.2, "in_period"), (0.2, "held_out")):
        part = report[name]
        predicted = [part["own_items_mean_p"] or 0, part["other_items_mean_p"] or 0]
        observed = [part["own_items_hit_rate"] or 0, part["other_items_hit_rate"] or 0]
        right.bar(x + offset - 0.1, predicted, 0.2, label=f"{name}: mean P", alpha=0.5)
        right.bar(x + offset + 0.1, observed, 0.2, label=f"{name}: hit rate")
    right.set_xticks(x, labels)
    right.set_ylabel(f"per item of the top {K}")
    right.legend(fontsize=8)
    fig.suptitle(f"{report['model']} with the repeat head on {report['dataset']}: top {K}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
