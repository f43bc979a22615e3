"""The user-state store: slots, eviction to host memory and to disk and back, applied
offsets."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.bench.parity import pad_batch, random_user
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.disk_tier import DiskTier
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
@pytest.mark.parametrize("disk", [False, True])
def test_eviction_to_host_and_back_keeps_every_user_state(model, num_slots, disk, tmp_path):
    generator = torch.Generator().manual_seed(0)
    users = {f"u{i}": random_user(n, model.cfg, generator) for i, n in enumerate([9, 14, 20, 5])}
    arrivals = [name for name, user in users.items() for _ in range(len(user))]
    random.Random(0).shuffle(arrivals)
    # with the disk tier, host memory holds one user: the others go to disk and back
    tiers = {"host_budget_bytes": 1, "disk_dir": tmp_path / "disk"} if disk else {}
    small = UserStateStore(model, num_slots, **tiers)
    roomy = UserStateStore(model, 10)
    # batches of num_slots events hold at most num_slots users
    got = run_stream(model, small, users, arrivals, num_slots)
    want = run_stream(model, roomy, users, arrivals, num_slots)
    assert small.evictions > 0 and roomy.evictions == 0
    if disk and len(users) - num_slots > 1:  # more users than slots and host memory hold
        assert small.disk.writes > 0 and small.disk.reads > 0 and len(small.evicted) <= 1
    for name in users:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        assert small.offset_of(name, 0) == roomy.offset_of(name, 0) == len(users[name])
        assert small.newest_ts(name) == int(users[name].ts[-1])
    assert len(small) == len(users)


def test_ulims_state_with_its_kept_interests_goes_to_disk_and_back(tmp_path):
    """ULIM's state holds floats and flags beside its integers (each slot's kept interest and
    whether it is stale): evicted to disk and back, every user reads as in a roomy store, and
    a snapshot of it encodes and decodes to the same tensors."""
    from hytrec.bench.ulim_parity import CONFIG, randomised, users_for
    from hytrec.stream.snapshots import UserSnapshot, decode_snapshot, encode_snapshot

    ulim = randomised(replace(CONFIG, num_items=60, num_categories=7, d_model=8), seed=0)
    users = dict(zip(["a", "b", "c"], users_for(ulim, [11, 7, 5]), strict=True))
    arrivals = [name for name, user in users.items() for _ in range(len(user))]
    random.Random(1).shuffle(arrivals)
    small = UserStateStore(ulim, 1, host_budget_bytes=1, disk_dir=tmp_path / "disk")
    roomy = UserStateStore(ulim, 4)
    got = run_stream(ulim, small, users, arrivals, 1)
    want = run_stream(ulim, roomy, users, arrivals, 1)
    assert small.disk.writes > 0 and small.disk.reads > 0
    for name in users:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    parts = roomy.export_users(["a"])["a"].parts
    assert {parts["slot_interest"].dtype, parts["slot_stale"].dtype} == {
        torch.float32,
        torch.bool,
    }
    snapshot = UserSnapshot("a", 0, {0: 10}, ulim.version, parts)
    decoded = decode_snapshot(encode_snapshot(snapshot)).parts
    assert decoded.keys() == parts.keys()
    for name, tensor in parts.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name


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


# ---------------------------------------------------------------------------- the disk tier


def random_parts(store: UserStateStore, seed: int) -> dict[str, torch.Tensor]:
    """A state of the store's layout with every element random (counts and times too)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in store.state.parts().items():
        shape = t.shape[1:]
        if t.is_floating_point():
            out[name] = torch.randn(shape, generator=generator)
        else:
            out[name] = torch.randint(1, 1_000_000, shape, generator=generator)
    return out


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.lists(st.integers(0, 7), min_size=1, max_size=2)),
        st.tuples(st.just("import"), st.integers(0, 7)),
        st.tuples(st.just("forget"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(operations=OPERATIONS)
def test_three_tiers_hold_exactly_what_one_would(tmp_path_factory, operations):
    """Any sequence of acquiring (and changing), importing and forgetting users gives the
    same states, counts and membership with 2 slots, 1 user in host memory and the rest on
    disk as with room for everyone."""
    torch.manual_seed(0)
    model = HyTRec(HyTRecConfig(num_items=20, num_categories=4, d_model=16, long_layers=2))
    disk_dir = tmp_path_factory.mktemp("tiers") / "disk"
    tiered = UserStateStore(model, 2, host_budget_bytes=1, disk_dir=disk_dir)
    roomy = UserStateStore(model, 16)
    for step, (what, arg) in enumerate(operations):
        if what == "acquire":
            names = sorted({f"u{i}" for i in arg})
            changed = {n: random_parts(roomy, step * 10 + i) for i, n in enumerate(names)}
            for store in (tiered, roomy):
                slots = store.acquire(names)
                stacked = {
                    k: torch.stack([changed[n][k] for n in names]) for k in changed[names[0]]
                }
                store.state.write(slots, stacked)
        elif what == "import":
            parts = random_parts(roomy, 1000 + step)
            for store in (tiered, roomy):
                store.import_user(f"u{arg}", parts, {0: step})
        else:
            assert tiered.forget([f"u{arg}"]) == roomy.forget([f"u{arg}"])
        everyone = [f"u{i}" for i in range(8)]
        assert len(tiered) == len(roomy)
        assert [u in tiered for u in everyone] == [u in roomy for u in everyone]
        assert [tiered.newest_ts(u) for u in everyone] == [roomy.newest_ts(u) for u in everyone]
        assert [tiered.events_applied(u) for u in everyone] == [
            roomy.events_applied(u) for u in everyone
        ]
        got, want = tiered.export_users(everyone), roomy.export_users(everyone)
        assert got.keys() == want.keys()
        for user in want:
            assert got[user].applied == want[user].applied
            for name, tensor in want[user].parts.items():
                assert torch.equal(got[user].parts[name], tensor), (user, name)
        assert len(tiered.evicted) <= 1 and len(tiered.slot_of) <= 2
    tiered.close()
    assert not disk_dir.exists()


def test_a_disk_tier_starts_empty_and_refuses_a_foreign_layout(model, tmp_path):
    store = UserStateStore(model, 1, host_budget_bytes=1, disk_dir=tmp_path / "d")
    layout = {n: (tuple(t.shape[1:]), t.dtype) for n, t in store.state.parts().items()}
    store.disk.put_many([("old", random_parts(store, 0))])
    reopened = DiskTier(tmp_path / "d", layout)  # a new process: nothing from before
    assert len(reopened) == 0 and reopened.get("old") is None
    with pytest.raises(ValueError, match="state parts"):
        reopened.put_many([("x", {"count": torch.tensor(1)})])
    with pytest.raises(ValueError, match="needs a disk directory"):
        UserStateStore(model, 1, host_budget_bytes=1)
