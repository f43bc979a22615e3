"""Fitting the repeat head's gate bias on events later than the training targets.

The head's gate (`repeat.py`) weighs copying one of the user's recent items against the
model's explore side. Learnt on the training days, it trusts the explore side more than the
next days bear out: on the demo's Taobao cut, uncalibrated, ULIM's cascade gave the items
only it reaches a mean probability of 0.010 on the held-out days where they hit 0.0007 of
the time (`hytrec benchmark head-calibration`, README's ULIM section), and a larger gate
logit would have won there. The gate's logit has a bias, `RepeatHead.gate_bias` (0 from
training); this module picks it from a grid by hit@K over events the model did not train on
and that come after its training period (`fit_gate_bias`), each ranked after every earlier
event of its user, as the stream ranks without lag.

One model pass per batch serves every candidate: `RepeatHead.recording_mixtures` keeps what
the head mixed, and `Mixture.log_p(shift)` re-mixes it under each shift. Hit@K, not the
likelihood, is the criterion: a cascade that scores only its top categories gives the
other items probability 0, so a target outside them would make every shift's likelihood
-inf. Ties go to the smallest shift in size (0, the trained gate, wins any tie with it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hytrec.model.evaluate import context_length, history_batch, ranking_scores
from hytrec.model.events import EventLog
from hytrec.model.hytrec import EventBatch
from hytrec.model.registry import load_model
from hytrec.model.repeat import Mixture


@dataclass(frozen=True)
class GateCalibrationConfig:
    # candidate shifts of the gate's logit, added to the bias it has; 0 must be one
    shifts: tuple[float, ...] = tuple(x / 4 for x in range(-8, 25))  # -2 .. 6 by 0.25
    top_k: int = 20  # hit@K, the criterion (the demo's list length)
    max_events: int | None = 10_000  # a seeded sample of the events given (None: all)
    batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if 0.0 not in self.shifts:
            raise ValueError(f"GateCalibrationConfig.shifts must hold 0.0, got {self.shifts}")


def events_since(events: EventLog, start: int) -> np.ndarray:
    """Rows of the events at or after `start` (unix seconds) with an earlier event of their
    user: what a gate is calibrated on."""
    has_past = np.arange(len(events)) > user_starts(events)
    return np.nonzero((events.ts >= start) & has_past)[0]


def calibrate_checkpoint(
    directory: str | Path, events: EventLog, start: int, cfg: GateCalibrationConfig
) -> dict:
    """Fit the gate bias of the checkpoint in `directory` on the events of `events` from
    `start` on (`events_since`; they must be later than its training targets), and save it
    there with the fit's report (`checkpoint.json`'s extra "gate_calibration")."""
    model = load_model(directory)
    if model.items is not None and model.items.to_json() != events.items.to_json():
        raise ValueError(
            f"{directory}: the checkpoint's item vocabulary ({len(model.items):,} ids) is not "
            f"the events' ({len(events.items):,}): calibrate on the log it was trained from"
        )
    report = fit_gate_bias(model, events, events_since(events, start), cfg)
    model.save(directory, extra={**model.checkpoint_extra, "gate_calibration": report})
    return report


def user_starts(events: EventLog) -> np.ndarray:
    """[len(events)] the log index of each event's user's first event (the log is
    user-sorted)."""
    return np.searchsorted(events.user, events.user, side="left")


def scored_batches(
    model, events: EventLog, rows: np.ndarray, batch: int, desc: str
) -> Iterator[tuple[np.ndarray, EventBatch, EventBatch]]:
    """(rows of the batch, the events the model reads before each, every earlier event of
    the user) for the events `rows`, `batch` at a time: each ranked after all of its user's
    earlier events (the last ones a bounded model reads: SASRec's max_len)."""
    first = user_starts(events)
    if (rows <= first[rows]).any():
        raise ValueError("every scored event needs an earlier event of its user")
    context = context_length(model, None)
    for at in tqdm(range(0, len(rows), batch), desc=desc, unit="batch", leave=False):
        chunk = rows[at : at + batch]
        whole = history_batch(events, first[chunk], chunk)
        read = whole if context is None else history_batch(events, first[chunk], chunk, context)
        yield chunk, read, whole


def recorded_mixture(model, batch: EventBatch) -> Mixture:
    """What the model's repeat head mixes when it ranks `batch` (one serve per ranking)."""
    with torch.no_grad(), model.repeat_head.recording_mixtures() as mixtures:
        ranking_scores(model, batch)
    (mixture,) = mixtures
    return mixture


def hits_by_shift(
    model, events: EventLog, rows: np.ndarray, shifts: tuple[float, ...], top_k: int, batch: int
) -> dict[float, int]:
    """How many of the events `rows` the model ranks in its top K, the gate's logit moved by
    each shift, from one model pass per batch."""
    hits = dict.fromkeys(shifts, 0)
    for chunk, read, _ in scored_batches(model, events, rows, batch, "gate shifts"):
        target = torch.from_numpy(events.item[chunk])[:, None]  # [B, 1]
        mixture = recorded_mixture(model, read)
        for shift in shifts:
            top = mixture.log_p(shift).topk(top_k, -1).indices  # [B, K]
            hits[shift] += int((top == target).sum())
    return hits


def fit_gate_bias(model, events: EventLog, rows: np.ndarray, cfg: GateCalibrationConfig) -> dict:
    """Move `model.repeat_head.gate_bias` by the shift with the most hits@K over the events
    `rows` (later than the model's training targets, each with an earlier event of its
    user); return the report: events, the bias before and after, hit@K by shift."""
    head = getattr(model, "repeat_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no repeat head: no gate to calibrate")
    if cfg.max_events is not None and len(rows) > cfg.max_events:
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(rows, cfg.max_events, replace=False))
    if len(rows) == 0:
        raise ValueError("no events to calibrate the gate on")
    hits = hits_by_shift(model, events, rows, cfg.shifts, cfg.top_k, cfg.batch)
    best = max(cfg.shifts, key=lambda s: (hits[s], -abs(s)))
    before = float(head.gate_bias)
    head.gate_bias.fill_(before + best)
    return {
        "events": len(rows),
        "top_k": cfg.top_k,
        "gate_bias_before": before,
        "shift": best,
        "gate_bias": float(head.gate_bias),
        f"hit@{cfg.top_k}_by_shift": {str(s): hits[s] / len(rows) for s in cfg.shifts},
    }
