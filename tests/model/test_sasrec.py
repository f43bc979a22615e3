"""SASRec served: the per-user window of its last max_len items, recomputed each step, gives
exactly the vector of `forward` over the user's last max_len events."""

from __future__ import annotations

import pytest
import torch

from hytrec.bench.parity import pad_batch, random_user, streamed_user_vectors
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.sasrec import SASRec, SASRecConfig


@pytest.mark.parametrize("max_batch", [1, 7, 60])
def test_step_equals_forward_over_the_last_max_len_events(max_batch):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=300, max_len=10)).eval()
    generator = torch.Generator().manual_seed(max_batch)
    shape = HyTRecConfig(num_items=300, num_categories=5)
    users = [random_user(n, shape, generator) for n in (1, 4, 10, 11, 37)]
    streamed = streamed_user_vectors(model, users, max_batch, seed=max_batch)
    compared = 0
    for u, user in enumerate(users):
        for t, vector in streamed[u].items():
            window = user.run(max(0, t + 1 - 10), t + 1)
            expected = model.user_vector(pad_batch([window]))[0]
            assert (vector - expected).abs().max() <= 1e-5, (u, t)
            compared += 1
    assert compared >= len(users)


def test_the_window_keeps_the_last_max_len_items_oldest_first():
    model = SASRec(SASRecConfig(num_items=50, max_len=4)).eval()
    state = model.new_state(3)
    shape = HyTRecConfig(num_items=50, num_categories=5)
    user = random_user(6, shape, torch.Generator().manual_seed(0))
    model.step(state, torch.tensor([2]), pad_batch([user.run(0, 2)]))
    assert state.window[2].tolist() == [0, 0, *user.item[:2].tolist()]
    model.step(state, torch.tensor([2]), pad_batch([user.run(2, 6)]))
    assert state.window[2].tolist() == user.item[2:6].tolist()
    assert int(state.count[2]) == 6 and int(state.last_ts[2]) == int(user.ts[5])
    assert not state.window[:2].any()  # other slots untouched
    assert model.state_bytes_per_user() == 4 * 8 + 16
