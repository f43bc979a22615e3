"""Full-ranking evaluation of next-item recommenders: the split, the metrics, the reports.

Protocol. For each evaluated user the model reads the user's events before the target
(the last `max_len` of them when the model has a bounded context) and scores every item
of the catalogue; the target's 0-based rank r is the number of other items that score at
least as high (ties count against the model, so a constant scorer earns nothing):

    HR@K   = 1[r < K]
    NDCG@K = 1[r < K] / log2(r + 2)        (one relevant item, so IDCG = 1)
    MRR    = 1 / (r + 1)
    AUC    = 1 - r / (C - 1)               C = candidates ranked (the target included)

averaged over users. Candidates are all items (index 0, padding, never counts). With
`filter_history=True` the items of the user's input history are removed from the
candidates first, as the S3-Rec code base and the papers built on it (CoSeRec, ICLRec,
FMLP-Rec's full-sort mode) do: their trainers set those items' scores to 0 before the top-k
(`rating_pred[train_matrix > 0] = 0`); here they are removed outright, and a target that
repeats a history item counts as a miss, as it (nearly) does there. Repeat consumption is
the main signal in e-commerce click logs such as Taobao, so unfiltered ranking is the
default and the filtered one is reported beside it where papers use it.

Splits (`EvalSplit`): per user a contiguous, time-ordered run of the log; training reads
only events before `train_stop`; validation and test each predict one target event from
the events before it. `leave_one_out` builds the usual one: last event test,
second-to-last validation, the rest training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hytrec.model.events import EventLog
from hytrec.model.hytrec import EventBatch

# ---------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class EvalSplit:
    """Which events of an `EventLog` train, validate and test, one row per user.

    start[r]        first log index of the user's run
    train_stop[r]   training reads events start .. train_stop-1 (inputs and targets)
    valid_target[r] log index of the validation target (input: start .. target-1), or -1
    test_target[r]  log index of the test target, or -1
    All arrays are int64 of the same length.
    """

    start: np.ndarray
    train_stop: np.ndarray
    valid_target: np.ndarray
    test_target: np.ndarray
    name: str = "leave-one-out"

    def targets(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(start, target) of the rows evaluated on `which` ("valid" or "test")."""
        target = {"valid": self.valid_target, "test": self.test_target}[which]
        rows = target >= 0
        return self.start[rows], target[rows]


def leave_one_out(log: EventLog, min_events: int = 3) -> EvalSplit:
    """Last event of each user is the test target, the one before it the validation target,
    the rest trains. Users with fewer than `min_events` events only train (never scored)."""
    if min_events < 3:
        raise ValueError(
            f"leave_one_out: min_events must be >= 3 (a validation target needs an input "
            f"event before it), got {min_events}"
        )
    slices = np.array([(s, e) for _, s, e in log.user_slices()], dtype=np.int64).reshape(-1, 2)
    start, stop = slices[:, 0], slices[:, 1]
    scored = stop - start >= min_events
    return EvalSplit(
        start=start,
        train_stop=np.where(scored, stop - 2, stop),
        valid_target=np.where(scored, stop - 2, -1),
        test_target=np.where(scored, stop - 1, -1),
    )


# ---------------------------------------------------------------------------- metrics

CATEGORY_KS = (1, 2, 5, 10, 20)  # next-category HR@k of models with a category head


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of targets ranked in the top k (ranks are 0-based)."""
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean 1/log2(rank + 2) over targets in the top k, 0 for the others."""
    return float(np.mean(ndcg_per_user(ranks, k))) if len(ranks) else float("nan")


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / (ranks + 1.0))) if len(ranks) else float("nan")


def auc(ranks: np.ndarray, candidates: np.ndarray) -> float:
    """Mean share of the other candidates ranked below the target: 1 - r / (C - 1)."""
    if not len(ranks):
        return float("nan")
    return float(np.mean(1.0 - ranks / np.maximum(candidates - 1, 1)))


def ndcg_per_user(ranks: np.ndarray, k: int) -> np.ndarray:
    """float64 [U]: each target's NDCG@k (the values `ndcg` averages)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> dict:
    """Percentile bootstrap over users of the mean of per-user values `a` and, when `b` (the
    same users under another model) is given, of mean(a) - mean(b) and mean(a) / mean(b),
    resampling the users once for both so that the pairing is kept. With `weights` [U] (e.g.
    each user's scored events, `a` and `b` then the user's mean per event) every mean is
    weighted by them: the mean over events, resampled by user.

    `a` and `b` are [U] (one run) or [S, U] (S seeds of a model, the same users in the same
    order): with several seeds each resample also draws that side's seeds with replacement
    (independently for a and b), so the interval holds the spread over seeds as well as over
    users. The mean is over all seeds and users.

    Returns {"mean", "ci"} for a alone, else also "mean_b", "diff", "diff_ci", "ratio",
    "ratio_ci" and "share_a_ahead" (the share of resamples where mean(a) > mean(b)).
    Intervals are the (1-level)/2 and (1+level)/2 quantiles of the resampled statistics.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))  # [S, U]
    n = a.shape[1]
    if b is not None:
        b = np.atleast_2d(np.asarray(b, dtype=np.float64))
        if b.shape[1] != n:
            raise ValueError(f"paired values need equal lengths, got {n} and {b.shape[1]}")
    if n == 0:
        raise ValueError("nothing to resample: no users")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != (n,):
        raise ValueError(f"weights need one value per user ({n}), got shape {w.shape}")
    rng = np.random.default_rng(seed)
    means_a, means_b = [], []
    seeds = max(len(a), 1 if b is None else len(b))
    step = min(256, max(1, 2**20 // (n * seeds)))  # resamples at a time: bounds memory
    for lo in range(0, resamples, step):
        take = rng.integers(0, n, (min(step, resamples - lo), n))  # [step, n] users
        means_a.append(_resampled_means(a, take, rng, w))
        if b is not None:
            means_b.append(_resampled_means(b, take, rng, w))
    qs = ((1 - level) / 2, (1 + level) / 2)
    ma = np.concatenate(means_a)
    mean_a = float(np.average(a.mean(0), weights=w))
    out = {"mean": mean_a, "ci": [float(v) for v in np.quantile(ma, qs)]}
    if b is None:
        return out
    mb = np.concatenate(means_b)
    mean_b = float(np.average(b.mean(0), weights=w))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ma / mb
        ratio = mean_a / mean_b if mean_b else float("nan")
    out.update(
        mean_b=mean_b,
        diff=mean_a - mean_b,
        diff_ci=[float(v) for v in np.quantile(ma - mb, qs)],
        ratio=float(ratio),
        ratio_ci=[float(v) for v in np.quantile(ratios, qs)],
        share_a_ahead=float(np.mean(ma > mb)),
    )
    return out


def _resampled_means(
    values: np.ndarray, take: np.ndarray, rng: np.random.Generator, weights: np.ndarray | None
) -> np.ndarray:
    """[R] means of `values` [S, U] (weighted by `weights` [U], if given) over the users
    `take` [R, n] of each resample and, with several seeds, over S seeds drawn with
    replacement per resample."""
    if len(values) == 1:
        picked = values[0][take]  # [R, n]
    else:
        seeds = rng.integers(0, len(values), (len(take), len(values)))  # [R, S]
        per_user = values[seeds].mean(1)  # [R, U]: each resample's seeds averaged
        picked = np.take_along_axis(per_user, take, axis=1)
    return picked.mean(1) if weights is None else np.average(picked, axis=1, weights=weights[take])


def category_metrics(ranks: np.ndarray, ks: Sequence[int] = CATEGORY_KS) -> dict[str, float]:
    """Next-category HR@k for each k and MRR of 0-based ranks of the target's category."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "users": int(len(ranks)),
        **{f"HR@{k}": hit_rate(ranks, k) for k in ks},
        "MRR": mrr(ranks),
    }


def ranking_metrics(
    ranks: np.ndarray, candidates: np.ndarray, ks: Sequence[int] = (10, 50, 500)
) -> dict[str, float]:
    """HR@k, NDCG@k for each k, MRR and AUC of 0-based target ranks, plus the user count."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"users": int(len(ranks))}
    for k in ks:
        out[f"HR@{k}"] = hit_rate(ranks, k)
    for k in ks:
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    out["MRR"] = mrr(ranks)
    out["AUC"] = auc(ranks, np.asarray(candidates, dtype=np.float64))
    return out


def target_ranks(
    scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each target and the number of candidates.

    scores [B, N] over all items (column 0 = padding, never a candidate); target [B];
    exclude [B, N] bool marks items removed from the candidates (the target too, if set:
    it then ranks last). rank = #{other candidates with score >= the target's}.
    """
    nan = torch.isnan(scores).any(1)
    if nan.any():  # a NaN compares false with everything: its target would rank -1
        rows = nan.nonzero()[:, 0].tolist()
        raise ValueError(
            f"target_ranks: the model scored NaN for {len(rows)} of {len(scores)} users "
            f"(rows {rows[:5]} of this batch): its ranking is undefined (a model that cannot "
            "handle this data, e.g. a softmax over no allowed entry)"
        )
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    candidate = torch.ones_like(scores, dtype=torch.bool)
    candidate[:, 0] = False
    if exclude is not None:
        candidate &= ~exclude
    rows = torch.arange(len(target), device=scores.device)
    own = scores[rows, target]
    n = candidate.sum(1)
    ahead = ((scores >= own[:, None]) & candidate).sum(1) - candidate[rows, target].long()
    # an excluded target is not among the candidates: it ranks behind all of them
    rank = torch.where(candidate[rows, target], ahead, n)
    return rank, n + (~candidate[rows, target]).long()


# ---------------------------------------------------------------------------- batching


def history_batch(
    log: EventLog, start: np.ndarray, stop: np.ndarray, max_len: int | None = None
) -> EventBatch:
    """Right-padded events log[start:stop] per row, keeping the last `max_len` of each."""
    if max_len is not None:
        start = np.maximum(start, stop - max_len)
    lengths = stop - start
    T = int(lengths.max())
    offsets = np.arange(T)[None, :]
    index = start[:, None] + offsets  # [B, T]
    real = offsets < lengths[:, None]
    index = np.where(real, index, 0)

    def column(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(real, values[index], 0).astype(np.int64))

    return EventBatch(
        item=column(log.item),
        category=column(log.category),
        behavior=column(log.behavior),
        ts=column(log.ts),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
    )


def history_items(
    log: EventLog, start: np.ndarray, stop: np.ndarray, num_items: int
) -> torch.Tensor:
    """[B, num_items] bool: the items of each row's whole history log[start:stop], the
    candidates `filter_history` removes (whatever part of it the model reads)."""
    seen = torch.zeros(len(start), num_items, dtype=torch.bool)
    for row, (a, z) in enumerate(zip(start, stop, strict=True)):
        seen[row, torch.from_numpy(log.item[a:z])] = True
    return seen


def context_length(model: torch.nn.Module, max_len: int | None) -> int | None:
    """The input length a model reads: its own bound (SASRec's positions) capped by max_len."""
    own = getattr(model, "max_len", None)
    if own is None:
        return max_len
    return own if max_len is None else min(own, max_len)


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (5, 10, 20, 50, 500)  # 5 and 20: what the S3-Rec papers report
    filter_history: bool = False  # remove the input history's items from the candidates
    # cohorts by the number of events before the target: (low, high) inclusive, None = open
    cohorts: tuple[tuple[int, int | None], ...] = ((1, 20), (21, 100), (101, 500), (501, None))
    cold_start_max: int = 5  # users with at most this many events before the target
    batch_size: int = 256  # users per batch, at most ...
    batch_tokens: int = 32_768  # ... and at most this many positions, padding included
    max_len: int | None = None  # input events read per user; None = all the model can read
    max_users: int | None = None  # evaluate a fixed seeded sample of users (fast validation)
    seed: int = 0


def cohort_name(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high}"


def ranking_scores(model: torch.nn.Module, batch: EventBatch) -> torch.Tensor:
    """Scores [B, num_items] of every item after each row's last event.

    A baseline that ranks without a user vector (`heuristics.py`), or a model that gates
    its scores by category (ULIM's cascade: -inf outside its top categories), has
    `rank_scores(batch)`;
    a model with a repeat head scores log P(i) of its repeat/explore mixture (`repeat.py`);
    any other model scores u . item, u its `user_vector` (the last position of its forward,
    which a model may form without the positions it does not need).
    """
    if hasattr(model, "rank_scores"):
        return model.rank_scores(batch)
    u = model.user_vector(batch)  # [B, d]
    scores = model.score(u)
    head = getattr(model, "repeat_head", None)
    if head is not None:
        scores = head.rank_scores(batch, u, scores, model.item_table())
    return scores


def evaluated_users(split: EvalSplit, which: str, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(start, target) of the `which` users evaluated: all, or `cfg.max_users` of them drawn
    with `cfg.seed` (the same sample for item and category ranks)."""
    starts, targets = split.targets(which)
    if cfg.max_users is not None and len(starts) > cfg.max_users:
        keep = np.sort(
            np.random.default_rng(cfg.seed).choice(len(starts), cfg.max_users, replace=False)
        )
        starts, targets = starts[keep], targets[keep]
    return starts, targets


def evaluation_batches(reads: np.ndarray, cfg: EvalConfig) -> list[np.ndarray]:
    """Indices of the users of each evaluation batch, from the number of events each reads:
    users of similar length together (a batch pads to its longest), at most
    `cfg.batch_size` users and `cfg.batch_tokens` positions a batch (long histories would
    otherwise pad a batch of 256 users to the longest one's length)."""
    order = np.argsort(reads, kind="stable")
    batches, begin = [], 0
    for end in range(1, len(order) + 1):
        longest = reads[order[end - 1]]  # ascending: the last user is the longest
        full = end - begin > cfg.batch_size or (end - begin) * longest > cfg.batch_tokens
        if full and end - 1 > begin:
            batches.append(order[begin : end - 1])
            begin = end - 1
    if begin < len(order):
        batches.append(order[begin:])
    return batches


def _reads(starts: np.ndarray, targets: np.ndarray, context: int | None) -> np.ndarray:
    """Events each user's input holds: its history before the target, cut to the context."""
    history = targets - starts
    return history if context is None else np.minimum(history, context)


@torch.no_grad()
def rank_targets(
    model: torch.nn.Module,
    log: EventLog,
    split: EvalSplit,
    which: str,
    cfg: EvalConfig = EvalConfig(),
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Ranks of every `which` target under both protocols, and each user's history length.

    Returns int64 arrays of one entry per evaluated user: "rank", "candidates" (all items),
    "rank_filtered", "candidates_filtered" (history removed), "history" (events before the
    target in the log, not only those the model read), and for a model with a category head
    (`category_scores(batch) -> [B, num_categories]`) "category_rank", the rank of the
    target event's category (category 0, unknown, is never a candidate).
    """
    starts, targets = evaluated_users(split, which, cfg)
    was_training = model.training
    model.eval()
    context = context_length(model, cfg.max_len)
    names = ["rank", "candidates", "rank_filtered", "candidates_filtered"]
    category_head = hasattr(model, "category_scores")
    if category_head:
        names.append("category_rank")
    out = {k: np.zeros(len(starts), np.int64) for k in names}  # in the split's user order
    for users in evaluation_batches(_reads(starts, targets, context), cfg):
        s, t = starts[users], targets[users]
        batch = history_batch(log, s, t, context).to(device)
        if category_head:
            target_category = torch.from_numpy(log.category[t]).to(device)
            rank, _ = target_ranks(model.category_scores(batch), target_category)
            out["category_rank"][users] = rank.cpu().numpy()
        scores = ranking_scores(model, batch)  # [B, N]
        target = torch.from_numpy(log.item[t]).to(device)
        seen = history_items(log, s, t, scores.shape[1]).to(device)
        for suffix, exclude in (("", None), ("_filtered", seen)):
            rank, n = target_ranks(scores, target, exclude)
            out["rank" + suffix][users] = rank.cpu().numpy()
            out["candidates" + suffix][users] = n.cpu().numpy()
    model.train(was_training)
    out["history"] = (targets - starts).astype(np.int64)
    return out


@torch.no_grad()
def rank_categories(
    model: torch.nn.Module,
    log: EventLog,
    split: EvalSplit,
    which: str,
    cfg: EvalConfig = EvalConfig(),
    device: str = "cpu",
) -> np.ndarray:
    """int64 [users]: rank of each `which` target's category under `model.category_scores`
    (a model with a category head, or a category baseline of `heuristics.py`), in the
    split's user order, with the same user sample as `rank_targets`."""
    starts, targets = evaluated_users(split, which, cfg)
    context = context_length(model, cfg.max_len)
    ranks = np.zeros(len(starts), np.int64)
    for users in evaluation_batches(_reads(starts, targets, context), cfg):
        s, t = starts[users], targets[users]
        batch = history_batch(log, s, t, context).to(device)
        target = torch.from_numpy(log.category[t]).to(device)
        ranks[users] = target_ranks(model.category_scores(batch), target)[0].cpu().numpy()
    return ranks


def summarize(ranked: dict[str, np.ndarray], cfg: EvalConfig = EvalConfig()) -> dict:
    """Metrics overall and per cohort, for the protocol `cfg.filter_history` selects."""
    suffix = "_filtered" if cfg.filter_history else ""
    rank, cand, hist = ranked["rank" + suffix], ranked["candidates" + suffix], ranked["history"]
    report = {"overall": ranking_metrics(rank, cand, cfg.ks), "cohorts": {}}
    groups = [
        (
            cohort_name(lo, hi),
            (hist >= lo) & (hist <= (hi if hi is not None else np.iinfo(np.int64).max)),
        )
        for lo, hi in cfg.cohorts
    ]
    groups.append((f"cold-start (<={cfg.cold_start_max})", hist <= cfg.cold_start_max))
    for name, rows in groups:
        report["cohorts"][name] = ranking_metrics(rank[rows], cand[rows], cfg.ks)
    return report


def evaluate(
    model: torch.nn.Module,
    log: EventLog,
    split: EvalSplit,
    which: str = "test",
    cfg: EvalConfig = EvalConfig(),
    device: str = "cpu",
) -> dict:
    """Full-ranking metrics of `model` on the `which` targets: {"protocol", "overall",
    "cohorts", and "overall_history_filtered" or "overall_unfiltered" for the other one}."""
    return report_of(rank_targets(model, log, split, which, cfg, device), split, which, cfg)


def report_of(ranked: dict[str, np.ndarray], split: EvalSplit, which: str, cfg: EvalConfig) -> dict:
    """`evaluate`'s report from the ranks `rank_targets` returned."""
    report = {"protocol": protocol(split, which, cfg), **summarize(ranked, cfg)}
    if "category_rank" in ranked:
        report["category_metrics"] = category_metrics(ranked["category_rank"])
    other = EvalConfig(**{**asdict(cfg), "filter_history": not cfg.filter_history})
    key = "overall_unfiltered" if cfg.filter_history else "overall_history_filtered"
    report[key] = summarize(ranked, other)["overall"]
    return report


def protocol(split: EvalSplit, which: str, cfg: EvalConfig) -> dict:
    return {
        "split": split.name,
        "targets": which,
        "ranking": "full (all items)",
        "history_items": "removed from candidates" if cfg.filter_history else "kept",
        "ties": "count against the model",
        "max_input_events": cfg.max_len,
        "users_sampled": cfg.max_users,
        "cohorts_by": "events before the target",
    }


# ---------------------------------------------------------------------------- reports


@dataclass
class ModelReport:
    """One row of a comparison: a model's name and its `evaluate` report, plus extras."""

    name: str
    report: dict
    extra: dict = field(default_factory=dict)


def markdown_table(
    rows: list[ModelReport],
    metrics: Sequence[str] = (
        "HR@10",
        "NDCG@10",
        "HR@50",
        "NDCG@50",
        "HR@500",
        "NDCG@500",
        "MRR",
        "AUC",
    ),
    cohort_metric: str = "NDCG@10",
) -> str:
    """Overall metrics per model, then `cohort_metric` per cohort (user counts in the head)."""
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row in rows:
        o = row.report["overall"]
        lines.append(f"| {row.name} | " + " | ".join(f"{o[m]:.4f}" for m in metrics) + " |")
    if rows:
        cohorts = list(rows[0].report["cohorts"])
        counts = [rows[0].report["cohorts"][c]["users"] for c in cohorts]
        lines += [
            "",
            f"{cohort_metric} by history length (events before the target):",
            "",
            "| model | "
            + " | ".join(f"{c} (n={n})" for c, n in zip(cohorts, counts, strict=True))
            + " |",
            "|---" * (len(cohorts) + 1) + "|",
        ]
        for row in rows:
            cells = [row.report["cohorts"][c][cohort_metric] for c in cohorts]
            lines.append(
                f"| {row.name} | "
                + " | ".join("-" if math.isnan(v) else f"{v:.4f}" for v in cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(
    rows: list[ModelReport], path: Path, title: str, metrics: Sequence[str] = ("HR@10", "NDCG@10")
) -> Path:
    """Bars: overall `metrics` per model (left), NDCG@10 per history cohort (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    names = [r.name for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(metrics)
    heuristic = [r.extra.get("kind") == "heuristic" for r in rows]
    for i, m in enumerate(metrics):
        bars = left.bar(x + i * width, [r.report["overall"][m] for r in rows], width, label=m)
        for bar, hatched in zip(bars, heuristic, strict=True):
            bar.set_hatch("//" if hatched else None)
    if any(heuristic):  # the bar a model has to clear
        best = max(
            r.report["overall"]["NDCG@10"] for r in rows if r.extra.get("kind") == "heuristic"
        )
        left.axhline(best, color="k", ls="--", lw=1, label="best heuristic NDCG@10")
    left.set_xticks(x + width * (len(metrics) - 1) / 2, names, rotation=35, ha="right")
    left.set_title("overall (hatched: heuristics)")
    left.legend(fontsize=8)
    cohorts = list(rows[0].report["cohorts"]) if rows else []
    cx = np.arange(len(cohorts))
    cw = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [np.nan_to_num(r.report["cohorts"][c]["NDCG@10"]) for c in cohorts]
        right.bar(cx + i * cw, values, cw, label=r.name)
    right.set_xticks(
        cx + cw * (len(rows) - 1) / 2,
        [f"{c}\n(n={rows[0].report['cohorts'][c]['users']})" for c in cohorts],
    )
    right.set_title("NDCG@10 by events before the target")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(
    rows: list[ModelReport], stem: Path, title: str, header: dict, notes: str = ""
) -> list[Path]:
    """`stem`.json (header + every model's report), `stem`.md (the tables, then `notes`)
    and `stem`.png."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {**header, "models": {r.name: {**r.extra, **r.report} for r in rows}}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md = [
        f"# {title}",
        "",
        f"Command: `{header.get('command', '')}`",
        "",
        f"Protocol: {json.dumps(header.get('protocol', {}))}",
        "",
        markdown_table(rows),
        notes,
    ]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(md))
    return [json_path, md_path, plot(rows, stem.with_suffix(".png"), title)]


def _jsonable(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
