"""A seeded synthetic e-commerce funnel with planted structure, for tests and scale runs.

The generator is vectorised over all N = sum of users' lengths events (no per-event Python
loop): 100 users x 12k events take well under a second.

Planted signals (what a model test can check; `SyntheticTruth` holds the ground truth):

1. Long-term preference. Each user has `favourites` distinct categories, drawn uniformly,
   fixed for the whole history, with Dirichlet(1) weights among them. An event outside a
   burst takes its category from the user's favourites with probability `p_favourite`,
   else from the global category popularity (Zipf, exponent `category_skew`).
2. Intent bursts. With probability `burst_rate` per event a burst starts: the next
   `burst_min..burst_max` events of the user are all in one burst category (drawn by
   global popularity) and `burst_gap_s` seconds apart on average (a burst lasts minutes).
   `SyntheticTruth.burst_category` [N] is that category, or -1 outside bursts.
   So the category of event t is the burst category when t is in a burst, otherwise
   one of the user's favourites with probability >= p_favourite: with the defaults, about
   75% of all events fall in "favourites or current burst category", against ~10% for the
   single most popular category.
3. Time gaps. Sessions of mean length `session_events`; gaps within a session are
   exponential with mean `click_gap_s` (seconds to minutes), between sessions log-normal
   around `session_gap_s` (hours to days). Burst events override the gap with a short one.
4. Funnel. Each event's stage is PRODUCT_CLICK, COLLECTION, ADD_TO_CART or PAYMENT with
   probabilities `funnel` (views dominate). A collection, cart or payment acts on the item
   of the user's most recent view (so it repeats that item and its category); a user's
   first event and the first event of every burst are views.
5. Items. `items_per_category` items per category, popularity Zipf (`item_skew`) within
   the category. Item raw id "i{c}_{r}" is the rank-r item of category c.

`revisiting_log` is a much smaller, separate log of planted repeats (users returning to
their last few items), for the repeat head's tests.

Raw ids are "u{n}", "c{n}", "i{c}_{r}"; vocabularies list every category and item of the
catalogue (index = 1 + position), users in order. Events are sorted by (user, ts) as
`EventLog` requires (ts strictly increases within a user).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hytrec.model.events import Behavior, EventLog, Vocabulary

FUNNEL_STAGES = (
    Behavior.PRODUCT_CLICK,
    Behavior.COLLECTION,
    Behavior.ADD_TO_CART,
    Behavior.PAYMENT,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and the strength of each planted signal (see the module docstring)."""

    users: int = 100
    min_events: int = 200  # per user, drawn uniformly in [min_events, max_events]
    max_events: int = 400
    categories: int = 50
    items_per_category: int = 200
    category_skew: float = 1.0  # Zipf exponents of popularity
    item_skew: float = 1.1
    favourites: int = 3
    p_favourite: float = 0.7
    burst_rate: float = 0.02
    burst_min: int = 3
    burst_max: int = 8
    burst_gap_s: float = 20.0
    session_events: float = 10.0
    click_gap_s: float = 60.0
    session_gap_s: float = 6 * 3600.0
    funnel: tuple[float, float, float, float] = (0.85, 0.05, 0.07, 0.03)  # view/fav/cart/buy
    start_ts: int = 1_700_000_000
    seed: int = 0


@dataclass(frozen=True)
class SyntheticTruth:
    """The planted structure. favourites: [U, F] category indices (vocabulary indices of the
    log); favourite_weights: [U, F]; burst_category: [N] category index or -1, aligned with
    the log's rows."""

    favourites: np.ndarray
    favourite_weights: np.ndarray
    burst_category: np.ndarray


def _zipf(n: int, skew: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** skew
    return p / p.sum()


def _draw(rng: np.random.Generator, p: np.ndarray, size: int) -> np.ndarray:
    """Indices drawn from the distribution p (inverse CDF, vectorised)."""
    return np.minimum(np.searchsorted(np.cumsum(p), rng.random(size), side="right"), len(p) - 1)


def generate_with_truth(
    config: SyntheticConfig = SyntheticConfig(),
) -> tuple[EventLog, SyntheticTruth]:
    """The synthetic `EventLog` and its planted structure; same config, same output."""
    c = config
    if not 0 < c.favourites <= c.categories:
        raise ValueError(f"favourites must be in 1..{c.categories}, not {c.favourites}")
    if c.min_events < 1 or c.max_events < c.min_events:
        raise ValueError(f"need 1 <= min_events <= max_events, got {c.min_events}, {c.max_events}")
    rng = np.random.default_rng(c.seed)
    U, C, I = c.users, c.categories, c.items_per_category
    lengths = rng.integers(c.min_events, c.max_events + 1, U)
    N = int(lengths.sum())
    user = np.repeat(np.arange(U), lengths)  # [N]
    first = np.r_[0, np.cumsum(lengths)[:-1]]  # [U] index of each user's first event
    is_first = np.zeros(N, dtype=bool)
    is_first[first] = True

    # 1. long-term preference: F distinct categories per user, Dirichlet(1) weights
    favourites = np.argsort(rng.random((U, C)), axis=1)[:, : c.favourites]  # [U, F]
    weights = rng.dirichlet(np.ones(c.favourites), U)  # [U, F]
    cum = np.cumsum(weights, axis=1)[user]  # [N, F]
    pick = np.minimum((rng.random(N)[:, None] > cum).sum(axis=1), c.favourites - 1)
    category_pop = _zipf(C, c.category_skew)
    category = np.where(
        rng.random(N) < c.p_favourite, favourites[user, pick], _draw(rng, category_pop, N)
    )

    # 2. bursts: starts, lengths, then every covered position of the same user
    starts = np.flatnonzero(rng.random(N) < c.burst_rate)
    blen = rng.integers(c.burst_min, c.burst_max + 1, len(starts))
    bcat = _draw(rng, category_pop, len(starts))
    offsets = np.arange(blen.sum()) - np.repeat(np.cumsum(blen) - blen, blen)
    covered = np.repeat(starts, blen) + offsets
    owner = np.repeat(user[starts], blen)
    inside = covered < N
    inside[inside] = user[covered[inside]] == owner[inside]
    burst = np.full(N, -1)
    burst[covered[inside]] = np.repeat(bcat, blen)[inside]  # later bursts win overlaps
    category = np.where(burst >= 0, burst, category)

    # 5. items by popularity within the category
    item = category * I + _draw(rng, _zipf(I, c.item_skew), N)

    # 4. funnel: conversions act on the item of the user's last view
    stage = _draw(rng, np.asarray(c.funnel, dtype=float) / sum(c.funnel), N)
    prev_burst = np.r_[-1, burst[:-1]]
    burst_head = (burst >= 0) & (is_first | (burst != prev_burst))
    stage[is_first | burst_head] = 0  # so a burst's conversions act on the burst's items
    view_at = np.maximum.accumulate(np.where(stage == 0, np.arange(N), 0))
    item = item[view_at]
    category = category[view_at]
    behavior = np.asarray(FUNNEL_STAGES, dtype=np.int64)[stage]

    # 3. gaps: clicks within sessions, long log-normal gaps between them, short in bursts
    gap = np.maximum(1.0, rng.exponential(c.click_gap_s, N))
    new_session = rng.random(N) < 1.0 / c.session_events
    gap = np.where(new_session, rng.lognormal(np.log(c.session_gap_s), 1.0, N), gap)
    in_burst_tail = (burst >= 0) & ~burst_head
    gap = np.where(in_burst_tail, np.maximum(1.0, rng.exponential(c.burst_gap_s, N)), gap)
    gap = np.ceil(gap).astype(np.int64)
    user_start = c.start_ts + rng.integers(0, 7 * 86400, U)
    gap[first] = 0
    clock = np.cumsum(gap)
    ts = user_start[user] + clock - clock[first][user]

    events = EventLog(
        user=user.astype(np.int64) + 1,
        item=item.astype(np.int64) + 1,
        category=category.astype(np.int64) + 1,
        behavior=behavior,
        ts=ts,
        users=Vocabulary(f"u{u}" for u in range(U)),
        items=Vocabulary(f"i{cat}_{r}" for cat in range(C) for r in range(I)),
        categories=Vocabulary(f"c{cat}" for cat in range(C)),
    )
    truth = SyntheticTruth(
        favourites=favourites + 1,
        favourite_weights=weights,
        burst_category=np.where(burst >= 0, burst + 1, -1),
    )
    return events, truth


def generate(config: SyntheticConfig = SyntheticConfig()) -> EventLog:
    """The synthetic `EventLog` (see `generate_with_truth` for the planted structure)."""
    return generate_with_truth(config)[0]


def revisiting_log(users=120, items=200, length=(15, 30), seed=0) -> EventLog:
    """A small log of planted repeats, for the repeat head's tests: 70% of each user's events
    revisit one of its last three distinct items (the newest most often, geometrically),
    the rest are uniformly random items, ten minutes apart. Nothing but the user's own
    history predicts a revisit. (A per-event loop: meant for a few thousand events.)"""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("user", "item", "ts")}
    for u in range(users):
        seen: list[int] = []
        for t in range(rng.integers(*length)):
            recent = list(dict.fromkeys(reversed(seen)))[:3]
            if recent and rng.random() < 0.7:
                item = recent[min(int(rng.geometric(0.6)) - 1, len(recent) - 1)]
            else:
                item = int(rng.integers(1, items + 1))
            seen.append(item)
            cols["user"].append(u + 1)
            cols["item"].append(item)
            cols["ts"].append(1_500_000_000 + 600 * t)
    n = len(cols["user"])
    return EventLog(
        user=np.array(cols["user"]),
        item=np.array(cols["item"]),
        category=np.zeros(n, np.int64),
        behavior=np.full(n, 5, np.int64),
        ts=np.array(cols["ts"]),
        users=Vocabulary(str(u) for u in range(1, users + 1)),
        items=Vocabulary(str(i) for i in range(1, items + 1)),
        categories=Vocabulary(),
    )


def long_range_log(
    users: int,
    distance: int,
    keys: int = 8,
    fillers: int = 500,
    seed: int | Sequence[int] = 0,
) -> EventLog:
    """A log where each user's last event depends only on an event `distance` steps back:
    the first event is one of `keys` key items, the next `distance - 1` are filler items
    drawn uniformly, and the last is the key's answer item (key j -> answer j). A model that
    reads only the last n < distance events sees no key: among the answers it can only
    guess (accuracy 1 / keys); one that remembers the first event can name the answer.
    Events are a minute apart; every event is a view of category 0 (nothing but the key
    tells the answer). Items: keys 1..keys, answers keys+1..2 keys, then the fillers. `seed`:
    anything `np.random.default_rng` takes (a tuple keeps draws of several sizes apart)."""
    if distance < 1 or keys < 2 or fillers < 1:
        raise ValueError(
            f"need distance >= 1, keys >= 2, fillers >= 1; got {distance}, {keys}, {fillers}"
        )
    rng = np.random.default_rng(seed)
    length = distance + 1
    key = rng.integers(0, keys, users)  # [U]
    item = 2 * keys + 1 + rng.integers(0, fillers, (users, length))  # [U, distance + 1]
    item[:, 0] = 1 + key
    item[:, -1] = 1 + keys + key
    n = users * length
    return EventLog(
        user=np.repeat(np.arange(1, users + 1), length),
        item=item.reshape(-1).astype(np.int64),
        category=np.zeros(n, np.int64),
        behavior=np.full(n, int(Behavior.PRODUCT_CLICK), np.int64),
        ts=np.tile(1_600_000_000 + 60 * np.arange(length), users).astype(np.int64),
        users=Vocabulary(f"u{u}" for u in range(users)),
        items=Vocabulary(
            [f"key{j}" for j in range(keys)]
            + [f"answer{j}" for j in range(keys)]
            + [f"filler{j}" for j in range(fillers)]
        ),
        categories=Vocabulary(),
    )
