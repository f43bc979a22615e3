"""The TADN recurrence in parallel over time (chunked WY form), for training.

Within a chunk of C tokens starting from state S_0, write the cumulative decay
gamma_t = exp(sum_{s<=t} log_decay_s) and S_t = a_t S_{t-1} + k_t u_t^T. Unrolling the
recurrence of `reference.naive_tadn` gives, for the "pseudo-values" u_t,

    u_t + sum_{i<t} erase_t beta_t (gamma_t / gamma_i) (k_t . k_i) u_i
        = beta_t v_t - erase_t beta_t gamma_t S_0^T k_t

a unit lower-triangular system (I + A) U = beta V - diag(erase beta gamma) K S_0 solved for
every chunk at once. Then, with D_ti = gamma_t / gamma_i for i <= t,

    o_t  = gamma_t S_0^T q_t + sum_{i<=t} D_ti (q_t . k_i) u_i
    S_C  = gamma_C S_0 + sum_i (gamma_C / gamma_i) k_i u_i^T

Only the last two lines run chunk after chunk. Everything is differentiable by autograd.
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
        x = x.to(dtype)
        if x.dim() == 3:
            x = F.pad(x, (0, 0, 0, pad))
            return x.view(B, N, C, H).permute(0, 3, 1, 2)
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)  # [B, H, N, C, K|V]
    beta, erase, log_decay = to_chunks(beta), to_chunks(erase), to_chunks(log_decay)  # [B,H,N,C]

    g = log_decay.cumsum(-1)  # [B, H, N, C] log gamma within each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    strict = causal.tril(-1)
    # [B, H, N, C, C]: D[t, i] = gamma_t / gamma_i on the causal triangle, 0 above it
    decay_ratio = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    erase_strength = erase * beta  # [B, H, N, C]
    kk = k @ k.transpose(-1, -2)  # [B, H, N, C, C]
    A = (erase_strength[..., None] * kk * decay_ratio).masked_fill(~strict, 0.0)
    I_plus_A = A + torch.eye(C, dtype=dtype, device=k.device)
    u_from_values = torch.linalg.solve_triangular(
        I_plus_A, beta[..., None] * v, upper=False, unitriangular=True
    )  # [B, H, N, C, V]
    u_from_state = torch.linalg.solve_triangular(
        I_plus_A, (erase_strength * g.exp())[..., None] * k, upper=False, unitriangular=True
    )  # [B, H, N, C, K]; u = u_from_values - u_from_state @ S_0
    qk = (q @ k.transpose(-1, -2)) * decay_ratio  # [B, H, N, C, C]
    gamma = g.exp()[..., None]  # [B, H, N, C, 1]
    decay_to_end = (g[..., -1:] - g).exp()[..., None]  # [B, H, N, C, 1] gamma_C / gamma_i

    state = (
        q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    )  # [B, H, K, V]
    outputs = []
    for n in range(N):
        u = u_from_values[:, :, n] - u_from_state[:, :, n] @ state  # [B, H, C, V]
        outputs.append(gamma[:, :, n] * (q[:, :, n] @ state) + qk[:, :, n] @ u)
        state = (
            g[:, :, n, -1].exp()[..., None, None] * state
            + (k[:, :, n] * decay_to_end[:, :, n]).transpose(-1, -2) @ u
        )
    o = torch.stack(outputs, dim=2)  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]  # [B, T, H, V]
    return o.to(out_dtype), state
