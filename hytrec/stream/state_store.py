"""Per-user serving state: a slab of fixed-size slots on the device, an index user -> slot,
eviction of the least recently used users to host memory when the slab is full, and, with a
host budget and a state directory, of the least recently used host users to local disk
(`disk_tier.py`) when host memory is over its budget: three tiers, each user in one.

Each slot holds the model's serving state for one user (a `SlotState`: for HyTRec the TADN
matrices, the long softmax layers' key/value window, the short-term window, event count and
last event time; each registered model has its own parts). Beside the
slots, in host memory, the store keeps for each user the last source offset applied per
`behaviors` partition, so that a replayed event is recognised and skipped: per partition,
because offsets of two partitions cannot be compared (a user's events may come from two
partitions when producers partition differently), and a replay is always of one partition.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hytrec.model.streaming import SlotState, StreamingModel
from hytrec.stream.disk_tier import DiskTier

log = logging.getLogger(__name__)

NO_OFFSET = -1


@dataclass
class UserState:
    """A user's state copied to host memory: `SlotState.parts()` by name, without the slot
    dimension, and the last offset applied per behaviours partition."""

    parts: dict[str, torch.Tensor]
    applied: dict[int, int]


class UserStateStore:
    """Slots for at most `num_slots` users on `device`; colder users wait in host memory,
    and with `disk_dir`, the coldest of those on disk once host memory holds more than
    `host_budget_bytes` of states.

    The byte budget is `num_slots * bytes_per_user` on the device (see `device_bytes`);
    evicted users cost the same per user in host memory (unbounded without a disk tier).
    The applied offsets (a small dict per user, host memory) are not part of the budget.
    """

    def __init__(
        self,
        model: StreamingModel,
        num_slots: int,
        device: torch.device | str = "cpu",
        host_budget_bytes: int | None = None,
        disk_dir: str | Path | None = None,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if (host_budget_bytes is None) != (disk_dir is None):
            raise ValueError("a host budget needs a disk directory to spill to, and back")
        self.state: SlotState = model.new_state(num_slots, device)
        self.applied: dict[str, dict[int, int]] = {}  # user -> partition -> last offset
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free = list(range(num_slots - 1, -1, -1))
        # user -> parts, on the host; least recently evicted first
        self.evicted: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.evictions = 0
        self.disk: DiskTier | None = None
        self.host_users: int | None = None  # most users in host memory (with a disk tier)
        if disk_dir is not None:
            layout = {n: (tuple(t.shape[1:]), t.dtype) for n, t in self.state.parts().items()}
            self.disk = DiskTier(disk_dir, layout)
            self.host_users = max(1, host_budget_bytes // self.bytes_per_user)

    @property
    def num_slots(self) -> int:
        return self.state.num_slots

    @property
    def bytes_per_user(self) -> int:
        """Device bytes of one slot: the model's state (`SlotState.bytes_by_part`)."""
        return self.state.bytes_per_user()

    @property
    def device_bytes(self) -> int:
        return self.num_slots * self.bytes_per_user

    def __contains__(self, user: str) -> bool:
        return user in self.slot_of or user in self.evicted or self._on_disk(user)

    def __len__(self) -> int:
        """Users known to the store, on the device, in host memory or on disk."""
        return (
            len(self.slot_of) + len(self.evicted) + (len(self.disk) if self.disk is not None else 0)
        )

    def _on_disk(self, user: str) -> bool:
        return self.disk is not None and user in self.disk

    def offset_of(self, user: str, partition: int) -> int:
        """The last offset of `partition` applied to `user`'s state, or NO_OFFSET."""
        return self.applied.get(user, {}).get(partition, NO_OFFSET)

    def mark_applied(self, user: str, partition: int, offset: int) -> None:
        self.applied.setdefault(user, {})[partition] = offset

    def newest_ts(self, user: str) -> int | None:
        """Time of the newest event applied to `user`, or None if none was."""
        count, last_ts = self._count_and_ts(user)
        return last_ts if count > 0 else None

    def events_applied(self, user: str) -> int:
        """How many events `user`'s state has taken (0 for a user the store does not know)."""
        return self._count_and_ts(user)[0]

    def _count_and_ts(self, user: str) -> tuple[int, int]:
        if user in self.slot_of:
            slot = self.slot_of[user]
            return int(self.state.count[slot]), int(self.state.last_ts[slot])
        parts = self.evicted.get(user)
        if parts is not None:
            return int(parts["count"]), int(parts["last_ts"])
        on_disk = self.disk.count_and_ts(user) if self.disk is not None else None
        return on_disk or (0, 0)

    def acquire(self, users: Sequence[str]) -> torch.Tensor:
        """Slots for `users` (distinct), loading evicted ones back and allocating new ones
        (zero state); evicts least recently used users that are not in `users`."""
        if len(users) > self.num_slots:
            raise ValueError(f"a batch of {len(users)} users exceeds the {self.num_slots} slots")
        wanted = set(users)
        slots = []
        for user in users:
            slot = self.slot_of.get(user)
            if slot is None:
                slot = self._allocate(wanted)
                restored = self.evicted.pop(user, None)
                if restored is None and self.disk is not None:
                    restored = self.disk.pop(user)
                index = torch.tensor([slot])
                if restored is None:
                    self.state.reset(index)
                else:
                    self.state.write(index, {n: t[None] for n, t in restored.items()})
                self.slot_of[user] = slot
            self.slot_of.move_to_end(user)
            slots.append(slot)
        self._spill()
        return torch.tensor(slots, dtype=torch.long)

    def _spill(self) -> None:
        """Move the least recently evicted host users to disk until host memory is within
        its budget: one write transaction for all of them."""
        if self.disk is None or len(self.evicted) <= self.host_users:
            return
        surplus = len(self.evicted) - self.host_users
        moved = [self.evicted.popitem(last=False) for _ in range(surplus)]
        self.disk.put_many(moved)

    def _allocate(self, protected: set[str]) -> int:
        if self.free:
            return self.free.pop()
        for victim in self.slot_of:  # least recently used first
            if victim not in protected:
                break
        else:  # pragma: no cover - acquire() checks the batch fits
            raise RuntimeError("no slot can be evicted")
        slot = self.slot_of.pop(victim)
        index = torch.tensor([slot])
        self.evicted[victim] = {name: t[0].to("cpu") for name, t in self.state.read(index).items()}
        self.evictions += 1
        return slot

    # ------------------------------------------------------------------ snapshots (issue 5)

    def export_users(self, users: Sequence[str]) -> dict[str, UserState]:
        """Host copies of these users' states and applied offsets (unknown users are left
        out); the store is left as it is (no slot moves, no LRU change). One gather per
        state tensor for all users on the device."""
        out: dict[str, UserState] = {}
        on_device = [u for u in users if u in self.slot_of]
        if on_device:
            index = torch.tensor([self.slot_of[u] for u in on_device])
            device = self.state.count.device
            parts = {n: t.to("cpu") for n, t in self.state.read(index.to(device)).items()}
            for row, user in enumerate(on_device):  # rows of fresh copies: views suffice
                applied = dict(self.applied.get(user, {}))
                out[user] = UserState({n: t[row] for n, t in parts.items()}, applied)
        for user in users:
            kept = self.evicted.get(user)
            if kept is not None:
                parts = {n: t.clone() for n, t in kept.items()}
            elif self._on_disk(user):
                parts = self.disk.get(user)  # a fresh copy
            else:
                continue
            out[user] = UserState(parts, dict(self.applied.get(user, {})))
        return out

    def import_user(
        self, user: str, parts: Mapping[str, torch.Tensor], applied: Mapping[int, int]
    ) -> None:
        """Replace `user`'s state (e.g. restored from a snapshot): written into its slot when
        it has one, else kept in host memory until `acquire` loads it. `parts` must name
        every part of this model's state with its shape (slot dimension left out)."""
        layout = {n: tuple(t.shape[1:]) for n, t in self.state.parts().items()}
        given = {n: tuple(t.shape) for n, t in parts.items()}
        if given != layout:
            raise ValueError(
                f"state of user {user!r} does not fit this model's state layout: "
                f"{given} != {layout}"
            )
        if user in self.slot_of:
            slot = self.slot_of[user]
            self.state.write(torch.tensor([slot]), {n: t[None] for n, t in parts.items()})
        else:
            if self.disk is not None:
                self.disk.delete(user)
            self.evicted[user] = {n: t.to("cpu").clone() for n, t in parts.items()}
            self.evicted.move_to_end(user)
            self._spill()
        self.applied[user] = dict(applied)

    def forget(self, users: Sequence[str]) -> int:
        """Drop these users' states (their partitions moved to another worker); how many
        were known."""
        dropped = 0
        for user in users:
            self.applied.pop(user, None)
            slot = self.slot_of.pop(user, None)
            if slot is not None:
                self.free.append(slot)
                dropped += 1
            elif self.evicted.pop(user, None) is not None:
                dropped += 1
            elif self.disk is not None and self.disk.delete(user):
                dropped += 1
        return dropped

    def reset_offsets(self, users: Sequence[str], partition: int) -> int:
        """Forget these users' applied offsets of `partition` but keep their states (the
        partition's log was replaced: its offsets start again); how many had one."""
        return sum(self.applied.get(user, {}).pop(partition, None) is not None for user in users)

    def close(self) -> None:
        """Remove the disk tier's files (the states there are gone with them)."""
        if self.disk is not None:
            self.disk.close()
