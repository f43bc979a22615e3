"""The batched streaming update: many users' runs of events applied to a pool of states.

A micro-batch holds, for U users, runs of 1..M events each (right-padded to M). Each user's
state lives in one slot of a pool; the step gathers the slots, applies every run in order,
writes the states back in place and returns the read-out of every event.
"""

from __future__ import annotations

import torch

from hytrec.kernels.reference import naive_tadn


def run_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[U, M] True where position m < lengths[u]."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def step_tadn(
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    erase: torch.Tensor,
    log_decay: torch.Tensor,
) -> torch.Tensor:
    """Apply each user's run of events to its pooled state, in place.

    Args:
        state_pool: [P, H, K, V] fp32 states of all slots; updated in place.
        slots: [U] distinct slot indices, one per user in the batch.
        lengths: [U] number of real events per user (1..M); the rest is padding.
        q, k: [U, M, H, K]; v: [U, M, H, V]; beta, erase, log_decay: [U, M, H].

    Returns:
        o: [U, M, H, V] read-outs after each event (zeros at padded positions).
    """
    if slots.numel() != torch.unique(slots).numel():
        raise ValueError("step_tadn: slots must be distinct (one run per user per call)")
    if state_pool.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"step_tadn: the state pool must be fp32 or fp64, got {state_pool.dtype}")
    real = run_mask(lengths, k.shape[1])[..., None].to(beta.dtype)  # [U, M, 1]
    # Padded positions become identity steps: nothing written, erased or decayed.
    o, final = naive_tadn(
        q, k, v, beta * real, erase * real, log_decay * real, initial_state=state_pool[slots]
    )
    state_pool[slots] = final.to(state_pool.dtype)
    return o * real[..., None].to(o.dtype)
