"""The canonical event log every loader produces and every consumer reads.

One behaviour event is (user, item, category, behavior, ts). Loaders map raw ids to
contiguous indices through a `Vocabulary` (index 0 is reserved for padding/unknown)
and raw behaviour names to the nine funnel stages of the HyTRec paper.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Behavior(enum.IntEnum):
    """Funnel stages of the paper, in funnel order, plus `UNKNOWN` (index 0 = padding)."""

    UNKNOWN = 0
    CLICK = 1
    REDIRECT = 2
    ACTIVATION = 3
    WAKE_UP = 4
    PRODUCT_CLICK = 5
    STAY = 6
    COLLECTION = 7
    ADD_TO_CART = 8
    PAYMENT = 9

    @classmethod
    def parse(cls, name: str) -> Behavior:
        """Map a raw behaviour name (funnel stage or a known log alias) to a stage.

        Raises ValueError naming the value for anything unrecognised.
        """
        key = behavior_key(name)
        if key in BEHAVIOR_ALIASES:
            return BEHAVIOR_ALIASES[key]
        raise ValueError(f"unknown behaviour {name!r}; expected one of {sorted(BEHAVIOR_ALIASES)}")


def behavior_key(word: str) -> str:
    """The form behaviour words are compared in: "Add-to cart" -> "add_to_cart"."""
    return word.strip().lower().replace("-", "_").replace(" ", "_")


# Real logs use subsets of the funnel: Taobao's pv/fav/cart/buy, ratings as clicks.
BEHAVIOR_ALIASES: dict[str, Behavior] = {
    **{b.name.lower(): b for b in Behavior},
    "wakeup": Behavior.WAKE_UP,
    "pv": Behavior.PRODUCT_CLICK,
    "view": Behavior.PRODUCT_CLICK,
    "fav": Behavior.COLLECTION,
    "favorite": Behavior.COLLECTION,
    "collect": Behavior.COLLECTION,
    "cart": Behavior.ADD_TO_CART,
    "buy": Behavior.PAYMENT,
    "purchase": Behavior.PAYMENT,
    "pay": Behavior.PAYMENT,
    "rating": Behavior.CLICK,
}

NUM_BEHAVIORS = len(Behavior)


class Vocabulary:
    """Raw id (str) <-> contiguous index; index 0 means padding or unknown."""

    PAD = 0

    def __init__(self, raw_ids: Iterable[str] = ()):
        self._raw: list[str] = ["<pad>"]
        self._index: dict[str, int] = {}
        for raw in raw_ids:
            self.add(raw)

    def add(self, raw: str) -> int:
        raw = str(raw)
        idx = self._index.get(raw)
        if idx is None:
            idx = len(self._raw)
            self._index[raw] = idx
            self._raw.append(raw)
        return idx

    def get(self, raw: str) -> int:
        """The index of `raw`, or 0 (unknown) when it is not in the vocabulary."""
        return self._index.get(str(raw), self.PAD)

    def __contains__(self, raw: object) -> bool:
        return str(raw) in self._index

    def __len__(self) -> int:
        """Size including the padding index, i.e. the embedding table size."""
        return len(self._raw)

    def raw(self, index: int) -> str:
        return self._raw[index]

    def raw_ids(self) -> list[str]:
        """Raw ids in index order, without the padding entry."""
        return self._raw[1:]

    def encode(self, raws: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.get(r) for r in raws), dtype=np.int64, count=len(raws))

    def to_json(self) -> list[str]:
        return self.raw_ids()

    @classmethod
    def from_json(cls, raw_ids: list[str]) -> Vocabulary:
        return cls(raw_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._raw == other._raw


@dataclass
class EventLog:
    """Columnar events, sorted by (user, ts, original order). All arrays have length N.

    user, item, category: vocabulary indices (int64, >= 1 for real entries);
    behavior: `Behavior` values (int64); ts: unix seconds or positions (int64).
    """

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    behavior: np.ndarray
    ts: np.ndarray
    users: Vocabulary
    items: Vocabulary
    categories: Vocabulary

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("item", "category", "behavior", "ts"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"EventLog column {name!r} has {len(getattr(self, name))} rows, expected {n}"
                )

    def __len__(self) -> int:
        return len(self.user)

    def user_slices(self) -> list[tuple[int, int, int]]:
        """(user index, start, stop) of each user's contiguous, time-ordered run."""
        if len(self) == 0:
            return []
        bounds = np.flatnonzero(np.diff(self.user)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [len(self)]])
        return [(int(self.user[s]), int(s), int(e)) for s, e in zip(starts, stops, strict=True)]

    def vocab_json(self) -> str:
        return json.dumps(
            {
                "items": self.items.to_json(),
                "categories": self.categories.to_json(),
                "users": self.users.to_json(),
            }
        )

    def save(self, path: Path) -> None:
        """Write the columns (npz) and vocabularies (JSON) next to each other."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path.with_suffix(".npz"),
            user=self.user,
            item=self.item,
            category=self.category,
            behavior=self.behavior,
            ts=self.ts,
        )
        path.with_suffix(".vocab.json").write_text(self.vocab_json())

    @classmethod
    def load(cls, path: Path) -> EventLog:
        path = Path(path)
        cols = np.load(path.with_suffix(".npz"))
        vocab = json.loads(path.with_suffix(".vocab.json").read_text())
        return cls(
            user=cols["user"],
            item=cols["item"],
            category=cols["category"],
            behavior=cols["behavior"],
            ts=cols["ts"],
            users=Vocabulary(vocab["users"]),
            items=Vocabulary(vocab["items"]),
            categories=Vocabulary(vocab["categories"]),
        )
