"""Semantic IDs: a frozen hierarchical codebook over items, its files and checksums.

`hytrec build-semantic-ids` (`index/semantic_ids.py`) builds one by residual k-means over
the item table of a trained checkpoint; HiSAC (`hisac.py`) routes a user's behaviours
through it. The format lives here, in the model package, because the model reads it (the
model may not import the index package) and the index package writes it.

A codebook of L levels over N items:

    codes      int64 [N, L + 1]  each item's code per level, then its dedup code (0, 1, ...
                                 among the items that share the L codes), so that every
                                 item's path is unique
    nodes      the distinct code prefixes (c^1..c^l) of the items, level by level, each
               level sorted: node ids 0..P-1; node_level int64 [P] (1..L), node_parent int64
               [P] (-1 at level 1), centres float32 [P, d] = the prefix reconstruction
               sum_{m <= l} e^m_{c^m}
    item_nodes int64 [N, L]      the item's own node at each level
    routes     int64 [N, L, r]   per level: the item's own node first, then the r - 1 other
                                 nodes of that level with the largest <centre, s_i>; -1 pads
                                 a level with fewer than r nodes
    route_logits float32 [N, L, r]  <centre, s_i> of each route (0 where -1)
    vectors    float32 [N, d]    the semantic vectors s_i (the frozen table, L2-normalised)
    ids        int64 [N]         the items' vocabulary indices

`save` writes one .npy file per array and `semantic-ids.json` (sizes, seed, source model
version, item-vocabulary hash, each file's sha256, the build report) last, so that a
directory without it is recognisably incomplete; `load` checks every checksum. Equal
inputs and seed give byte-identical files (no time stamp is written).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hytrec.model.events import EventLog, Vocabulary

META_FILE = "semantic-ids.json"
FORMAT = "hytrec-semantic-ids"
FORMAT_VERSION = 1
ARRAYS = (
    "ids",
    "codes",
    "node_level",
    "node_parent",
    "centres",
    "item_nodes",
    "routes",
    "route_logits",
    "vectors",
)


class SemanticIdsError(ValueError):
    """A semantic-IDs directory that cannot be used, with the file and the reason."""


def vocabulary_hash(raw_ids: list[str]) -> str:
    """sha256 of an item vocabulary's raw ids in index order (what a codebook was built for)."""
    return hashlib.sha256(json.dumps(list(raw_ids)).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class SemanticIds:
    ids: np.ndarray
    codes: np.ndarray
    node_level: np.ndarray
    node_parent: np.ndarray
    centres: np.ndarray
    item_nodes: np.ndarray
    routes: np.ndarray
    route_logits: np.ndarray
    vectors: np.ndarray
    meta: dict = field(default_factory=dict)  # sizes, seed, model_version, items_hash, report

    @property
    def levels(self) -> int:
        return self.item_nodes.shape[1]

    @property
    def route_top(self) -> int:
        return self.routes.shape[2]

    @property
    def num_nodes(self) -> int:
        return len(self.node_level)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name in ARRAYS:
            path = directory / f"{name}.npy"
            np.save(path, getattr(self, name), allow_pickle=False)
            digests[path.name] = _sha256(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta, "sha256": digests}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SemanticIds:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise SemanticIdsError(f"{meta_path}: missing (not a semantic-IDs directory?)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise SemanticIdsError(f"{meta_path}: not valid JSON ({err})") from err
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise SemanticIdsError(
                f"{meta_path}: format {meta.get('format')!r} version "
                f"{meta.get('format_version')!r}, this code reads {FORMAT!r} {FORMAT_VERSION}"
            )
        arrays = {}
        for name in ARRAYS:
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise SemanticIdsError(f"{path}: missing")
            if _sha256(path) != meta["sha256"].get(path.name):
                raise SemanticIdsError(
                    f"{path}: checksum differs from {META_FILE} (corrupt or replaced file)"
                )
            arrays[name] = np.load(path, allow_pickle=False)
        rest = {k: v for k, v in meta.items() if k not in ("format", "format_version", "sha256")}
        out = cls(**arrays, meta=rest)
        out.check()
        return out

    def require_items(self, items: Vocabulary, where: str = "") -> None:
        """Refuse an item vocabulary other than the one the codebook was built for (a
        codebook without the hash, built from a model without a vocabulary, passes)."""
        want = self.meta.get("items_hash")
        if want is not None and vocabulary_hash(items.to_json()) != want:
            raise SemanticIdsError(f"{where}built for another item vocabulary (hash {want})")

    def as_categories(self, log: EventLog) -> EventLog:
        """`log` with each event's category replaced by its item's level-1 code (code j is
        category j + 1, named "code{j}"; an item the codebook does not hold is unknown, 0):
        pseudo-categories for a model that needs categories (ULIM) on data without any
        (Beauty, Sports, Foursquare). Refused for a codebook of another item vocabulary."""
        self.require_items(log.items)
        if int(self.ids.max(initial=0)) >= len(log.items):
            raise SemanticIdsError(f"item ids up to {int(self.ids.max())}, the log has fewer")
        of_item = np.zeros(len(log.items), dtype=np.int64)  # [items]: 0 = unknown
        of_item[self.ids] = self.codes[:, 0] + 1
        level_one = int(self.codes[:, 0].max(initial=-1)) + 1
        return replace(
            log,
            category=of_item[log.item],
            categories=Vocabulary(f"code{j}" for j in range(level_one)),
        )

    def check(self) -> None:
        """Shapes agree with each other (a mixed directory is refused by name)."""
        n, levels = self.item_nodes.shape
        p = self.num_nodes
        want = {
            "ids": (n,),
            "codes": (n, levels + 1),
            "node_parent": (p,),
            "centres": (p, self.vectors.shape[1]),
            "routes": (n, levels, self.route_top),
            "route_logits": (n, levels, self.route_top),
            "vectors": (n, self.vectors.shape[1]),
        }
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise SemanticIdsError(f"{name}: shape {got}, expected {shape}")
