"""What every model reads: right-padded batches of events (`EventBatch`), the packed view
of a serving micro-batch's runs (`PackedRuns`), and the ring-buffer append the serving
states use (`shift_window`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hytrec.kernels import run_mask


@dataclass
class EventBatch:
    """Right-padded event sequences. item/category/behavior/ts: [B, T] int64; lengths: [B]."""

    item: torch.Tensor
    category: torch.Tensor
    behavior: torch.Tensor
    ts: torch.Tensor  # unix seconds (int64 keeps second precision; fp32 would not)
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> EventBatch:
        return EventBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def mask(self) -> torch.Tensor:
        return run_mask(self.lengths, self.item.shape[1])  # [B, T]

    def inputs(self) -> EventBatch:
        """A training window's inputs: each row's events but its last ([B, T-1]; position
        t's target is event t + 1 of the window)."""
        cut = (t[:, :-1] for t in (self.item, self.category, self.behavior, self.ts))
        return EventBatch(*cut, self.lengths - 1)


@dataclass(frozen=True)
class PackedRuns:
    """Where the N real events of a micro-batch sit in its right-padded [U, M] grid (every
    run holds at least one event: the engine never builds an empty one).

    The serving step runs every per-event layer (embeddings, projections, norms, FFN) on the
    N events only and pads just around the recurrences: a batch of 256 Taobao events over
    ~59 users pads to ~5.5x as many positions.
    """

    lengths: torch.Tensor  # [U] events per run
    max_len: int  # M
    index: torch.Tensor  # [N] flat positions u * M + m of the real events, run after run

    @classmethod
    def of(cls, lengths: torch.Tensor, max_len: int) -> PackedRuns:
        index = run_mask(lengths, max_len).flatten().nonzero().squeeze(1)  # one host sync
        return cls(lengths, max_len, index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[U, M, ...] -> [N, ...]"""
        if self.max_len == 1:  # one event per run (the common serving call): N = U, a view
            return x.flatten(0, 1)
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [U, M, ...], zeros at the padded positions."""
        if self.max_len == 1:  # no padded position: a view
            return x.unsqueeze(1)
        U = self.lengths.shape[0]
        out = x.new_zeros(U * self.max_len, *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(U, self.max_len, *x.shape[1:])

    @property
    def newest(self) -> torch.Tensor:
        """[U] packed position of each run's newest event."""
        return self.lengths.cumsum(0) - 1


def shift_window(window: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Append each row's first lengths[u] entries of `new` [U, M, ...] to `window`
    [U, W, ...] (oldest first) and keep the last W."""
    W = window.shape[1]
    combined = torch.cat([window, new], dim=1)  # [U, W + M, ...]
    index = lengths[:, None] + torch.arange(W, device=window.device)[None, :]  # [U, W]
    index = index.view(*index.shape, *([1] * (combined.dim() - 2))).expand(
        -1, -1, *combined.shape[2:]
    )
    return combined.gather(1, index)
