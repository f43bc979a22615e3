"""What every registered model shares: its vocabularies, the item -> category table, scores
as dot products with the item table, a content version, and checkpoints.

A model subclasses `SequentialModel`, names itself (`NAME`, the `"model"` field of its
checkpoint) and its config class (`CONFIG`, a frozen dataclass with `num_items` and, when
it reads categories, `num_categories`), and defines `forward(batch) -> [B, T, d]` (the user
vector after every event, causal) and `item_emb`. Streaming models add `new_state` and
`step` (see `streaming.py`). A checkpoint directory holds `model.safetensors` and
`checkpoint.json` (format, model name, version, config, vocabularies, extra).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hytrec.model.events import Vocabulary

CHECKPOINT_FORMAT = "hytrec-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the file and the reason."""


def full_softmax_log_prob(
    user: torch.Tensor, table: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """log softmax_i(user . e_i)[target] over every real item: [P] for user [P, d], the item
    table [N, d] (row 0 padding) and target [P] item ids >= 1. The padding row is sliced off
    rather than its logit set to -inf: that in-place write copies the whole [P, N] logits in
    backward, and cross-entropy fuses the log-softmax and the gather (a sixth faster)."""
    return -F.cross_entropy(user @ table[1:].T, target - 1, reduction="none")


def config_from_dict(cls: type, values: dict):
    """A config dataclass from a checkpoint's dict; unknown fields are refused by name."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**values)


def read_checkpoint_meta(directory: str | Path) -> dict:
    """`checkpoint.json` of a checkpoint directory, checked for format and version."""
    meta_path = Path(directory) / "checkpoint.json"
    for path in (meta_path, meta_path.with_name("model.safetensors")):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (not a hytrec checkpoint directory?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta.get('format_version')}, "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    return meta


class SequentialModel(nn.Module):
    NAME: ClassVar[str]
    CONFIG: ClassVar[type]
    item_emb: nn.Embedding

    def __init__(self, cfg, items: Vocabulary | None = None, categories: Vocabulary | None = None):
        super().__init__()
        for vocab, size, what in (
            (items, cfg.num_items, "num_items"),
            (categories, getattr(cfg, "num_categories", None), "num_categories"),
        ):
            if vocab is not None and size is not None and len(vocab) != size:
                kind = "item" if what == "num_items" else "category"
                raise ValueError(
                    f"{kind} vocabulary has {len(vocab)} entries, config says {what}={size}"
                )
        self.cfg, self.items, self.categories = cfg, items, categories
        # item -> category index, filled from training data; the index's category filter uses it
        self.register_buffer("item_category", torch.zeros(cfg.num_items, dtype=torch.long))
        self.checkpoint_extra: dict = {}

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for linear and embedding weights, zero biases (norms keep 1 and 0)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ scoring

    def item_table(self) -> torch.Tensor:
        """[num_items, d] output item vectors (row 0 is padding)."""
        return self.item_emb.weight

    def score(self, user: torch.Tensor) -> torch.Tensor:
        """Dot products of user vectors [..., d] with every item: [..., num_items]; the
        padding item scores -inf."""
        logits = user @ self.item_table().T
        logits[..., 0] = float("-inf")
        return logits

    @torch.no_grad()
    def user_vector(self, batch) -> torch.Tensor:
        """The vector the index is queried with, after each row's last real event: [B, d]."""
        u = self(batch)
        return u[torch.arange(u.shape[0], device=u.device), batch.lengths - 1]

    def item_vectors(self) -> np.ndarray:
        """float32 [num_items - 1, d]: rows for vocabulary indices 1..num_items-1."""
        return self.item_table()[1:].detach().float().cpu().numpy()

    def item_categories(self) -> np.ndarray:
        """int64 [num_items - 1]: category index of items 1..num_items-1 (0 = unknown)."""
        return self.item_category[1:].cpu().numpy()

    def state_bytes_per_user(self) -> int:
        """Bytes of one user's serving state (streaming models: see `streaming.py`)."""
        return self.new_state(1, "meta").bytes_per_user()

    # ------------------------------------------------------------------ checkpoints

    def optional_buffers(self) -> dict[str, float]:
        """State-dict names of the buffers a submodule declares optional (`OPTIONAL_BUFFERS`:
        added after checkpoints existed), with their defaults."""
        return {
            f"{prefix}.{name}" if prefix else name: default
            for prefix, module in self.named_modules()
            for name, default in getattr(module, "OPTIONAL_BUFFERS", {}).items()
        }

    @property
    def version(self) -> str:
        """Content hash of the weights: equal weights, equal version. An optional buffer at
        its default is left out, so a checkpoint saved before it existed keeps its version."""
        digest = hashlib.sha256()
        optional = self.optional_buffers()
        for name, tensor in sorted(self.state_dict().items()):
            if name in optional and bool((tensor == optional[name]).all()):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write `model.safetensors` and `checkpoint.json` (format, config, vocabularies)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()}
        save_file(weights, directory / "model.safetensors")
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": self.NAME,
            "version": self.version,
            "config": asdict(self.cfg),
            "items": self.items.to_json() if self.items is not None else None,
            "categories": self.categories.to_json() if self.categories is not None else None,
            "extra": extra or {},
        }
        (directory / "checkpoint.json").write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu"):
        """Load a checkpoint written by `save`; refuse a mismatched one with a clear message."""
        directory = Path(directory)
        meta_path, weights_path = directory / "checkpoint.json", directory / "model.safetensors"
        meta = read_checkpoint_meta(directory)
        if meta.get("model") != cls.NAME:
            raise CheckpointError(
                f"{meta_path}: a {meta.get('model')!r} checkpoint, not {cls.NAME!r}"
            )
        try:
            cfg = config_from_dict(cls.CONFIG, meta["config"])
            items = Vocabulary(meta["items"]) if meta.get("items") is not None else None
            categories = (
                Vocabulary(meta["categories"]) if meta.get("categories") is not None else None
            )
            model = cls(cfg, items, categories)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{meta_path}: {err}") from err
        weights = load_file(weights_path, device=str(map_location))
        expected = model.state_dict()
        missing = expected.keys() - weights - model.optional_buffers().keys()
        unexpected = weights.keys() - expected
        if missing or unexpected:
            raise CheckpointError(
                f"{weights_path}: weights do not fit the config: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in expected.items():
            if name in weights and weights[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{weights_path}: {name} has shape {tuple(weights[name].shape)}, config "
                    f"needs {tuple(tensor.shape)}"
                )
        model.load_state_dict(weights, strict=False)  # absent optional buffers keep their default
        if meta.get("version") not in (None, model.version):
            raise CheckpointError(
                f"{weights_path}: weights hash to {model.version}, checkpoint.json says "
                f"{meta['version']} (corrupt or mixed files)"
            )
        model.checkpoint_extra = meta.get("extra", {})
        return model.to(map_location).eval()
