"""A streaming model's `step` under `torch.compile`, for the call that is all fixed cost: one
new event per user.

A HyTRec step of one event for one user runs about a thousand small operators (3-4 ms on one
CPU thread, `benchmarks/results/efficiency-cpu.json`, most of it per-operator overhead);
inductor fuses them into a few kernels. Calls with runs of several events per user (a
micro-batch under load) stay eager: there the operators' fixed cost is shared by the run's
events, and the data-dependent packing of runs breaks the graph.

`warm_up` (run by the first call if nobody called it) compiles on a scratch state, one and
two users (a user count of 1 gets its own graph; from 2 on one graph with a dynamic count),
and checks the compiled step against the eager one: outputs and every state tensor. When
compiling fails (no C++ compiler, an operator inductor cannot lower) or the two differ by
more than `tolerance`, the eager step serves from then on and `reason` says why; either
way nothing touches the caller's state until the check is over.
"""

from __future__ import annotations

import logging

import torch

from hytrec.model.batch import EventBatch
from hytrec.model.streaming import StreamingModel

log = logging.getLogger(__name__)


class CompiledStep:
    """Callable as `model.step(state, slots, batch)`: compiled when every run holds one
    event, eager otherwise or when compiling did not pass its check."""

    def __init__(self, model: StreamingModel, tolerance: float = 1e-4):
        self.model = model
        self.tolerance = tolerance
        self.reason: str | None = None  # why the eager step serves, once it does
        self._compiled = torch.compile(model.step, dynamic=True)
        self._checked = False

    @property
    def active(self) -> bool:
        """Whether one-event calls run compiled (after `warm_up`)."""
        return self._checked and self.reason is None

    def __call__(self, state, slots: torch.Tensor, batch: EventBatch) -> torch.Tensor:
        if not self._checked:
            self.warm_up()
        if self.reason is not None or batch.item.shape[1] != 1:
            return self.model.step(state, slots, batch)
        return self._compiled(state, slots, batch)

    def warm_up(self) -> bool:
        """Compile and check on scratch states; True when the compiled step will serve."""
        if self._checked:
            return self.reason is None
        self._checked = True
        try:
            worst = self._compare()
        except Exception as error:  # whatever inductor raises: serve eager, say why
            self.reason = f"torch.compile failed: {type(error).__name__}: {error}"
        else:
            if not worst <= self.tolerance:
                self.reason = f"compiled step differs from eager by {worst:.2e}"
        if self.reason is not None:
            log.warning("%s: serving the eager step (%s)", type(self.model).__name__, self.reason)
        return self.reason is None

    @torch.no_grad()
    def _compare(self) -> float:
        """max |compiled - eager| over outputs and state tensors, on two scratch states fed
        the same one-event calls: 1 user, then 2 users, three times each."""
        device = next(self.model.parameters()).device
        eager_state = self.model.new_state(3, device)
        compiled_state = self.model.new_state(3, device)
        worst = 0.0
        generator = torch.Generator().manual_seed(0)
        num_items = self.model.cfg.num_items
        for call in range(6):
            users = 1 if call < 3 else 2
            slots = torch.tensor([2, 0][:users], device=device)
            batch = EventBatch(
                item=torch.randint(1, num_items, (users, 1), generator=generator),
                category=torch.zeros(users, 1, dtype=torch.long),
                behavior=torch.ones(users, 1, dtype=torch.long),
                ts=torch.full((users, 1), 1_600_000_000 + 600 * call),
                lengths=torch.ones(users, dtype=torch.long),
            ).to(device)
            eager = self.model.step(eager_state, slots, batch)
            compiled = self._compiled(compiled_state, slots, batch)
            worst = max(worst, (eager - compiled).abs().max().item())
        for name, tensor in eager_state.parts().items():
            if tensor.is_floating_point():
                worst = max(worst, (tensor - compiled_state.parts()[name]).abs().max().item())
            elif not torch.equal(tensor, compiled_state.parts()[name]):
                return float("inf")
        return worst
