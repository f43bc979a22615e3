"""The TADN recurrence behind one dispatch: reference (oracle), chunked (training) and
step (streaming) forms, each selected by a `Backend`. Callers never import an
implementation directly.

`Backend.AUTO` takes Triton for CUDA tensors when Triton imports, else PyTorch; the Triton
chunked (training) kernel is taken only when asked for until it has run on a GPU. Triton on CPU
tensors needs TRITON_INTERPRET=1 set before this package is imported, and `backend="triton"`.
"""

from __future__ import annotations

import enum
import importlib.util
import warnings

import torch

from hytrec.kernels.chunked import chunk_tadn
from hytrec.kernels.reference import naive_tadn
from hytrec.kernels.step import run_mask, step_tadn


class Backend(enum.StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


_PARALLEL = {Backend.TORCH: chunk_tadn}
_STEP = {Backend.TORCH: step_tadn}
if importlib.util.find_spec("triton") is not None:
    from hytrec.kernels.triton_chunked import triton_chunk_tadn
    from hytrec.kernels.triton_step import triton_step_tadn

    _PARALLEL[Backend.TRITON] = triton_chunk_tadn
    _STEP[Backend.TRITON] = triton_step_tadn


def _pick(
    table: dict, backend: Backend | str, what: str, device: torch.device, auto_triton: bool = True
):
    backend = Backend(backend)
    if backend is Backend.AUTO:
        if device.type == "cuda" and Backend.TRITON in table and auto_triton:
            return table[Backend.TRITON]
        if device.type == "cuda" and Backend.TRITON not in table:
            warnings.warn(
                f"{what}: Triton is not installed, using the PyTorch form on CUDA "
                "(install the `gpu` extra)",
                stacklevel=3,
            )
        return table[Backend.TORCH]
    if backend not in table:
        raise ValueError(
            f"no {what} implementation for backend {backend.value!r}; "
            f"available: {[b.value for b in table]}"
        )
    return table[backend]


def tadn_parallel(
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    initial_state=None,
    *,
    chunk_size: int = 64,
    backend: Backend | str = Backend.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences at once; see `chunked.chunk_tadn` for shapes."""
    # AUTO keeps the PyTorch form on CUDA until the Triton chunked kernel has run and been
    # timed on a GPU (so far only its interpreter tests have): ask for backend="triton"
    impl = _pick(_PARALLEL, backend, "parallel TADN", v.device, auto_triton=False)
    return impl(q, k, v, beta, erase, log_decay, initial_state, chunk_size=chunk_size)


def tadn_step(
    state_pool,
    slots,
    lengths,
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    *,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """Runs of events of many users applied to pooled states; see `step.step_tadn`."""
    impl = _pick(_STEP, backend, "streaming TADN step", v.device)
    return impl(state_pool, slots, lengths, q, k, v, beta, erase, log_decay)


def available_backends() -> dict[str, list[str]]:
    return {"parallel": [b.value for b in _PARALLEL], "step": [b.value for b in _STEP]}


__all__ = [
    "Backend",
    "available_backends",
    "chunk_tadn",
    "naive_tadn",
    "run_mask",
    "step_tadn",
    "tadn_parallel",
    "tadn_step",
]
