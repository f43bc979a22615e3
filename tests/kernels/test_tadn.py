"""Every fast TADN form against the per-step reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hytrec.kernels import Backend, chunk_tadn, naive_tadn, tadn_parallel, tadn_step
from hytrec.kernels.chunked import UnitLowerSolve
from hytrec.kernels.step import CHUNKED_FROM, MAX_CHUNK


def make_inputs(B, T, H, K, V, dtype, seed, with_state=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    tensors = dict(
        q=randn(B, T, H, K),
        k=F.normalize(randn(B, T, H, K), dim=-1),  # the model L2-normalises keys
        v=randn(B, T, H, V),
        beta=rand(B, T, H),
        erase=rand(B, T, H),
        # mostly mild decays with a few large time gaps, as real event logs have
        log_decay=-(rand(B, T, H) * 0.3 + (rand(B, T, H) > 0.97) * 8.0),
        initial_state=randn(B, H, K, V) if with_state else None,
    )
    return {n: (None if t is None else t.to(dtype)) for n, t in tensors.items()}


def leaves(inputs):
    return {n: t.clone().requires_grad_(True) for n, t in inputs.items() if t is not None}


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    x = leaves(inputs)
    o, state = fn(**x, **kwargs)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.dtype)
    ((o * do).sum() + (state * ds).sum()).backward()
    return o.detach(), state.detach(), {n: t.grad for n, t in x.items()}


def assert_within_fp32_tolerance(what, value, reference, tol=1e-5):
    """|value - reference| <= 1e-5, scaled by the reference's magnitude where it exceeds 1
    (fp32 carries ~7 significant digits, so gradients of size 30 cannot match to 1e-5)."""
    err = (value.double() - reference).abs().max().item()
    bound = tol * max(1.0, reference.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("T", [1, 2, 15, 63, 64, 65, 127, 200, 299])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_chunked_matches_reference_fp32(T, chunk_size, with_state):
    inputs = make_inputs(2, T, 2, 16, 12, torch.float64, seed=T, with_state=with_state)
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, inputs)
    fp32 = {n: None if t is None else t.float() for n, t in inputs.items()}
    o, s, grads = outputs_and_grads(chunk_tadn, fp32, chunk_size=chunk_size)
    assert_within_fp32_tolerance("o", o, ref_o)
    assert_within_fp32_tolerance("final state", s, ref_s)
    for name, ref in ref_g.items():
        assert_within_fp32_tolerance(f"grad of {name}", grads[name], ref)


@pytest.mark.parametrize("T", [1, 33, 100])
def test_chunked_matches_reference_fp64_exactly(T):
    inputs = make_inputs(3, T, 2, 8, 8, torch.float64, seed=100 + T)
    ref_o, ref_s, ref_g = outputs_and_grads(naive_tadn, inputs)
    o, s, grads = outputs_and_grads(chunk_tadn, inputs, chunk_size=16)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-12)
    for name in ref_g:
        torch.testing.assert_close(grads[name], ref_g[name], rtol=0, atol=1e-11)


def test_the_unit_lower_solve_and_its_backward_match_the_triangular_solve():
    """The chunked form's solve (the inverse kept for two products in the backward) against
    autograd through `solve_triangular`, float64: value, both gradients (A's only on its
    strictly lower triangle, the part the solve reads), and the no-gradient path."""
    g = torch.Generator().manual_seed(21)
    A = torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64) * 0.3
    rhs = torch.randn(3, 2, 16, 9, generator=g, dtype=torch.float64)
    d_out = torch.randn(3, 2, 16, 9, generator=g, dtype=torch.float64)
    grads = []
    for solve in (
        lambda a, r: torch.linalg.solve_triangular(a, r, upper=False, unitriangular=True),
        UnitLowerSolve.apply,
    ):
        a, r = A.clone().requires_grad_(True), rhs.clone().requires_grad_(True)
        out = solve(a, r)
        grads.append((out.detach(), *torch.autograd.grad((out * d_out).sum(), (a, r))))
    (expected, dA_expected, drhs_expected), (out, dA, drhs) = grads
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(drhs, drhs_expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(dA, dA_expected.tril(-1), rtol=0, atol=1e-12)
    assert dA.triu().abs().max() == 0
    torch.testing.assert_close(UnitLowerSolve.apply(A, rhs), expected, rtol=0, atol=1e-12)


def test_bf16_inputs_stay_within_stated_tolerance():
    """bf16 inputs: the state is kept in fp32, so only input/output rounding shows.
    Stated tolerance: 2e-2 relative to the largest output (bf16 has an 8-bit mantissa)."""
    inputs = make_inputs(2, 150, 2, 16, 16, torch.float64, seed=7)
    bf16 = {n: None if t is None else t.bfloat16() for n, t in inputs.items()}
    ref_o, ref_s = naive_tadn(**{n: None if t is None else t.double() for n, t in bf16.items()})
    o, s = chunk_tadn(**bf16, chunk_size=32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    scale = ref_o.abs().max()
    assert (o.double() - ref_o).abs().max() <= 2e-2 * scale
    assert (s.double() - ref_s).abs().max() <= 1e-5 * ref_s.abs().max()


def test_zero_length_and_identity_steps():
    inputs = make_inputs(1, 0, 2, 4, 4, torch.float32, seed=3)
    o, s = chunk_tadn(**inputs)
    assert o.shape == (1, 0, 2, 4)
    torch.testing.assert_close(s, inputs["initial_state"])
    # beta = erase = log_decay = 0 leaves the state untouched
    inputs = make_inputs(1, 5, 2, 4, 4, torch.float64, seed=4)
    for name in ("beta", "erase", "log_decay"):
        inputs[name] = torch.zeros_like(inputs[name])
    _, s = chunk_tadn(**inputs, chunk_size=2)
    torch.testing.assert_close(s, inputs["initial_state"])


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_no_tokens_give_no_read_outs_and_the_state_unchanged(dtype, with_state):
    """T = 0 in the oracle and the chunked form: read-outs [B, 0, H, V] in the inputs' dtype,
    and the user's state (zeros for a new one) in the compute dtype."""
    x = make_inputs(2, 0, 3, 4, 5, dtype, seed=11, with_state=with_state)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = torch.zeros(2, 3, 4, 5, dtype=compute)
    expected = x["initial_state"].to(compute) if with_state else zeros
    for form in (naive_tadn, chunk_tadn):
        o, state = form(**x)
        assert o.shape == (2, 0, 3, 5) and o.dtype == dtype, form.__name__
        assert state.dtype == compute, form.__name__
        torch.testing.assert_close(state, expected, rtol=0, atol=0)


def test_the_oracle_computes_bf16_inputs_in_fp32():
    x = make_inputs(2, 7, 2, 4, 4, torch.bfloat16, seed=12)
    o, state = naive_tadn(**x)
    o32, state32 = naive_tadn(**{n: t.float() for n, t in x.items()})
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(state, state32, rtol=0, atol=0)
    torch.testing.assert_close(o, o32.to(torch.bfloat16), rtol=0, atol=0)


def test_chunks_of_one_are_the_token_loop_and_zero_is_refused():
    x = make_inputs(2, 5, 1, 4, 4, torch.float64, seed=13)
    o, state = chunk_tadn(**x, chunk_size=1)
    ref_o, ref_state = naive_tadn(**x)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(state, ref_state)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunk_tadn(**x, chunk_size=0)


def test_dispatch_selects_torch_and_rejects_unknown_backend():
    inputs = make_inputs(1, 9, 1, 4, 4, torch.float64, seed=5)
    o, _ = tadn_parallel(**inputs, chunk_size=4, backend=Backend.TORCH)
    torch.testing.assert_close(o, naive_tadn(**inputs)[0])
    auto, _ = tadn_parallel(**inputs, chunk_size=4)  # AUTO on CPU tensors: the PyTorch form
    torch.testing.assert_close(auto, o, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cuda-magic"):
        tadn_parallel(**inputs, backend="cuda-magic")


@pytest.mark.parametrize("seed", range(4))
def test_step_matches_reference_for_random_interleavings(seed):
    """Users' events interleave at random and arrive in micro-batches of random size;
    each user's read-outs and final state must equal the reference over its own events."""
    g = torch.Generator().manual_seed(seed)
    num_users, H, K, V = 7, 2, 8, 6
    lengths = torch.randint(1, 40, (num_users,), generator=g)
    per_user = [
        make_inputs(1, int(n), H, K, V, torch.float64, seed=seed * 100 + u)
        for u, n in enumerate(lengths)
    ]
    order = torch.cat([torch.full((int(n),), u) for u, n in enumerate(lengths)])
    order = order[torch.randperm(len(order), generator=g)]  # global arrival order

    pool = torch.zeros(num_users + 3, H, K, V, dtype=torch.float64)
    slot_of = torch.randperm(num_users + 3, generator=g)[:num_users]
    for u, x in enumerate(per_user):
        pool[slot_of[u]] = x["initial_state"][0]
    outputs = [[] for _ in range(num_users)]
    cursor = [0] * num_users
    pos = 0
    names = ("q", "k", "v", "beta", "erase", "log_decay")
    while pos < len(order):
        size = int(torch.randint(1, 25, (1,), generator=g))
        batch = order[pos : pos + size].tolist()
        pos += size
        users = sorted(set(batch))
        runs = [batch.count(u) for u in users]
        M = max(runs)
        padded = {}
        for n in names:
            rows = []
            for u, m in zip(users, runs, strict=True):
                x = per_user[u][n][0, cursor[u] : cursor[u] + m]
                rows.append(F.pad(x, (0, 0) * (x.dim() - 1) + (0, M - m)))
            padded[n] = torch.stack(rows)
        o = tadn_step(pool, slot_of[users], torch.tensor(runs), **padded)
        for i, (u, m) in enumerate(zip(users, runs, strict=True)):
            outputs[u].append(o[i, :m])
            assert torch.all(o[i, m:] == 0)
            cursor[u] += m

    for u, x in enumerate(per_user):
        ref_o, ref_s = naive_tadn(**x)
        torch.testing.assert_close(torch.cat(outputs[u]), ref_o[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(pool[slot_of[u]], ref_s[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("longest", [CHUNKED_FROM - 1, CHUNKED_FROM, MAX_CHUNK, MAX_CHUNK + 5])
def test_step_of_long_runs_takes_the_chunked_form_and_matches_the_reference(longest, dtype, atol):
    """Runs from 1 event up to `longest` in one call: below CHUNKED_FROM the token loop,
    from it on the chunked form (over MAX_CHUNK in several chunks) must give the same
    read-outs and states, with the padded positions left as identity steps."""
    lengths = torch.tensor([longest, 1, max(1, longest // 2), 3])
    x = make_inputs(4, longest, 2, 8, 6, dtype, seed=longest)
    pool = torch.zeros(6, 2, 8, 6, dtype=dtype)
    slots = torch.tensor([4, 0, 5, 2])
    pool[slots] = x.pop("initial_state")
    initial = pool[slots].clone()
    o = tadn_step(pool, slots, lengths, **x)
    for u, n in enumerate(lengths.tolist()):
        ref_o, ref_s = naive_tadn(
            **{name: t[u : u + 1, :n] for name, t in x.items()}, initial_state=initial[u : u + 1]
        )
        torch.testing.assert_close(o[u, :n], ref_o[0], rtol=0, atol=atol)
        torch.testing.assert_close(pool[slots[u]], ref_s[0], rtol=0, atol=atol)
        assert torch.all(o[u, n:] == 0)


def test_step_refuses_duplicate_slots():
    x = make_inputs(2, 3, 1, 4, 4, torch.float32, seed=9)
    pool = torch.zeros(4, 1, 4, 4)
    x.pop("initial_state")
    with pytest.raises(ValueError, match="step_tadn: slots must be distinct"):
        tadn_step(pool, torch.tensor([1, 1]), torch.tensor([3, 3]), **x)
    with pytest.raises(TypeError, match="must be fp32 or fp64, got torch.float16"):
        tadn_step(pool.half(), torch.tensor([1, 2]), torch.tensor([3, 3]), **x)
