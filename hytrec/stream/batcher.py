"""Micro-batching: gather items until there are `max_items` or the oldest has waited
`max_wait_s`. Pure bookkeeping with the clock passed in, so it is tested without sleeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_items: int = 512  # B: events per engine call
    max_wait_ms: float = 50.0  # W: the longest an event waits for its batch to fill

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_wait_ms < 0:
            raise ValueError(f"need max_items >= 1 and max_wait_ms >= 0, got {self}")


class MicroBatcher(Generic[T]):
    def __init__(self, config: BatchConfig = BatchConfig()):
        self.config = config
        self._items: list[T] = []
        self._opened_at: float | None = None  # clock time of the oldest item

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[T]:
        """The waiting items, oldest first (a view: do not change it)."""
        return self._items

    def add(self, item: T, now: float) -> bool:
        """Add an item; True when the batch is full and should be flushed now."""
        if not self._items:
            self._opened_at = now
        self._items.append(item)
        return self.full

    @property
    def full(self) -> bool:
        return len(self._items) >= self.config.max_items

    def time_left(self, now: float) -> float | None:
        """Seconds until the time trigger fires (<= 0: due), None when empty."""
        if self._opened_at is None:
            return None
        return self._opened_at + self.config.max_wait_ms / 1000.0 - now

    def due(self, now: float) -> bool:
        left = self.time_left(now)
        return self.full or (left is not None and left <= 0)

    def take(self) -> list[T]:
        """Empty the batch and return its items in arrival order."""
        items, self._items, self._opened_at = self._items, [], None
        return items
