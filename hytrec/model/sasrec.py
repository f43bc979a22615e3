"""SASRec, the reference point for sequential recommendation, in one small file.

Follows "Self-Attentive Sequential Recommendation" (Kang and McAuley, ICDM 2018): item
embeddings plus learned positions, a stack of causal softmax self-attention blocks, and
scores as dot products with the (shared) item embeddings:

    x_t   = item[i_t] + pos[t]                            t = 0 .. T-1, T <= max_len
    h     = L pre-norm blocks: x + Attn(LN x), then x + FFN(LN x), attention causal
    u_t   = LN(h_t),      score(item) = u_t . item

It reads only item ids (no categories, behaviours or time), and at most `max_len` events:
the harness feeds it each user's last `max_len`. With `repeat_head` set, ranking uses log
P(i) of the repeat/explore mixture over the user's recent distinct items (`repeat.py`; the
head reads the stages and times of the same events). Same interface as `HyTRec`:
`forward(batch) -> [B, T, d]`, `score(u)`, `item_table()`, `user_vector(batch)`,
`save(dir, extra)` / `load(dir)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hytrec.model.events import Vocabulary
from hytrec.model.hytrec import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, EventBatch
from hytrec.model.repeat import RepeatConfig, RepeatHead, as_repeat_config


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int = 1000  # including the padding row 0
    d_model: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50  # learned positions: the longest input it reads
    ffn_mult: int = 4
    dropout: float = 0.1
    # the repeat/explore head over the user's recent distinct items (`repeat.py`); None = off
    repeat_head: RepeatConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repeat_head", as_repeat_config(self.repeat_head))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (
            t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, dh]
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        # right padding: a real position never sees a later (pad) one, so a causal mask is all
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * d, d),
            nn.Dropout(cfg.dropout),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig, items: Vocabulary | None = None):
        super().__init__()
        if items is not None and len(items) != cfg.num_items:
            raise ValueError(
                f"item vocabulary has {len(items)} entries, config says num_items={cfg.num_items}"
            )
        self.cfg, self.items = cfg, items
        self.item_emb = nn.Embedding(cfg.num_items, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.repeat_head = (
            RepeatHead(cfg.repeat_head, cfg.d_model) if cfg.repeat_head is not None else None
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    def forward(self, batch: EventBatch) -> torch.Tensor:
        """User vectors after every event: [B, T, d] (garbage at padded positions)."""
        T = batch.item.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(
                f"SASRec reads at most {self.cfg.max_len} events, got {T}: feed the last max_len"
            )
        pos = torch.arange(T, device=batch.item.device)
        x = self.dropout(self.item_emb(batch.item) + self.pos_emb(pos))  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight

    def score(self, user: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., num_items] logits; the padding item scores -inf."""
        logits = user @ self.item_table().T
        logits[..., 0] = float("-inf")
        return logits

    @torch.no_grad()
    def user_vector(self, batch: EventBatch) -> torch.Tensor:
        u = self(batch)
        return u[torch.arange(u.shape[0], device=u.device), batch.lengths - 1]

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """`model.safetensors` + `checkpoint.json` in the HyTRec checkpoint format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()},
            directory / "model.safetensors",
        )
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": "sasrec",
            "config": asdict(self.cfg),
            "items": self.items.to_json() if self.items is not None else None,
            "extra": extra or {},
        }
        (directory / "checkpoint.json").write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str = "cpu") -> SASRec:
        directory = Path(directory)
        meta = json.loads((directory / "checkpoint.json").read_text())
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("model") != "sasrec":
            raise CheckpointError(
                f"{directory}: not a SASRec checkpoint (model {meta.get('model')!r})"
            )
        items = Vocabulary(meta["items"]) if meta.get("items") is not None else None
        model = cls(SASRecConfig(**meta["config"]), items)
        model.load_state_dict(load_file(directory / "model.safetensors", device=map_location))
        model.checkpoint_extra = meta.get("extra", {})
        return model.to(map_location).eval()
