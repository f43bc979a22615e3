"""HPGR's stage 1: session-based masked item modelling (MIM), the reading of
`shared/design/WAVE2-MODELS.md` section 3.2 (fidelity "reading", built on BERT4Rec's Cloze
task).

Each user's training events (those before `EvalSplit.train_stop`, the last `max_len` of
them) form one sequence. Per sequence and epoch one masking unit is drawn:

    item masking     (probability 1 - session_share): each event masked with probability rho
    session masking  (probability session_share): each whole session masked with rho_s

A masked event's item input is replaced by a learned [MASK] vector; its behaviour, gap,
in-session position and session id stay, so the encoder knows where the gap is. The encoder
is HPGR's (`hpgr.py`, with or without its Session Enhancement Module) without the causal
mask, and the loss is the full softmax of the masked events' items over the whole catalogue
(`train.target_log_prob`; a sampled softmax with `negatives` > 0):

    L = -(1/|M|) sum_{i in M} log softmax(h_i E^T)[s_i]

Why the full softmax (the design read "sampled softmax with 1,024 shared negatives"): on
Taobao (55k items, most seen once or twice) the sampled loss collapses. A masked position's
input is the same [MASK] vector in every row, so at first its outputs are nearly the same
for all rows; each target item is pulled towards that common vector when it is a target
and pushed away almost never (1,024 uniform negatives reach an item in ~2 % of steps), so
the items seen in the data gather around it and every user gets the same ten items.
Measured at 0e55f70 (max_len 50, batch 32, seed 0): with the sampled loss, after 234 steps
the loss was still near its initial 10 (9.75), the masked-item HR@10 on validation 0 and
the 815 users' top tens held 24 distinct items; with the full softmax, which pushes every
item away at every step, HR@10 passed popularity's from about step 140 and was 0.023 at
step 234 (19x popularity), the top tens holding 2,256 distinct items. The full softmax
costs one [masked events, items] product per step, cheap at 55k items.

Only training events are ever targets; `leaked_targets` counts masked events at or after
their user's `train_stop` (from their log indices, not from how the windows were cut), and
must stay 0. Validation: every user's validation event is appended to its training events,
masked, and ranked over all items (full ranking): the masked-item HR@10, beside
popularity's on the same targets. The epoch with the best validation HR@10 is kept; its
encoder is saved as an HPGR checkpoint, whose item table `hytrec train --init-from` starts
from.
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

from hytrec.model.data import require_timestamps, sessionize
from hytrec.model.evaluate import (
    EvalConfig,
    EvalSplit,
    history_batch,
    hit_rate,
    ndcg,
    rank_targets,
    summarize,
    target_ranks,
)
from hytrec.model.events import EventLog
from hytrec.model.heuristics import Popularity
from hytrec.model.hpgr import HPGR, HPGRConfig, batch_sessions
from hytrec.model.registry import build_model
from hytrec.model.train import epoch_batches, param_groups, target_log_prob


@dataclass(frozen=True)
class MIMConfig:
    """The reading's defaults: rho 0.2 (BERT4Rec's, RecBole's), rho_s 0.15, the encoder at
    HPGR's size over the last 200 training events; the full softmax (not the reading's
    1,024 sampled negatives: see the module docstring)."""

    model: HPGRConfig = HPGRConfig(top_k=None)  # the encoder (its top_k is not used)
    mask_ratio: float = 0.2  # rho
    session_mask_ratio: float = 0.15  # rho_s
    session_share: float = 0.5  # share of sequences masked by whole sessions
    max_len: int = 200
    negatives: int = 0  # 0 = full softmax (see the module docstring); N > 0: sampled
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    time_budget_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "session_mask_ratio", "session_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"MIMConfig: {name} must be in [0, 1]")
        if self.max_len > self.model.max_len:
            raise ValueError(
                f"MIMConfig: max_len {self.max_len} > the encoder's N {self.model.max_len}"
            )


@dataclass
class MIMResult:
    model: HPGR  # the encoder of the best epoch, eval mode
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    popularity_hr10: float = 0.0
    leaked_targets: int = 0
    masked_targets: int = 0
    sessions: int = 0  # in the whole log (`data.sessionize`)
    training_sessions: int = 0  # in the pre-training sequences
    seconds: float = 0.0


def draw_masks(
    real: torch.Tensor,
    session: torch.Tensor,
    cfg: MIMConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """bool [B, T]: the masked events of right-padded rows (real [B, T]) whose session ids
    are `session` [B, T]: per row whole sessions (share `session_share`) or single events."""
    B, T = real.shape
    by_session = torch.rand(B, generator=generator) < cfg.session_share  # [B]
    single = torch.rand(B, T, generator=generator) < cfg.mask_ratio
    sessions = int(session[real].max()) + 1 if real.any() else 1
    whole = torch.rand(B, sessions, generator=generator) < cfg.session_mask_ratio
    in_masked_session = whole.gather(1, session.clamp(0, sessions - 1))
    return torch.where(by_session[:, None], in_masked_session, single) & real


class MaskedItemModel(nn.Module):
    """HPGR's encoder, bidirectional, with a [MASK] vector in place of masked items."""

    def __init__(self, encoder: HPGR):
        super().__init__()
        self.encoder = encoder
        self.mask_vector = nn.Parameter(torch.empty(encoder.cfg.d_model).normal_(std=0.02))

    def item_table(self) -> torch.Tensor:
        return self.encoder.item_table()

    def forward(self, batch, masked: torch.Tensor) -> torch.Tensor:
        """Unit vectors [B, T, d] of every event, each reading the whole row."""
        enc = self.encoder
        session, position, gap = batch_sessions(batch, enc.cfg.session_gap_s)
        items = torch.where(masked[..., None], self.mask_vector, enc.item_emb(batch.item))
        x = enc.embed_events(items, batch.behavior, position, gap)
        return enc.encode(x, batch, enc.bidirectional_plan(batch, session))


@torch.no_grad()
def masked_validation(
    model: MaskedItemModel, log: EventLog, split: EvalSplit, cfg: MIMConfig, batch_size=128
) -> dict:
    """Each user's validation event appended to its training events and masked: HR@10,
    NDCG@10 of its rank over all items (full ranking, ties against the model)."""
    starts, targets = split.targets("valid")
    model.eval()
    ranks = []
    for b in range(0, len(starts), batch_size):
        s, t = starts[b : b + batch_size], targets[b : b + batch_size]
        batch = history_batch(log, s, t + 1, cfg.max_len)
        rows = torch.arange(len(s))
        masked = torch.zeros_like(batch.item, dtype=torch.bool)
        masked[rows, batch.lengths - 1] = True
        u = model(batch, masked)[rows, batch.lengths - 1]  # [B, d]
        rank, _ = target_ranks(model.encoder.score(u), batch.item[rows, batch.lengths - 1])
        ranks.append(rank.numpy())
    ranks = np.concatenate(ranks)
    return {"users": len(ranks), "HR@10": hit_rate(ranks, 10), "NDCG@10": ndcg(ranks, 10)}


def mim_windows(split: EvalSplit, max_len: int, extra: int = 0):
    """(start, stop, train_stop) of each user's pre-training sequence: its last max_len
    training events, for users with at least two (`extra` > 0 reaches past them: a planted
    leak for the tests)."""
    stops = split.train_stop + extra
    starts = np.maximum(split.start, stops - max_len)
    keep = stops - starts >= 2
    return starts[keep], stops[keep], split.train_stop[keep]


def pretrain(cfg: MIMConfig, log: EventLog, split: EvalSplit, progress: bool = True) -> MIMResult:
    """Pre-train HPGR's encoder by session-based MIM on `split`'s training events."""
    require_timestamps(log, "HPGR's session-based pre-training")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = MaskedItemModel(build_model(cfg.model, log))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr)
    starts, stops, train_stop = mim_windows(split, cfg.max_len)
    sessions, positions = sessionize(log, cfg.model.session_gap_s)
    result = MIMResult(
        model=model.encoder,
        best_epoch=0,
        sessions=int((positions == 0).sum()),
        popularity_hr10=summarize(
            rank_targets(Popularity(log, split), log, split, "valid", EvalConfig())
        )["overall"]["HR@10"],
    )
    result.training_sessions = int(
        sum(len(np.unique(sessions[a:z])) for a, z in zip(starts, stops, strict=True))
    )
    best_hr, best_state = -math.inf, None
    began = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            epoch_batches(stops - starts, cfg.batch_size, rng),
            desc=f"MIM epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            mininterval=2.0,
        )
        for rows in bar:
            batch = history_batch(log, starts[rows], stops[rows])
            session = batch_sessions(batch, cfg.model.session_gap_s)[0]
            masked = draw_masks(batch.mask, session, cfg, generator)
            if not masked.any():
                continue
            # the log index of every masked event, against its user's training stop
            index = torch.from_numpy(starts[rows])[:, None] + torch.arange(masked.shape[1])
            stop = torch.from_numpy(train_stop[rows])[:, None].expand_as(index)
            result.leaked_targets += int((index[masked] >= stop[masked]).sum())
            result.masked_targets += int(masked.sum())
            u = model(batch, masked)
            log_p = target_log_prob(model, u[masked], batch.item[masked], cfg.negatives, generator)
            loss = -log_p.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            total, count = total + loss.item() * len(log_p), count + len(log_p)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        valid = masked_validation(model, log, split, cfg)
        result.history.append(
            {
                "epoch": epoch,
                "loss": total / max(count, 1),
                "valid_HR@10": valid["HR@10"],
                "valid_NDCG@10": valid["NDCG@10"],
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
        if progress:
            tqdm.write(
                f"MIM epoch {epoch}: loss {total / max(count, 1):.4f} masked-item HR@10 "
                f"{valid['HR@10']:.4f} (popularity {result.popularity_hr10:.4f})"
            )
        if valid["HR@10"] > best_hr:
            best_hr, result.best_epoch = valid["HR@10"], epoch
            best_state = copy.deepcopy(model.encoder.state_dict())
        if cfg.time_budget_s is not None and time.perf_counter() - began > cfg.time_budget_s:
            break
    result.seconds = time.perf_counter() - began
    model.encoder.load_state_dict(best_state)
    model.encoder.eval()
    return result


def summary(result: MIMResult, cfg: MIMConfig) -> dict:
    """The report's figures (the CLI adds the dataset, command and provenance)."""
    best = result.history[result.best_epoch - 1]
    return {
        "fidelity": "reading",
        "loss": "full softmax"
        if not cfg.negatives
        else f"sampled softmax ({cfg.negatives} shared uniform negatives)",
        "sessions": result.sessions,
        "training_sessions": result.training_sessions,
        "masked_item_HR@10": best["valid_HR@10"],
        "masked_item_NDCG@10": best["valid_NDCG@10"],
        "popularity_HR@10": result.popularity_hr10,
        "ratio_to_popularity": best["valid_HR@10"] / result.popularity_hr10
        if result.popularity_hr10
        else None,
        "best_epoch": result.best_epoch,
        "loss_by_epoch": [h["loss"] for h in result.history],
        "history": result.history,
        "leaked_targets": result.leaked_targets,
        "masked_targets": result.masked_targets,
        "seconds": round(result.seconds, 1),
        "config": asdict(cfg),
    }


def save(result: MIMResult, cfg: MIMConfig, directory: str | Path, dataset: str = "") -> Path:
    """The best encoder as an HPGR checkpoint (what `--init-from` reads)."""
    return result.model.save(
        directory, extra={"dataset": dataset, "pretrain": summary(result, cfg)}
    )
