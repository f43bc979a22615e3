"""The streaming step as one Triton kernel: each (user, head) program loads its state from
the pool once, applies the user's whole run of events, stores every read-out and writes the
state back once. Same contract as `step.step_tadn`.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests do that where
no GPU is present).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _step_kernel(
    pool,
    slots,
    lengths,
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    o,
    M,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    user = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots + user).to(tl.int64)
    n_events = tl.load(lengths + user)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    state_ptrs = pool + (slot * H + head) * K * V + rk[:, None] * V + rv[None, :]  # [BK, BV]
    state = tl.load(state_ptrs, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    for m in range(0, n_events):
        token = (user * M + m) * H + head
        k_t = tl.load(k + token * K + rk, mask=mk, other=0.0).to(tl.float32)
        q_t = tl.load(q + token * K + rk, mask=mk, other=0.0).to(tl.float32)
        v_t = tl.load(v + token * V + rv, mask=mv, other=0.0).to(tl.float32)
        b = tl.load(beta + token).to(tl.float32)
        e = tl.load(erase + token).to(tl.float32)
        state = state * tl.exp(tl.load(log_decay + token).to(tl.float32))
        k_state = tl.sum(k_t[:, None] * state, axis=0)  # [BV]
        # S <- S - e b k (k^T S) + b k v^T, as one rank-1 update
        state = state + k_t[:, None] * (b * v_t - e * b * k_state)[None, :]
        o_t = tl.sum(q_t[:, None] * state, axis=0)
        tl.store(o + token * V + rv, o_t.to(o.dtype.element_ty), mask=mv)
    tl.store(state_ptrs, state.to(pool.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def triton_step_tadn(state_pool, slots, lengths, q, k, v, beta, erase, log_decay):
    """See `step.step_tadn`: shapes [P, H, K, V], [U], [U], [U, M, H, K|V], [U, M, H]."""
    if slots.numel() != torch.unique(slots).numel():
        raise ValueError("triton_step_tadn: slots must be distinct (one run per user per call)")
    if not state_pool.is_contiguous():
        raise ValueError("triton_step_tadn: the state pool must be contiguous")
    U, M, H, K = k.shape
    V = v.shape[-1]
    q, k, v, beta, erase, log_decay = (x.contiguous() for x in (q, k, v, beta, erase, log_decay))
    o = torch.zeros(U, M, H, V, dtype=v.dtype, device=v.device)
    if U:
        _step_kernel[(U, H)](
            state_pool,
            slots.contiguous(),
            lengths.to(torch.int32).contiguous(),
            q,
            k,
            v,
            beta,
            erase,
            log_decay,
            o,
            M,
            H,
            K,
            V,
            triton.next_power_of_2(K),
            triton.next_power_of_2(V),
        )
    return o
