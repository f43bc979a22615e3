"""The user-state store: slots, eviction to host memory and back, applied offsets."""

from __future__ import annotations

import random

import pytest
import torch

from hytrec.bench.parity import pad_batch, random_user
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.state_store import NO_OFFSET, UserStateStore


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HyTRec(HyTRecConfig(num_items=100, num_categories=10)).eval()


def run_stream(model, store, users, arrivals, batch_size):
    """Apply users' events in `arrivals` order, `batch_size` events per step."""
    applied = {u: 0 for u in users}
    last_vectors = {}
    for start in range(0, len(arrivals), batch_size):
        chunk = arrivals[start : start + batch_size]
        names = sorted(set(chunk))
        runs = [users[n].run(applied[n], applied[n] + chunk.count(n)) for n in names]
        slots = store.acquire(names)
        vectors = model.step(store.state, slots, pad_batch(runs))
        for n, run, v in zip(names, runs, vectors, strict=True):
            applied[n] += len(run)
            last_vectors[n] = v
        for n in names:
            store.mark_applied(n, 0, applied[n])
    return last_vectors


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_eviction_to_host_and_back_keeps_every_user_state(model, num_slots):
    generator = torch.Generator().manual_seed(0)
    users = {f"u{i}": random_user(n, model.cfg, generator) for i, n in enumerate([9, 14, 20, 5])}
    arrivals = [name for name, user in users.items() for _ in range(len(user))]
    random.Random(0).shuffle(arrivals)
    small = UserStateStore(model, num_slots)
    roomy = UserStateStore(model, 10)
    # batches of num_slots events hold at most num_slots users
    got = run_stream(model, small, users, arrivals, num_slots)
    want = run_stream(model, roomy, users, arrivals, num_slots)
    assert small.evictions > 0 and roomy.evictions == 0
    for name in users:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        assert small.offset_of(name, 0) == roomy.offset_of(name, 0) == len(users[name])
        assert small.newest_ts(name) == int(users[name].ts[-1])
    assert len(small) == len(users)


def test_new_users_start_empty_and_batches_must_fit(model):
    store = UserStateStore(model, 2)
    assert store.offset_of("nobody", 0) == NO_OFFSET and store.newest_ts("nobody") is None
    slots = store.acquire(["a"])
    assert int(store.state.count[slots]) == 0
    with pytest.raises(ValueError, match="exceeds the 2 slots"):
        store.acquire(["a", "b", "c"])
    assert store.device_bytes == 2 * store.bytes_per_user == 2 * model.state_bytes_per_user()


def test_the_state_has_named_parts_and_refuses_a_foreign_layout(model):
    """Snapshots and the store address the state by part name, never by position."""
    state = model.new_state(2)
    names = list(state.parts())
    assert names[-3:] == ["window", "count", "last_ts"]
    assert {n.split(".")[0] for n in names} == {
        "tadn",
        "mean_sum",
        "kv",
        "window",
        "count",
        "last_ts",
    }
    saved = state.read(torch.tensor([1]))
    assert saved.keys() == state.parts().keys()
    state.write(torch.tensor([0]), saved)
    with pytest.raises(ValueError, match="state parts"):
        state.write(torch.tensor([0]), {n: t for n, t in saved.items() if n != "count"})
    assert sum(state.bytes_by_part().values()) == state.bytes_per_user()
