"""Training: next-item prediction at every position, AdamW, validation-based early stopping.

Each user's training events (those before `EvalSplit.train_stop`) give one sequence; the
last `max_len + 1` of them are kept, the first `max_len` are the input and every position t
predicts the item of event t + 1:

    u_t  = model(events_0..t)                                      [B, T, d]
    full softmax:     loss = -log softmax(u_t . E)[i_{t+1}]        over all items
    sampled softmax:  loss = -log softmax([u_t . e_{i_{t+1}}, u_t . e_{n_1}, ...])
                      with N negatives n_j drawn uniformly for the whole batch (a
                      negative equal to the target is masked out)
    repeat head:      loss = -log P(i_{t+1}) of the repeat/explore mixture (`repeat.py`),
                      P_explore from the full softmax or the sampled one above with its
                      negatives' logits shifted by log((N - 1) / S)

After every epoch the model ranks the validation targets (full ranking, `evaluate.py`)
and the best NDCG@10 so far is kept and saved, ties broken by MRR; training stops after
`patience` epochs without improvement. Everything random (initialisation, dropout, batch
order, negatives) follows `seed`, so two runs on the same data and device give the same
weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from hytrec.model.base import full_softmax_log_prob
from hytrec.model.evaluate import (
    EvalConfig,
    EvalSplit,
    context_length,
    history_batch,
    rank_targets,
    summarize,
)
from hytrec.model.events import EventLog
from hytrec.model.registry import build_model, load_model


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW, on weight matrices and embeddings only
    epochs: int = 20
    batch_size: int = 128
    max_len: int = 50  # train on the last max_len events (+1 target) of each user
    negatives: int = 0  # 0 = full softmax over all items; N > 0 = sampled softmax
    patience: int = 3  # epochs without a better validation (NDCG@10, MRR) before stopping
    # patience does not stop training before this epoch: a model still on its initial loss
    # plateau scores nothing yet (TADN on Taobao: ~3 epochs of 26 steps)
    min_epochs: int = 0
    grad_clip: float = 1.0
    # the repeat head learns at lr x this: its scalars start at the recency-frequency
    # heuristic and must move by O(1) within the few hundred steps a small log gives (the
    # demo's Taobao model: 26 steps per epoch, best validation after 2-7 epochs)
    head_lr_scale: float = 10.0
    valid_users: int | None = 4000  # validate on a fixed sample of users (None = all)
    filter_history: bool = False  # validation protocol, as in `EvalConfig`
    time_budget_s: float | None = None  # stop training after this long (breaks determinism)
    seed: int = 0
    device: str = "cpu"
    # a pre-training checkpoint (`hytrec pretrain mim`) whose item table the model starts
    # from (models with `start_from`: HPGR)
    init_from: str | None = None


@dataclass
class TrainResult:
    model: nn.Module  # the best model (by validation NDCG@10), in eval mode
    best_epoch: int
    valid: dict  # validation metrics of the best model
    history: list[dict] = field(default_factory=list)  # per epoch: loss, valid NDCG@10, time
    train_seconds: float = 0.0
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------- batches


def training_rows(split: EvalSplit, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of each user's training window: the last max_len + 1 training events,
    for users with at least two (one input, one target)."""
    stop = split.train_stop
    start = np.maximum(split.start, stop - (max_len + 1))
    keep = stop - start >= 2
    return start[keep], stop[keep]


def epoch_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices per batch: shuffled, then sorted by length within pools of 32 batches so
    that a batch pads little, then the batches shuffled again."""
    order = rng.permutation(len(lengths))
    pool = 32 * batch_size
    batches = []
    for p in range(0, len(order), pool):
        chunk = order[p : p + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def target_log_prob(
    model: nn.Module,
    u: torch.Tensor,
    target: torch.Tensor,
    negatives: int,
    generator: torch.Generator,
    estimate_full: bool = False,
) -> torch.Tensor:
    """log softmax(u . E)[target] per position [P]; u [P, d], target [P] item ids.

    negatives = 0: over all items. N > 0: over the target and N negatives drawn uniformly
    for the whole batch (a negative equal to the target is masked out); with
    `estimate_full` their logits are shifted by log((num_items - 1) / N), so that the
    denominator estimates the full softmax's (the repeat head needs P_explore on the scale
    that full ranking uses: `repeat.py`).
    """
    table = model.item_table()  # [N, d]
    if negatives == 0:
        return full_softmax_log_prob(u, table, target)
    neg = torch.randint(1, table.shape[0], (negatives,), generator=generator).to(u.device)
    pos_logit = (u * table[target]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = u @ table[neg].T  # [P, S]
    if estimate_full:
        neg_logit = neg_logit + math.log((table.shape[0] - 1) / negatives)
    neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], float("-inf"))
    return torch.cat([pos_logit, neg_logit], dim=1).log_softmax(-1)[:, 0]


def next_item_loss(
    model: nn.Module,
    u: torch.Tensor,
    target: torch.Tensor,
    negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean cross-entropy of the next item. u [P, d] user vectors, target [P] item ids."""
    return -target_log_prob(model, u, target, negatives, generator).mean()


def batch_loss(
    model: nn.Module, batch, negatives: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """(mean loss, positions) of a batch of training windows: every position t of each
    row's events 0..T-2 predicts the item of event t + 1. With a repeat head the loss is the
    mixture's -log P(target) (`repeat.py`); a model with its own joint loss (ULIM's item and
    category terms) gives it through `training_loss`; else the plain next-item cross-entropy."""
    if hasattr(model, "training_loss"):
        return model.training_loss(batch, negatives, generator)
    T = batch.item.shape[1]
    inputs = batch.inputs()
    target = batch.item[:, 1:]  # [B, T-1]
    real = torch.arange(T - 1, device=target.device)[None] < inputs.lengths[:, None]
    u = model(inputs)  # [B, T-1, d]
    head = getattr(model, "repeat_head", None)
    if head is None:
        return next_item_loss(model, u[real], target[real], negatives, generator), int(real.sum())
    log_explore = target_log_prob(
        model, u[real], target[real], negatives, generator, estimate_full=True
    )
    log_p = head.training_log_prob(batch, u, real, log_explore, model.item_table())
    return -log_p.mean(), int(real.sum())


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, head_lr_scale: float = 1.0
) -> list[dict]:
    """Decay matrices and embeddings (dim >= 2); not biases, norms, gates, periods. The
    repeat head's parameters, if the model has one, learn at lr * head_lr_scale."""
    head = getattr(model, "repeat_head", None)
    in_head = {id(p) for p in head.parameters()} if head is not None else set()
    groups = []
    for scale, owned in ((1.0, False), (head_lr_scale, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in in_head) == owned]
        for decayed in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decayed]
            if chosen:
                decay = weight_decay if decayed else 0.0
                groups.append({"params": chosen, "weight_decay": decay, "lr": lr * scale})
    return groups


# ---------------------------------------------------------------------------- training


def train(
    model_config,
    log: EventLog,
    split: EvalSplit,
    train_config: TrainConfig,
    out_dir: str | Path | None = None,
    dataset: str = "",
    progress: bool = True,
) -> TrainResult:
    """Train a model on `split`'s training events; keep the best epoch by validation
    NDCG@10 and, if `out_dir` is given, save it there with `model.save`."""
    tc = train_config
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    generator = torch.Generator().manual_seed(tc.seed)
    device = torch.device(tc.device)
    model = build_model(model_config, log)
    if tc.init_from is not None:
        if not hasattr(model, "start_from"):
            raise ValueError(
                f"{type(model).__name__} cannot start from a pre-trained item table "
                f"(init_from={tc.init_from!r}); HPGR can"
            )
        model.start_from(load_model(tc.init_from))
    model = model.to(device)
    context = context_length(model, tc.max_len)
    starts, stops = training_rows(split, context)
    if not len(starts):
        raise ValueError("no user has two training events: nothing to train on")
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay, tc.lr, tc.head_lr_scale), lr=tc.lr
    )
    # validation reads what the test will read: all of the history the model can take
    eval_cfg = EvalConfig(max_users=tc.valid_users, filter_history=tc.filter_history, seed=tc.seed)
    best = {"score": (-math.inf, -math.inf), "epoch": -1, "state": None, "valid": {}}
    history: list[dict] = []
    began, waited = time.perf_counter(), 0
    out_of_time = False
    for epoch in range(1, tc.epochs + 1):
        model.train()
        batches = epoch_batches(stops - starts, tc.batch_size, rng)
        total, count = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{tc.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            mininterval=2.0,
        )
        for rows in bar:
            batch = history_batch(log, starts[rows], stops[rows]).to(device)
            loss, positions = batch_loss(model, batch, tc.negatives, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            total, count = total + loss.item() * positions, count + positions
            bar.set_postfix(loss=f"{total / count:.4f}")
            if tc.time_budget_s is not None and time.perf_counter() - began > tc.time_budget_s:
                out_of_time = True
                break
        bar.close()
        valid = summarize(rank_targets(model, log, split, "valid", eval_cfg, tc.device), eval_cfg)[
            "overall"
        ]
        ndcg10 = valid["NDCG@10"] if valid["users"] else -math.inf
        # NDCG@10 decides, MRR (over the full ranking) breaks ties. On a large catalogue the
        # first epochs all score NDCG@10 = 0 while the ranks improve; comparing NDCG@10 alone
        # kept epoch 1 and let `patience` stop a model that was still learning.
        score = (ndcg10, valid["MRR"] if valid["users"] else -math.inf)
        history.append(
            {
                "epoch": epoch,
                "loss": total / max(count, 1),
                "valid_NDCG@10": ndcg10,
                "valid_HR@10": valid["HR@10"],
                "valid_MRR": score[1],
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
        if progress:
            tqdm.write(
                f"epoch {epoch}: loss {total / max(count, 1):.4f} valid NDCG@10 "
                f"{ndcg10:.4f} HR@10 {valid['HR@10']:.4f}"
            )
        if score > best["score"] or best["state"] is None:
            best = {
                "score": score,
                "epoch": epoch,
                "valid": valid,
                "state": copy.deepcopy(model.state_dict()),
            }
            waited = 0
        else:
            waited += 1
        if (waited >= tc.patience and epoch >= tc.min_epochs) or out_of_time:
            break
    seconds = time.perf_counter() - began
    model.load_state_dict(best["state"])
    model.eval()
    result = TrainResult(
        model=model,
        best_epoch=best["epoch"],
        valid=best["valid"],
        history=history,
        train_seconds=seconds,
    )
    if out_dir is not None:
        result.checkpoint = model.save(
            out_dir,
            extra={
                "dataset": dataset,
                "protocol": {
                    "split": split.name,
                    "valid_users": tc.valid_users,
                    "filter_history": tc.filter_history,
                },
                "metrics": {"valid": best["valid"]},
                "train_config": asdict(tc),
                "best_epoch": best["epoch"],
                "history": history,
            },
        )
    return result
