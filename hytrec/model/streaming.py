"""What the stream needs from a model: a pooled per-user state and a step that applies
micro-batches of events to it (`StreamingModel`), and the state's common shape (`SlotState`).

Every serving state is a dataclass of tensors (or lists of tensors, one per layer) whose
first dimension is the slot, with two fields every engine reads: `count` (events applied)
and `last_ts` (time of the newest applied event). A field may be None (a part this model
does not have, as `recent` without a repeat head): it is no part at all. Its parts are
addressed by name
(`"tadn.0"`, `"window"`, ...), never by position: snapshots, eviction to host memory and
restores carry the names and refuse a state whose names differ.

A model whose state keeps parts derived from its events, brought up to date lazily when it
reads them (ULIM's slot interests), also has `refresh_state(state, slots)`, which brings
them up to date without a read: the engine calls it on states built without reads before
they leave it (`RecommendationEngine.settle`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from hytrec.model.events import Vocabulary


class SlotState:
    """Base of the serving states (subclasses are dataclasses; see the module docstring)."""

    count: torch.Tensor
    last_ts: torch.Tensor

    def parts(self) -> dict[str, torch.Tensor]:
        """Every tensor by name: a field, or `field.i` for the i-th tensor of a list field
        (one per layer). Snapshots and the state store address the state through these
        names, never by position."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self._present():
            if isinstance(value, list):
                out.update({f"{name}.{i}": t for i, t in enumerate(value)})
            else:
                out[name] = value
        return out

    def _present(self) -> list[tuple[str, torch.Tensor | list[torch.Tensor]]]:
        """(name, value) of every field that is not None."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return [(name, value) for name, value in values if value is not None]

    @property
    def num_slots(self) -> int:
        return self.count.shape[0]

    def bytes_by_part(self) -> dict[str, int]:
        """Bytes one slot takes, per field (a list field summed over its tensors)."""
        out: dict[str, int] = {}
        for name, value in self._present():
            out[name] = sum(
                t[0].numel() * t.element_size()
                for t in (value if isinstance(value, list) else [value])
            )
        return out

    def bytes_per_user(self) -> int:
        return sum(self.bytes_by_part().values())

    def reset(self, slots: torch.Tensor) -> None:
        for t in self.parts().values():
            t[slots] = 0

    def read(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of these slots' tensors by name, each [len(slots), ...]."""
        return {name: t[slots].clone() for name, t in self.parts().items()}

    def write(self, slots: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        """Write `values` (every part by name, slot dimension first) into these slots; a
        state of another model or config (other names) is refused before anything is
        written."""
        parts = self.parts()
        if values.keys() != parts.keys():
            raise ValueError(f"state parts {sorted(values)} != this state's {sorted(parts)}")
        for name, t in parts.items():
            t[slots] = values[name].to(t.device)


@runtime_checkable
class StreamingModel(Protocol):
    """A model the stream can serve (HyTRec, SASRec, RecGRELA, HSTU, ...)."""

    items: Vocabulary | None
    categories: Vocabulary | None

    @property
    def version(self) -> str: ...

    def new_state(self, num_slots: int, device: torch.device | str = "cpu") -> SlotState:
        """A zeroed state of `num_slots` users."""
        ...

    def step(self, state: SlotState, slots: torch.Tensor, batch) -> torch.Tensor:
        """Apply each user's run of new events (an `EventBatch`, rows right-padded, in time
        order) to its slot in place; the user vectors after each run, [U, d]."""
        ...

    def state_bytes_per_user(self) -> int: ...

    def item_vectors(self) -> np.ndarray: ...

    def item_categories(self) -> np.ndarray: ...
