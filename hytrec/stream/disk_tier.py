"""The third tier of user state: users that fit neither the device slots nor the host-memory
budget wait on local disk, in LMDB (issue 17).

Why LMDB. It is a well-kept embedded key-value store made for this read-mostly, fixed-size
value workload: a memory-mapped B+tree, one file, no compaction threads, a maintained
binding (`lmdb` on PyPI, wheels for every platform), and reads that copy nothing until the
value is decoded. RocksDB (`rocksdict`) suits write-heavy logs with compaction; the
registries this project installs from do not carry `rocksdict`, and its LSM tree buys
nothing for values rewritten whole. Measured by `hytrec benchmark state-store`.

What it holds. A user's state as the raw little-endian bytes of its parts
(`SlotState.parts()`, without the slot dimension) in the layout's order: the layout is
fixed by the model, so no header is needed. The tier is a cache of this process, not a
record: the durable copy of every state is its snapshot in `user-state` (`snapshots.py`),
so LMDB runs without fsync, and the directory is emptied when a tier opens and removed when
it closes (a state left by an earlier process must never be read as current). Each user's
event count and newest time stay in memory (`meta`): the engine asks for them on every
batch, and they should not cost a disk read.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import lmdb
import numpy as np
import torch

_NUMPY = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.bool: np.dtype(np.bool_),
}


class DiskTier:
    """Users' states on local disk, by user id; `layout`: part -> (shape, dtype)."""

    def __init__(
        self,
        path: str | Path,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        map_size: int = 2**40,  # address space, not disk: the file grows as users come
    ):
        self.path = Path(path)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self.layout = dict(layout)
        self.counts = [int(np.prod(shape)) for shape, _ in self.layout.values()]
        self.env = lmdb.open(
            str(self.path), map_size=map_size, sync=False, metasync=False, readahead=False
        )
        self.meta: dict[str, tuple[int, int]] = {}  # user -> (count, last_ts)
        self.reads = self.writes = 0

    def __contains__(self, user: str) -> bool:
        return user in self.meta

    def __len__(self) -> int:
        return len(self.meta)

    def count_and_ts(self, user: str) -> tuple[int, int] | None:
        return self.meta.get(user)

    def put_many(self, states: Iterable[tuple[str, Mapping[str, torch.Tensor]]]) -> int:
        """Write these users' states (replacing what a user had here) in one transaction."""
        written = 0
        with self.env.begin(write=True) as txn:
            for user, parts in states:
                txn.put(user.encode(), self._encode(parts))
                self.meta[user] = (int(parts["count"]), int(parts["last_ts"]))
                written += 1
        self.writes += written
        return written

    def get(self, user: str) -> dict[str, torch.Tensor] | None:
        """A copy of the user's state, left on disk; None when it is not here."""
        if user not in self.meta:
            return None
        with self.env.begin(buffers=True) as txn:
            parts = self._decode(txn.get(user.encode()))
        self.reads += 1
        return parts

    def pop(self, user: str) -> dict[str, torch.Tensor] | None:
        """The user's state, taken off the disk; None when it is not here."""
        if user not in self.meta:
            return None
        with self.env.begin(write=True, buffers=True) as txn:
            parts = self._decode(txn.get(user.encode()))
            txn.delete(user.encode())
        del self.meta[user]
        self.reads += 1
        return parts

    def delete(self, user: str) -> bool:
        if self.meta.pop(user, None) is None:
            return False
        with self.env.begin(write=True) as txn:
            txn.delete(user.encode())
        return True

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of the pages in use (the file may be larger: freed pages are reused)."""
        stat = self.env.stat()
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return pages * stat["psize"]

    def close(self) -> None:
        self.env.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.meta.clear()

    # ------------------------------------------------------------------ encoding

    def _encode(self, parts: Mapping[str, torch.Tensor]) -> bytes:
        if parts.keys() != self.layout.keys():
            raise ValueError(f"state parts {sorted(parts)} != the tier's {sorted(self.layout)}")
        return b"".join(
            parts[name].detach().cpu().contiguous().numpy().tobytes() for name in self.layout
        )

    def _decode(self, value) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for (name, (shape, dtype)), count in zip(self.layout.items(), self.counts, strict=True):
            array = np.frombuffer(value, dtype=_NUMPY[dtype], count=count, offset=start)
            out[name] = torch.from_numpy(array.reshape(shape).copy())
            start += array.nbytes
        if start != len(value):
            raise ValueError(f"a state of {len(value)} bytes, the layout needs {start}")
        return out
