"""The TADN recurrence behind one dispatch: reference (oracle), chunked (training) and
step (streaming) forms, each selected by a `Backend`. Faster backends (Triton) register
here; callers never import an implementation directly.
"""
from __future__ import annotations

import enum

import torch

from hytrec.kernels.chunked import chunk_tadn
from hytrec.kernels.reference import naive_tadn
from hytrec.kernels.step import run_mask, step_tadn


class Backend(enum.StrEnum):
    TORCH = "torch"


_PARALLEL = {Backend.TORCH: chunk_tadn}
_STEP = {Backend.TORCH: step_tadn}


def _pick(table: dict, backend: Backend | str, what: str):
    backend = Backend(backend)
    if backend not in table:
        raise ValueError(f"no {what} implementation for backend {backend.value!r}; "
                         f"available: {[b.value for b in table]}")
    return table[backend]


def tadn_parallel(q, k, v, beta, erase, log_decay, initial_state=None, *, chunk_size: int = 64,
                  backend: Backend | str = Backend.TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences at once; see `chunked.chunk_tadn` for shapes."""
    impl = _pick(_PARALLEL, backend, "parallel TADN")
    return impl(q, k, v, beta, erase, log_decay, initial_state, chunk_size=chunk_size)


def tadn_step(state_pool, slots, lengths, q, k, v, beta, erase, log_decay, *,
              backend: Backend | str = Backend.TORCH) -> torch.Tensor:
    """Runs of events of many users applied to pooled states; see `step.step_tadn`."""
    impl = _pick(_STEP, backend, "streaming TADN step")
    return impl(state_pool, slots, lengths, q, k, v, beta, erase, log_decay)


__all__ = ["Backend", "chunk_tadn", "naive_tadn", "run_mask", "step_tadn", "tadn_parallel",
           "tadn_step"]
