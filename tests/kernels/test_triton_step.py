"""The Triton streaming step against the PyTorch step (itself tested against the reference).

On a GPU machine it runs on CUDA; elsewhere in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest), fp32 at small sizes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hytrec.bench.parity import kernel_inputs

if importlib.util.find_spec("triton") is None:
    pytest.skip(
        "triton is not installed (it comes with the dev and gpu extras)", allow_module_level=True
    )

from hytrec.kernels import Backend, tadn_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("K,V", [(32, 32), (16, 24), (5, 3)], ids=["32x32", "16x24", "5x3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_step_matches_torch_step(K, V, seed):
    g = torch.Generator().manual_seed(seed)
    U, M, H = 6, 9, 2
    x = kernel_inputs(U, M, H, K, V, g)
    x.pop("initial_state")
    x = {n: t.to(DEVICE) for n, t in x.items()}
    lengths = torch.randint(1, M + 1, (U,), generator=g).to(DEVICE)
    slots = torch.randperm(U + 4, generator=g)[:U].to(DEVICE)
    pool = torch.randn(U + 4, H, K, V, generator=g).to(DEVICE)
    pool_torch, pool_triton = pool.clone(), pool.clone()
    o_torch = tadn_step(pool_torch, slots, lengths, **x, backend=Backend.TORCH)
    o_triton = tadn_step(pool_triton, slots, lengths, **x, backend=Backend.TRITON)
    torch.testing.assert_close(o_triton, o_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_triton, pool_torch, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(U + 4, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(pool_triton[untouched], pool[untouched])


def test_triton_step_refuses_duplicate_slots():
    x = kernel_inputs(2, 3, 1, 4, 4, torch.Generator().manual_seed(0))
    x.pop("initial_state")
    x = {n: t.to(DEVICE) for n, t in x.items()}
    pool = torch.zeros(4, 1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="distinct"):
        tadn_step(
            pool,
            torch.tensor([1, 1], device=DEVICE),
            torch.tensor([3, 3], device=DEVICE),
            **x,
            backend=Backend.TRITON,
        )


def test_auto_backend_uses_torch_on_cpu_tensors():
    from hytrec.kernels import _STEP, _pick

    assert _pick(_STEP, Backend.AUTO, "step", torch.device("cpu")) is _STEP[Backend.TORCH]
    if torch.cuda.is_available():
        assert _pick(_STEP, Backend.AUTO, "step", torch.device("cuda")) is _STEP[Backend.TRITON]
