"""The batched streaming update: many users' runs of events applied to a pool of states.

A micro-batch holds, for U users, runs of 1..M events each (right-padded to M). Each user's
state lives in one slot of a pool; the step gathers the slots, applies every run in order,
writes the states back in place and returns the read-out of every event.
"""

from __future__ import annotations

import torch

from hytrec.kernels.chunked import chunk_tadn
from hytrec.kernels.reference import naive_tadn

# Runs this long or longer go through the chunked form: the token loop costs a few small
# tensor operations per position, the chunked form a fixed set-up plus C^2 work per chunk.
# On CPU (2 cores, U=59 users, 2 heads of 32) the loop wins below 8 positions, the chunked
# form is ~2x faster from 16 on (scratch timing behind `hytrec benchmark stream`'s figures).
CHUNKED_FROM = 8
MAX_CHUNK = 32


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
    if (  # a data-dependent check torch.compile cannot trace (the eager step keeps it)
        not torch.compiler.is_compiling()
        and slots.numel() > 1
        and slots.numel() != torch.unique(slots).numel()
    ):
        raise ValueError("step_tadn: slots must be distinct (one run per user per call)")
    if state_pool.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"step_tadn: the state pool must be fp32 or fp64, got {state_pool.dtype}")
    M = k.shape[1]
    if M == 1:  # one event per user: every run is full (runs are never empty), no padding
        o, final = _one_event(state_pool[slots], q, k, v, beta, erase, log_decay)
        state_pool[slots] = final
        return o
    real = run_mask(lengths, M)[..., None].to(beta.dtype)  # [U, M, 1]
    # Padded positions become identity steps: nothing written, erased or decayed.
    gates = (beta * real, erase * real, log_decay * real)
    if M < CHUNKED_FROM:
        o, final = naive_tadn(q, k, v, *gates, initial_state=state_pool[slots])
    else:
        chunks = -(-M // MAX_CHUNK)  # equal chunks: as little padding as possible
        o, final = chunk_tadn(
            q, k, v, *gates, initial_state=state_pool[slots], chunk_size=-(-M // chunks)
        )
    state_pool[slots] = final.to(state_pool.dtype)
    return o * real[..., None].to(o.dtype)


def _one_event(state, q, k, v, beta, erase, log_decay) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_tadn` of one event per row with the update folded into one rank-1 write (the
    serving step's common call, where every operator's fixed cost counts):

        S' = a S + k (beta v - erase beta k^T (a S)),  a = exp(log_decay),  o = S'^T q

    state [U, H, K, V] in the pool's dtype, the rest as `step_tadn` with M = 1; returns
    o [U, 1, H, V] and the new state."""
    dtype, out_dtype = state.dtype, v.dtype
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [U, H, 1, K|V]
    beta, erase, log_decay = (
        x.to(dtype).transpose(1, 2)[..., None] for x in (beta, erase, log_decay)
    )
    state = state * log_decay.exp()  # [U, H, K, V]
    write = beta * v - (erase * beta) * (k @ state)  # [U, H, 1, V]
    state = state + k.transpose(-1, -2) @ write  # the rank-1 write k write^T
    return (q @ state).transpose(1, 2).to(out_dtype), state
