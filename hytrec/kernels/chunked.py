"""The TADN recurrence in parallel over time (chunked WY form), for training.

Within a chunk of C tokens starting from state S_0, write the cumulative decay
gamma_t = exp(sum_{s<=t} log_decay_s) and S_t = a_t S_{t-1} + k_t u_t^T. Unrolling the
recurrence of `reference.naive_tadn` gives, for the "pseudo-values" u_t,

    u_t + sum_{i<t} erase_t beta_t (gamma_t / gamma_i) (k_t . k_i) u_i
        = beta_t v_t - erase_t beta_t gamma_t S_0^T k_t

a unit lower-triangular system (I + A) [U | W] = [beta V | diag(erase beta gamma) K], solved
for every chunk at once, with u = U - W S_0. Then, with D_ti = gamma_t / gamma_i for i <= t,

    o_t  = gamma_t S_0^T q_t + sum_{i<=t} D_ti (q_t . k_i) u_i
    S_C  = gamma_C S_0 + sum_i (gamma_C / gamma_i) k_i u_i^T

Substituting u, both are linear in S_0 with matrices known for every chunk in advance:

    S_C = (gamma_C I - Kc^T W) S_0 + Kc^T U          Kc_i = (gamma_C / gamma_i) k_i
    O   = (gamma Q - (Q K^T * D) W) S_0 + (Q K^T * D) U

so the only sequential part is S_{n+1} = M_n S_n + R_n, one batched matrix product per
chunk; everything else runs over all chunks at once. The read-outs are taken as
o = gamma Q S_0 + (Q K^T * D)(U - W S_0): a [C, K] by [K, V] product per chunk instead of
[C, C] by [C, K]. Everything but the triangular solve (`UnitLowerSolve`, its own
backward) is differentiable by autograd, and the loop reads its inputs through `unbind` (the
gradient of a slice `x[:, :, n]` would be a zero tensor of x's full size per chunk:
quadratic in the chunks).
Decay ratios are formed as exp(g_t - g_i) on the causal triangle only, so they never overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hytrec.kernels.reference import compute_dtype


def no_tokens(
    k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for sequences of no tokens: no read-outs, the initial (or zero) state."""
    B, _, H, K = k.shape
    V = v.shape[-1]
    dtype = compute_dtype(v.dtype)
    state = v.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state
    return v.new_zeros(B, 0, H, V), state.to(dtype)


class UnitLowerSolve(torch.autograd.Function):
    """X = (I + A)^-1 rhs for A's strictly lower triangle, every system of a batch at once.

    autograd's `solve_triangular` solves again (with A^T) in the backward pass; on CPU each
    solve is a LAPACK call and a copy per small system. When a gradient is needed this
    forms the inverse once, so the forward is a product and the backward is two:
    d rhs = T^T dX and dA = -strict_lower(d rhs X^T), T = (I + A)^-1.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        if not any(ctx.needs_input_grad):
            return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        X = inverse @ rhs
        ctx.save_for_backward(inverse, X)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inverse, X = ctx.saved_tensors
        d_rhs = inverse.transpose(-1, -2) @ dX
        return -(d_rhs @ X.transpose(-1, -2)).tril(-1), d_rhs


def chunk_tadn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    erase: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `naive_tadn` (shapes [B, T, H, K|V], gates [B, T, H])."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K = k.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    if T == 0:
        return no_tokens(k, v, initial_state)
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, ...] -> [B, H, N, C, ...]; zero padding is an identity step
        # (beta = erase = 0, log_decay = 0), so the final state is unaffected.
        x = x.to(dtype).transpose(1, 2)  # [B, H, T, ...]
        if x.dim() == 3:
            return F.pad(x, (0, pad)).reshape(B, H, N, C)
        return F.pad(x, (0, 0, 0, pad)).reshape(B, H, N, C, -1)

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)  # [B, H, N, C, K|V]
    beta, erase, log_decay = to_chunks(beta), to_chunks(erase), to_chunks(log_decay)  # [B,H,N,C]
    g = log_decay.cumsum(-1)  # [B, H, N, C] log gamma within each chunk
    # [B, H, N, C, C]: D[t, i] = gamma_t / gamma_i on the causal triangle, 0 above it. Above
    # it the exponent is zeroed first: exp(-inf) (or of anything that underflows) takes a
    # slow path on CPU, ~100x slower, and exp of a large positive exponent would make
    # inf * 0 = nan in the backward pass.
    causal = torch.ones(C, C, dtype=dtype, device=k.device).tril()
    decay_ratio = ((g[..., :, None] - g[..., None, :]) * causal).exp() * causal
    gamma = g.exp()  # [B, H, N, C]

    erase_k = (erase * beta)[..., None] * k  # [B, H, N, C, K]: row t scaled by erase_t beta_t
    # I + A: the solve reads only the strictly lower triangle of A (unitriangular), and D is
    # zero above the diagonal, so neither a tril nor the identity is ever formed
    A = (erase_k @ k.transpose(-1, -2)) * decay_ratio  # [B, H, N, C, C]
    rhs = torch.cat([beta[..., None] * v, gamma[..., None] * erase_k], dim=-1)
    UW = UnitLowerSolve.apply(A, rhs)
    U, W = UW.split([V, K], dim=-1)  # [B, H, N, C, V], [B, H, N, C, K]; u = U - W S_0
    qk = (q @ k.transpose(-1, -2)) * decay_ratio  # [B, H, N, C, C]

    # every chunk's state update S_{n+1} = M_n S_n + R_n, all chunks at once
    k_to_end_T = (k * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2)  # [B, H, N, K, C]
    gamma_end = gamma[..., -1, None, None]  # [B, H, N, 1, 1]
    M = gamma_end * torch.eye(K, dtype=dtype, device=k.device) - k_to_end_T @ W  # [B,H,N,K,K]
    R = k_to_end_T @ U  # [B, H, N, K, V]

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    states = []  # the state before each chunk, [B, H, K, V] each
    for M_n, R_n in zip(M.unbind(2), R.unbind(2), strict=True):
        states.append(state)
        state = torch.baddbmm(R_n.flatten(0, 1), M_n.flatten(0, 1), state.flatten(0, 1))
        state = state.view(B, H, K, V)
    S = torch.stack(states, dim=2)  # [B, H, N, K, V]

    # read-outs of every chunk from the state before it: gamma Q S_n + qk (U - W S_n)
    o = (gamma[..., None] * q) @ S + qk @ (U - W @ S)  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]  # [B, T, H, V]
    return o.to(out_dtype), state
