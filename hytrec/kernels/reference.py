"""The TADN recurrence, one step at a time in plain PyTorch: the oracle.

Per head, with the state S of shape [K, V] (keys by values, as flash-linear-attention):

    S_t = exp(log_decay_t) * (I - erase_t * beta_t * k_t k_t^T) S_{t-1} + beta_t * k_t v_t^T
    o_t = S_t^T q_t

`log_decay_t <= 0` is the whole-state decay of step t (0 = none), `erase_t` in [0, 1] scales
the delta rule's erase strength (the temporal gate g_t of HyTRec), `beta_t` in [0, 1] is the
write strength. With `erase == 1` this is exactly the gated delta rule (Yang et al., 2024).
The kernels know nothing of users or items: the model computes these inputs.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state and its arithmetic stay in fp32 (fp64 for fp64 inputs): bf16 drifts."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_tadn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    erase: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the recurrence token by token.

    Args:
        q, k: queries and keys of shape [B, T, H, K].
        v: values of shape [B, T, H, V].
        beta, erase, log_decay: per-token gates of shape [B, T, H].
        initial_state: [B, H, K, V] or None for zeros.

    Returns:
        o: read-outs of shape [B, T, H, V], in the dtype of `v`.
        final_state: [B, H, K, V], fp32 (fp64 for fp64 inputs).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    q, k, v, beta, erase, log_decay = (x.to(dtype) for x in (q, k, v, beta, erase, log_decay))
    if initial_state is None:
        state = q.new_zeros(B, H, K, V)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(T):
        k_t = k[:, t]  # [B, H, K]
        state = state * log_decay[:, t].exp()[..., None, None]
        k_state = torch.einsum("bhk,bhkv->bhv", k_t, state)  # [B, H, V]
        erase_t = (erase[:, t] * beta[:, t])[..., None, None]
        state = state - erase_t * k_t[..., :, None] * k_state[..., None, :]
        state = state + beta[:, t][..., None, None] * k_t[..., :, None] * v[:, t][..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V, dtype=dtype)
    return o.to(out_dtype), state
