"""The Triton chunked TADN form against the per-step reference: outputs, final state and the
gradient of every input.

On a GPU machine it runs on CUDA; elsewhere in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest) at small sizes. bf16 runs interpreted too: the kernels convert bf16 to fp32 on
load and back on store, so the interpreter's bf16 arithmetic bug is never reached. The larger
sizes need a GPU (the interpreter is slow).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_tadn import assert_within_fp32_tolerance, make_inputs, outputs_and_grads

if importlib.util.find_spec("triton") is None:
    pytest.skip(
        "triton is not installed (it comes with the dev and gpu extras)", allow_module_level=True
    )

from hytrec.kernels import _PARALLEL, _STEP, Backend, _pick, naive_tadn, tadn_parallel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (large sizes are too slow interpreted)",
)


def triton_outputs_and_grads(inputs, dtype, chunk_size):
    x = {n: None if t is None else t.to(DEVICE, dtype) for n, t in inputs.items()}
    o, s, grads = outputs_and_grads(tadn_parallel, x, chunk_size=chunk_size, backend="triton")
    return o.cpu(), s.cpu(), {n: t.cpu() for n, t in grads.items()}


# chunk size 24 is not a power of two: its chunks fill only part of a 32-row tile
@pytest.mark.parametrize("T", [1, 7, 33, 64])
@pytest.mark.parametrize("chunk_size", [16, 24])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_triton_chunked_matches_reference_fp32(T, chunk_size, with_state):
    inputs = make_inputs(2, T, 2, 16, 12, torch.float64, seed=T, with_state=with_state)
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, inputs)
    o, s, grads = triton_outputs_and_grads(inputs, torch.float32, chunk_size)
    assert o.dtype == s.dtype == torch.float32
    assert set(grads) == set(ref_g)
    assert_within_fp32_tolerance("o", o, ref_o)
    assert_within_fp32_tolerance("final state", s, ref_s)
    for name, ref in ref_g.items():
        assert_within_fp32_tolerance(f"grad of {name}", grads[name], ref)


@pytest.mark.parametrize("T", [7, 64])
def test_triton_chunked_matches_reference_fp64_exactly(T):
    """fp64 inputs compute in fp64: the algebra of forward and backward, without rounding."""
    inputs = make_inputs(2, T, 2, 8, 8, torch.float64, seed=100 + T)
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, inputs)
    o, s, grads = triton_outputs_and_grads(inputs, torch.float64, chunk_size=16)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-12)
    for name in ref_g:
        torch.testing.assert_close(grads[name], ref_g[name], rtol=0, atol=1e-11)


def test_triton_chunked_zero_length():
    inputs = make_inputs(1, 0, 2, 4, 4, torch.float32, seed=3)
    o, s = tadn_parallel(**inputs, backend=Backend.TRITON)
    assert o.shape == (1, 0, 2, 4)
    torch.testing.assert_close(s, inputs["initial_state"])


def test_auto_backend_keeps_the_torch_form_until_the_kernel_is_verified_on_a_gpu():
    for device in ("cpu", "cuda"):  # _pick only reads the device type: no GPU needed
        chosen = _pick(_PARALLEL, Backend.AUTO, "parallel", torch.device(device), False)
        assert chosen is _PARALLEL[Backend.TORCH]
    assert _pick(_STEP, Backend.AUTO, "step", torch.device("cuda")) is _STEP[Backend.TRITON]


@needs_cuda
@pytest.mark.parametrize("T", [200, 500])
def test_triton_chunked_matches_reference_fp32_large_on_gpu(T):
    inputs = make_inputs(2, T, 4, 64, 64, torch.float64, seed=T)
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, {n: t.cuda() for n, t in inputs.items()})
    o, s, grads = triton_outputs_and_grads(inputs, torch.float32, chunk_size=64)
    assert_within_fp32_tolerance("o", o, ref_o.cpu())
    assert_within_fp32_tolerance("final state", s, ref_s.cpu())
    for name, ref in ref_g.items():
        assert_within_fp32_tolerance(f"grad of {name}", grads[name], ref.cpu())


def test_triton_chunked_bf16_within_stated_tolerance():
    """bf16 inputs, fp32 arithmetic and state: only input/output rounding shows.
    Stated tolerance: 2e-2 of the largest reference value for outputs and gradients (bf16
    has an 8-bit mantissa), 1e-5 for the fp32 final state, against the fp64 reference run on
    the same bf16-rounded inputs."""
    inputs = make_inputs(2, 150, 2, 16, 16, torch.float64, seed=7)
    rounded = {n: t.bfloat16().double() for n, t in inputs.items()}
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, rounded)
    o, s, grads = triton_outputs_and_grads(inputs, torch.bfloat16, chunk_size=32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_within_fp32_tolerance("final state", s, ref_s)
    assert_within_fp32_tolerance("o", o, ref_o, tol=2e-2)
    for name, ref in ref_g.items():
        assert grads[name].dtype == torch.bfloat16
        assert_within_fp32_tolerance(f"grad of {name}", grads[name], ref, tol=2e-2)
