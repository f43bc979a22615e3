"""Per-user serving state: a slab of fixed-size slots on the device, an index user -> slot,
and eviction of the least recently used users to host memory when the slab is full.

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

import torch

from hytrec.model.streaming import SlotState, StreamingModel

log = logging.getLogger(__name__)

NO_OFFSET = -1


@dataclass
class UserState:
    """A user's state copied to host memory: `SlotState.parts()` by name, without the slot
    dimension, and the last offset applied per behaviours partition."""

    parts: dict[str, torch.Tensor]
    applied: dict[int, int]


class UserStateStore:
    """Slots for at most `num_slots` users on `device`; colder users wait in host memory.

    The byte budget is `num_slots * bytes_per_user` on the device (see `device_bytes`);
    evicted users cost the same per user in host memory. The applied offsets (a small dict
    per user, host memory) are not part of the budget.
    """

    def __init__(self, model: StreamingModel, num_slots: int, device: torch.device | str = "cpu"):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.state: SlotState = model.new_state(num_slots, device)
        self.applied: dict[str, dict[int, int]] = {}  # user -> partition -> last offset
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free = list(range(num_slots - 1, -1, -1))
        self.evicted: dict[str, dict[str, torch.Tensor]] = {}  # user -> parts, on the host
        self.evictions = 0

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
        return user in self.slot_of or user in self.evicted

    def __len__(self) -> int:
        """Users known to the store, on the device or evicted."""
        return len(self.slot_of) + len(self.evicted)

    def offset_of(self, user: str, partition: int) -> int:
        """The last offset of `partition` applied to `user`'s state, or NO_OFFSET."""
        return self.applied.get(user, {}).get(partition, NO_OFFSET)

    def mark_applied(self, user: str, partition: int, offset: int) -> None:
        self.applied.setdefault(user, {})[partition] = offset

    def newest_ts(self, user: str) -> int | None:
        """Time of the newest event applied to `user`, or None if none was."""
        if user in self.slot_of:
            slot = self.slot_of[user]
            count, last_ts = self.state.count[slot], self.state.last_ts[slot]
        elif user in self.evicted:
            parts = self.evicted[user]
            count, last_ts = parts["count"], parts["last_ts"]
        else:
            return None
        return int(last_ts) if int(count) > 0 else None

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
                index = torch.tensor([slot])
                if restored is None:
                    self.state.reset(index)
                else:
                    self.state.write(index, {n: t[None] for n, t in restored.items()})
                self.slot_of[user] = slot
            self.slot_of.move_to_end(user)
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.long)

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
            self.evicted[user] = {n: t.to("cpu").clone() for n, t in parts.items()}
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
        return dropped

    def reset_offsets(self, users: Sequence[str], partition: int) -> int:
        """Forget these users' applied offsets of `partition` but keep their states (the
        partition's log was replaced: its offsets start again); how many had one."""
        return sum(self.applied.get(user, {}).pop(partition, None) is not None for user in users)
