"""The compiled one-event step: the eager step's outputs and states for any user count and
pool size, runs of several events left to the eager step, and the eager step kept (with
the reason) when compiling fails or disagrees. Compiling takes about a minute here, so one
module-scoped compile serves every test that needs a real one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from hytrec.model import compiled_step as compiled_module
from hytrec.model.batch import EventBatch
from hytrec.model.compiled_step import CompiledStep
from hytrec.model.hytrec import HyTRec, HyTRecConfig

CFG = HyTRecConfig(num_items=50, num_categories=6, d_model=16, dropout=0.0)


def model_of(seed: int = 0) -> HyTRec:
    torch.manual_seed(seed)
    return HyTRec(CFG).eval()


def events(users: int, per_user: int, start: int, seed: int) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (users, per_user)
    return EventBatch(
        item=torch.randint(1, CFG.num_items, shape, generator=g),
        category=torch.randint(1, CFG.num_categories, shape, generator=g),
        behavior=torch.randint(1, 5, shape, generator=g),
        ts=1_600_000_000 + 90 * (start + torch.arange(per_user)).expand(shape),
        lengths=torch.full((users,), per_user),
    )


# torch.compile's CPU backend builds C++: without a compiler the step falls back (tested
# below without one); the compiled path itself can only be tested with one
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for inductor"
)


@pytest.fixture(scope="module")
def compiled():
    model = model_of()
    step = CompiledStep(model)
    assert step.warm_up() and step.active, step.reason
    return model, step


@needs_compiler
def test_compiled_calls_give_the_eager_outputs_and_states(compiled):
    """Every user count (1 has its own graph), a pool of another size than the warm-up's,
    interleaved with runs of several events (eager): after each call, outputs and state."""
    model, step = compiled
    eager_state, compiled_state = model.new_state(12), model.new_state(12)
    calls = [(1, 1), (4, 1), (3, 5), (7, 1), (1, 1), (2, 3), (12, 1)]
    with torch.no_grad():
        for call, (users, per_user) in enumerate(calls):
            slots = torch.randperm(12, generator=torch.Generator().manual_seed(call))[:users]
            batch = events(users, per_user, start=10 * call, seed=call)
            expected = model.step(eager_state, slots, batch)
            served = step(compiled_state, slots, batch)
            torch.testing.assert_close(served, expected, atol=1e-4, rtol=0)
            for name, tensor in eager_state.parts().items():
                torch.testing.assert_close(compiled_state.parts()[name], tensor, atol=1e-4, rtol=0)


@needs_compiler
def test_runs_of_several_events_go_to_the_eager_step(compiled, monkeypatch):
    model, step = compiled
    seen = []
    eager = model.step
    monkeypatch.setattr(model, "step", lambda *args: seen.append(args[2]) or eager(*args))
    state = model.new_state(4)
    with torch.no_grad():
        step(state, torch.tensor([0, 1]), events(2, 3, start=0, seed=0))
        step(state, torch.tensor([0, 1]), events(2, 1, start=3, seed=1))
    assert [b.item.shape for b in seen] == [(2, 3)]  # the one-event call ran compiled


def test_a_failing_compile_serves_the_eager_step_and_says_why(monkeypatch):
    def broken(fn, **kwargs):
        def raises(*args):
            raise RuntimeError("no C++ compiler")

        return raises

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    model = model_of()
    step = CompiledStep(model)
    state, reference = model.new_state(3), model.new_state(3)
    batch = events(2, 1, start=0, seed=3)
    with torch.no_grad():
        served = step(state, torch.tensor([0, 2]), batch)  # the first call checks first
        expected = model.step(reference, torch.tensor([0, 2]), batch)
    assert not step.active and "no C++ compiler" in step.reason
    assert torch.equal(served, expected)  # the caller's state saw the events once
    for name, tensor in reference.parts().items():
        assert torch.equal(state.parts()[name], tensor), name


def test_a_compiled_step_that_disagrees_is_not_served(monkeypatch):
    model = model_of()
    eager = model.step

    def off_by_a_little(fn, **kwargs):
        return lambda *args: eager(*args) + 1e-3

    monkeypatch.setattr(compiled_module.torch, "compile", off_by_a_little)
    step = CompiledStep(model)
    assert not step.warm_up() and "differs from eager by 1.00e-03" in step.reason
