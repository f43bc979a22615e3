"""The chunked TADN form (`chunked.chunk_tadn`) as Triton kernels, forward and backward.

Design: one program per (batch, head) keeps the state S [K, V] on chip and walks the chunks
in order; within a chunk everything is matrix products over the C tokens (the WY form of
`chunked.py`): the unit lower-triangular system (I + A) U = beta V - diag(erase beta gamma) K S_0
is solved with an explicit inverse built by forward substitution, then

    o   = diag(gamma) Q S_0 + (Q K^T * D) U
    S_C = gamma_C S_0 + (diag(gamma_C / gamma) K)^T U

The forward stores the state at the start of every chunk ([B, H, N, K, V], as fla's `h`);
the backward walks the chunks in reverse, recomputes the chunk's terms from that state and
carries dL/dS back from chunk to chunk. Gradients reach q, k, v, beta, erase, log_decay and
the initial state. Arithmetic is fp32 (fp64 for fp64 inputs), with IEEE dot products (no TF32).

flash-linear-attention's gated delta rule splits the same algebra into several kernels
(cumsum, A = K K^T, triangular solve, state walk, outputs) so that chunks run in parallel
everywhere but the state walk; this single-walk design gives up that parallelism (B * H
programs) for one readable kernel per direction. Runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hytrec.kernels.chunked import no_tokens
from hytrec.kernels.reference import compute_dtype

# Fixed launch configuration: the interpreter cannot autotune over several configs. On a GPU,
# a `triton.autotune` over num_warps (4, 8) and num_stages (1, 2, 3), keyed on K, V and C,
# would go on both kernels.
NUM_WARPS = 4


@triton.jit
def _load_chunk(
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    b,
    h,
    n,
    T,
    H,
    K,
    V,
    C,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
):
    """Chunk n of sequence b, head h. Rows past the chunk or the sequence load as zeros, which
    is an identity step (beta = erase = log_decay = 0)."""
    rows = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    t = n * C + rows
    live = (rows < C) & (t < T)  # [BC]
    token = (b.to(tl.int64) * T + t) * H + h  # [BC] index into [B, T, H]
    mask_k = live[:, None] & (rk < K)[None, :]
    mask_v = live[:, None] & (rv < V)[None, :]
    q_c = tl.load(q + token[:, None] * K + rk[None, :], mask=mask_k, other=0.0).to(ACC)
    k_c = tl.load(k + token[:, None] * K + rk[None, :], mask=mask_k, other=0.0).to(ACC)
    v_c = tl.load(v + token[:, None] * V + rv[None, :], mask=mask_v, other=0.0).to(ACC)
    beta_c = tl.load(beta + token, mask=live, other=0.0).to(ACC)
    erase_c = tl.load(erase + token, mask=live, other=0.0).to(ACC)
    log_decay_c = tl.load(log_decay + token, mask=live, other=0.0).to(ACC)
    return token, live, mask_k, mask_v, q_c, k_c, v_c, beta_c, erase_c, log_decay_c


@triton.jit
def _chunk_terms(k_c, beta_c, erase_c, log_decay_c, BC: tl.constexpr):
    """What forward and backward both need from a chunk: log gamma, the decay ratios D,
    the erase strength, K K^T and (I + A)^-1."""
    rows = tl.arange(0, BC)
    causal = rows[:, None] >= rows[None, :]  # [BC, BC]
    g = tl.cumsum(log_decay_c, axis=0)  # [BC] log gamma
    # D[t, i] = gamma_t / gamma_i on the causal triangle, 0 above it; exp(-inf) keeps the
    # upper triangle from overflowing
    decay_ratio = tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
    erase_strength = erase_c * beta_c  # [BC]
    kk = tl.dot(k_c, tl.trans(k_c), input_precision="ieee")  # [BC, BC]
    a = tl.where(rows[:, None] > rows[None, :], erase_strength[:, None] * kk * decay_ratio, 0.0)
    # (I + A)^-1 by forward substitution: row i = e_i - sum_{j<i} A[i, j] row_j; rows j >= i
    # are still identity rows, and A[i, j] = 0 there, so one reduction per row suffices.
    inverse = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0).to(kk.dtype)  # [BC, BC]
    for i in range(1, BC):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), axis=0)  # [BC] row i of A
        row = tl.sum(a_i[:, None] * inverse, axis=0)  # [BC]
        inverse = tl.where(rows[:, None] == i, inverse - row[None, :], inverse)
    return g, decay_ratio, erase_strength, kk, inverse


@triton.jit
def _chunk_fwd_kernel(
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    initial_state,
    o,
    chunk_states,
    final_state,
    T,
    N,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    state_offsets = rk[:, None] * V + rv[None, :]  # [BK, BV]
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    bh = b.to(tl.int64) * H + h
    if HAS_INITIAL:
        state = tl.load(initial_state + bh * K * V + state_offsets, mask=state_mask, other=0.0)
        state = state.to(ACC)
    else:
        state = tl.zeros([BK, BV], dtype=ACC)
    for n in range(0, N):
        # the backward recomputes each chunk from the state it starts with
        tl.store(chunk_states + (bh * N + n) * K * V + state_offsets, state, mask=state_mask)
        token, _, _, mask_v, q_c, k_c, v_c, beta_c, erase_c, log_decay_c = _load_chunk(
            q, k, v, beta, erase, log_decay, b, h, n, T, H, K, V, C, BC, BK, BV, ACC
        )
        g, decay_ratio, erase_strength, _, inverse = _chunk_terms(
            k_c, beta_c, erase_c, log_decay_c, BC
        )
        gamma = tl.exp(g)  # [BC]
        k_state = tl.dot(k_c, state, input_precision="ieee")  # [BC, BV]
        rhs = beta_c[:, None] * v_c - (erase_strength * gamma)[:, None] * k_state
        u = tl.dot(inverse, rhs, input_precision="ieee")  # [BC, BV] pseudo-values
        qk = tl.dot(q_c, tl.trans(k_c), input_precision="ieee") * decay_ratio  # [BC, BC]
        o_c = gamma[:, None] * tl.dot(q_c, state, input_precision="ieee")
        o_c += tl.dot(qk, u, input_precision="ieee")
        tl.store(o + token[:, None] * V + rv[None, :], o_c.to(o.dtype.element_ty), mask=mask_v)
        g_last = tl.sum(log_decay_c, axis=0)  # padded rows add 0: log gamma of the last token
        decay_to_end = tl.exp(g_last - g)  # [BC] gamma_C / gamma_i
        k_to_end = k_c * decay_to_end[:, None]
        state = tl.exp(g_last) * state + tl.dot(tl.trans(k_to_end), u, input_precision="ieee")
    tl.store(final_state + bh * K * V + state_offsets, state, mask=state_mask)


@triton.jit
def _chunk_bwd_kernel(
    q,
    k,
    v,
    beta,
    erase,
    log_decay,
    chunk_states,
    do,
    d_final_state,
    dq,
    dk,
    dv,
    dbeta,
    derase,
    dlog_decay,
    d_initial_state,
    T,
    N,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    causal = rows[:, None] >= rows[None, :]  # [BC, BC]
    state_offsets = rk[:, None] * V + rv[None, :]  # [BK, BV]
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    bh = b.to(tl.int64) * H + h
    # dL/dS at the end of the current chunk, carried backwards
    d_state = tl.load(d_final_state + bh * K * V + state_offsets, mask=state_mask, other=0.0)
    d_state = d_state.to(ACC)
    for step in range(0, N):
        n = N - 1 - step
        state = tl.load(chunk_states + (bh * N + n) * K * V + state_offsets, mask=state_mask)
        state = state.to(ACC)  # [BK, BV] S_0 of this chunk
        token, live, mask_k, mask_v, q_c, k_c, v_c, beta_c, erase_c, log_decay_c = _load_chunk(
            q, k, v, beta, erase, log_decay, b, h, n, T, H, K, V, C, BC, BK, BV, ACC
        )
        do_c = tl.load(do + token[:, None] * V + rv[None, :], mask=mask_v, other=0.0).to(ACC)

        # recompute the forward's chunk terms
        g, decay_ratio, erase_strength, kk, inverse = _chunk_terms(
            k_c, beta_c, erase_c, log_decay_c, BC
        )
        gamma = tl.exp(g)  # [BC]
        state_weight = erase_strength * gamma  # [BC] weight of K S_0 in the right-hand side
        k_state = tl.dot(k_c, state, input_precision="ieee")  # [BC, BV]
        rhs = beta_c[:, None] * v_c - state_weight[:, None] * k_state
        u = tl.dot(inverse, rhs, input_precision="ieee")  # [BC, BV]
        qk_raw = tl.dot(q_c, tl.trans(k_c), input_precision="ieee")  # [BC, BC]
        qk = qk_raw * decay_ratio
        g_last = tl.sum(log_decay_c, axis=0)
        decay_to_end = tl.exp(g_last - g)  # [BC]

        # o = diag(gamma) Q S_0 + qk U  and  S_C = gamma_C S_0 + (diag(decay_to_end) K)^T U
        du = tl.dot(tl.trans(qk), do_c, input_precision="ieee")
        du += tl.dot(k_c * decay_to_end[:, None], d_state, input_precision="ieee")  # [BC, BV]
        d_qk = tl.where(causal, tl.dot(do_c, tl.trans(u), input_precision="ieee"), 0.0)
        d_qk_raw = d_qk * decay_ratio  # [BC, BC]
        dq_c = gamma[:, None] * tl.dot(do_c, tl.trans(state), input_precision="ieee")
        dq_c += tl.dot(d_qk_raw, k_c, input_precision="ieee")  # [BC, BK]
        u_d_state = tl.dot(u, tl.trans(d_state), input_precision="ieee")  # [BC, BK]
        dk_c = tl.dot(tl.trans(d_qk_raw), q_c, input_precision="ieee")
        dk_c += decay_to_end[:, None] * u_d_state
        d_decay_to_end = tl.sum(k_c * u_d_state, axis=1)  # [BC]
        q_state = tl.dot(q_c, state, input_precision="ieee")  # [BC, BV]
        d_gamma = tl.sum(do_c * q_state, axis=1)  # [BC]

        # U = (I + A)^-1 rhs
        d_rhs = tl.dot(tl.trans(inverse), du, input_precision="ieee")  # [BC, BV]
        d_a = -tl.dot(d_rhs, tl.trans(u), input_precision="ieee")
        d_a = tl.where(rows[:, None] > rows[None, :], d_a, 0.0)  # [BC, BC] strict lower
        # rhs = diag(beta) V - diag(state_weight) K S_0
        dv_c = beta_c[:, None] * d_rhs
        dbeta_c = tl.sum(d_rhs * v_c, axis=1)
        d_state_weight = -tl.sum(d_rhs * k_state, axis=1)  # [BC]
        dk_c -= state_weight[:, None] * tl.dot(d_rhs, tl.trans(state), input_precision="ieee")
        # A = diag(erase_strength) (K K^T * D), strictly lower
        d_a_decay = d_a * decay_ratio
        d_erase_strength = tl.sum(d_a_decay * kk, axis=1) + d_state_weight * gamma  # [BC]
        d_kk = d_a_decay * erase_strength[:, None]
        dk_c += tl.dot(d_kk, k_c, input_precision="ieee")
        dk_c += tl.dot(tl.trans(d_kk), k_c, input_precision="ieee")

        # log gamma: D[t, i] = exp(g_t - g_i), gamma = exp(g), decay_to_end = exp(g_last - g)
        d_log_ratio = (d_a * erase_strength[:, None] * kk + d_qk * qk_raw) * decay_ratio
        dg = tl.sum(d_log_ratio, axis=1) - tl.sum(d_log_ratio, axis=0)
        dg += (d_gamma + d_state_weight * erase_strength) * gamma
        dg -= d_decay_to_end * decay_to_end  # [BC]
        d_g_last = tl.sum(d_decay_to_end * decay_to_end, axis=0)
        d_g_last += tl.sum(tl.sum(state * d_state, axis=1), axis=0) * tl.exp(g_last)
        # g = cumsum(log_decay) and g_last = sum(log_decay): suffix sums of dg
        dlog_decay_c = tl.sum(dg, axis=0) - tl.cumsum(dg, axis=0) + dg + d_g_last

        tl.store(dq + token[:, None] * K + rk[None, :], dq_c.to(dq.dtype.element_ty), mask=mask_k)
        tl.store(dk + token[:, None] * K + rk[None, :], dk_c.to(dk.dtype.element_ty), mask=mask_k)
        tl.store(dv + token[:, None] * V + rv[None, :], dv_c.to(dv.dtype.element_ty), mask=mask_v)
        dbeta_c += d_erase_strength * erase_c
        tl.store(dbeta + token, dbeta_c.to(dbeta.dtype.element_ty), mask=live)
        derase_c = d_erase_strength * beta_c
        tl.store(derase + token, derase_c.to(derase.dtype.element_ty), mask=live)
        dlog_decay_c = dlog_decay_c.to(dlog_decay.dtype.element_ty)
        tl.store(dlog_decay + token, dlog_decay_c, mask=live)

        # dL/dS_0 of this chunk = dL/dS at the end of the previous one
        d_state = tl.exp(g_last) * d_state
        d_state += tl.dot(tl.trans(q_c * gamma[:, None]), do_c, input_precision="ieee")
        d_state -= tl.dot(tl.trans(k_c * state_weight[:, None]), d_rhs, input_precision="ieee")
    if HAS_INITIAL:
        tl.store(d_initial_state + bh * K * V + state_offsets, d_state, mask=state_mask)


def _launch_config(k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> dict:
    """Block sizes: powers of two, at least 16 (the smallest tl.dot tile); the accumulator."""
    K, V = k.shape[-1], v.shape[-1]
    return dict(
        H=k.shape[2],
        K=K,
        V=V,
        C=chunk_size,
        BC=max(16, triton.next_power_of_2(chunk_size)),
        BK=max(16, triton.next_power_of_2(K)),
        BV=max(16, triton.next_power_of_2(V)),
        ACC=tl.float64 if compute_dtype(v.dtype) == torch.float64 else tl.float32,
        num_warps=NUM_WARPS,
    )


class _TritonChunkTADN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, erase, log_decay, initial_state, chunk_size):
        B, T, H, K = k.shape
        V = v.shape[-1]
        N = triton.cdiv(T, chunk_size)
        state_dtype = compute_dtype(v.dtype)
        q, k, v, beta, erase, log_decay = (
            x.contiguous() for x in (q, k, v, beta, erase, log_decay)
        )
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        config = _launch_config(k, v, chunk_size)
        o = torch.empty_like(v)  # [B, T, H, V]
        chunk_states = torch.empty(B, H, N, K, V, dtype=state_dtype, device=v.device)
        final_state = torch.empty(B, H, K, V, dtype=state_dtype, device=v.device)
        _chunk_fwd_kernel[(B, H)](
            q,
            k,
            v,
            beta,
            erase,
            log_decay,
            initial_state,
            o,
            chunk_states,
            final_state,
            T,
            N,
            HAS_INITIAL=initial_state is not None,
            **config,
        )
        ctx.save_for_backward(q, k, v, beta, erase, log_decay, initial_state, chunk_states)
        ctx.chunk_size = chunk_size
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, beta, erase, log_decay, initial_state, chunk_states = ctx.saved_tensors
        B, T, H, _ = k.shape
        N = chunk_states.shape[2]
        grads = [torch.empty_like(x) for x in (q, k, v, beta, erase, log_decay)]
        d_initial_state = None if initial_state is None else torch.empty_like(initial_state)
        _chunk_bwd_kernel[(B, H)](
            q,
            k,
            v,
            beta,
            erase,
            log_decay,
            chunk_states,
            do.contiguous(),
            d_final_state.contiguous(),
            *grads,
            d_initial_state,
            T,
            N,
            HAS_INITIAL=initial_state is not None,
            **_launch_config(k, v, ctx.chunk_size),
        )
        return *grads, d_initial_state, None


def triton_chunk_tadn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    erase: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `chunked.chunk_tadn`, differentiable in every input."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if k.shape[1] == 0:
        return no_tokens(k, v, initial_state)
    return _TritonChunkTADN.apply(q, k, v, beta, erase, log_decay, initial_state, chunk_size)
