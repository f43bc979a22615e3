"""Effectively-once user state (issue 5): snapshots of user state, their restore, and the
chaos test: workers killed with SIGKILL at random moments, added and removed, while real
Taobao events stream through; every user's final state equals the offline replay of
exactly its events."""

from __future__ import annotations

import pytest
import torch

from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.chaos import ChaosConfig, run_trial
from hytrec.stream.snapshots import (
    UserSnapshot,
    decode_header,
    decode_snapshot,
    encode_snapshot,
    read_snapshots,
)
from hytrec.stream.state_store import NO_OFFSET, UserStateStore


def small_model() -> HyTRec:
    return HyTRec(HyTRecConfig(num_items=50, num_categories=5, d_model=32, dropout=0)).eval()


def filled_store(model: HyTRec, users: list[str], slots: int) -> UserStateStore:
    store = UserStateStore(model, slots)
    for i, user in enumerate(users):
        index = store.acquire([user])
        for t in store.state.parts().values():
            t[index] = torch.full_like(t[index], i + 1)
        store.mark_applied(index, [10 * (i + 1)])
    return store


def test_a_snapshot_round_trips_and_its_header_reads_alone():
    model = small_model()
    store = filled_store(model, ["a", "b"], slots=2)
    kept = store.export_users(["a", "b", "nobody"])
    assert sorted(kept) == ["a", "b"]
    snap = UserSnapshot("b", kept["b"].applied_offset, 3, "v1", kept["b"].parts)
    value = encode_snapshot(snap)
    header = decode_header(value)
    assert (header.user_id, header.applied_offset, header.partition) == ("b", 20, 3)
    back = decode_snapshot(value)
    assert back.model_version == "v1" and back.applied_offset == 20
    assert back.parts.keys() == kept["b"].parts.keys() == store.state.parts().keys()
    assert all(torch.equal(back.parts[n], t) for n, t in kept["b"].parts.items())
    assert {n: t.dtype for n, t in back.parts.items()} == {
        n: t.dtype for n, t in store.state.parts().items()
    }
    with pytest.raises(ValueError):
        decode_header(b"not a snapshot at all")


def test_store_exports_device_and_evicted_users_and_imports_them_back():
    model = small_model()
    store = filled_store(model, ["a", "b", "c"], slots=2)  # "a" was evicted to host
    assert "a" in store.evicted
    kept = store.export_users(["a", "c"])
    assert kept["a"].applied_offset == 10 and kept["c"].applied_offset == 30

    other = UserStateStore(model, 1)
    other.import_user("a", kept["a"].parts, kept["a"].applied_offset)
    other.import_user("c", kept["c"].parts, kept["c"].applied_offset)
    assert other.offset_of("a") == 10 and other.offset_of("c") == 30
    slot = other.acquire(["c"])  # loads "c" from host memory into the slot
    parts = other.state.parts()
    assert all(torch.equal(parts[n][slot][0], v) for n, v in kept["c"].parts.items())
    other.import_user("c", kept["a"].parts, 99)  # into the slot it holds
    assert other.offset_of("c") == 99
    assert other.forget(["a", "c", "nobody"]) == 2
    assert len(other) == 0 and other.offset_of("c") == NO_OFFSET
    with pytest.raises(ValueError, match="layout"):
        other.import_user("x", {**kept["a"].parts, "count": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="layout"):  # a part missing
        other.import_user("x", {n: t for n, t in kept["a"].parts.items() if n != "last_ts"}, 1)


def test_engine_imports_only_snapshots_ahead_of_it_and_of_its_model(tmp_path):
    from hytrec.index import IndexConfig, build_from_checkpoint
    from hytrec.model.events import Vocabulary
    from hytrec.stream.engine import EngineConfig, RecommendationEngine

    items = Vocabulary([f"i{n}" for n in range(49)])
    model = HyTRec(HyTRecConfig(num_items=50, num_categories=5, d_model=32, dropout=0), items)
    checkpoint = model.save(tmp_path / "checkpoint")
    engine = RecommendationEngine(
        model, build_from_checkpoint(checkpoint, IndexConfig()), EngineConfig(device="cpu")
    )
    tensors = {n: t[0].clone() + 1 for n, t in model.new_state(1).parts().items()}
    ahead = UserSnapshot("u", 5, 0, engine.model_version, tensors)
    assert engine.import_states([ahead]) == 1
    assert engine.import_states([UserSnapshot("u", 5, 0, engine.model_version, tensors)]) == 0
    assert engine.import_states([UserSnapshot("v", 7, 0, "another-model", tensors)]) == 0
    (out,) = engine.export_states({"u": 2})
    assert (out.applied_offset, out.partition, out.model_version) == (5, 2, engine.model_version)
    assert engine.drop_users(["u"]) == 1 and engine.export_states({"u": 2}) == []


@pytest.mark.integration
def test_snapshots_are_read_up_to_a_sentinel_despite_multi_record_batches():
    """Tansu misreports a partition's end when its last batch holds several records; the
    reader appends a sentinel and reads up to it instead of asking for the end."""
    from kafka import KafkaProducer

    from hytrec.stream.broker import EmbeddedBroker

    model = small_model()
    tensors = {n: t[0] for n, t in model.new_state(1).parts().items()}
    with EmbeddedBroker() as broker:
        producer = KafkaProducer(
            bootstrap_servers=broker.bootstrap, enable_idempotence=False, linger_ms=20
        )
        for offset in range(30):  # batched: many records per produce request
            snap = UserSnapshot(f"u{offset % 7}", offset, 1, "v1", tensors)
            producer.send("user-state", key=b"k", value=encode_snapshot(snap), partition=1)
        producer.flush()
        latest, ends = read_snapshots(broker.bootstrap, "user-state", [0, 1])
        assert {u: h.applied_offset for u, (h, _) in latest.items()} == {
            f"u{k}": max(o for o in range(30) if o % 7 == k) for k in range(7)
        }
        assert ends == {0: 1, 1: 31}  # just past each partition's sentinel
        again, _ = read_snapshots(broker.bootstrap, "user-state", [1], start=ends)
        assert again == {}  # read from where the last read stopped: nothing new
        producer.close()


@pytest.mark.integration
def test_kill_9_and_rebalances_leave_every_user_state_equal_to_the_offline_replay(
    shared_data, tmp_path
):
    report = run_trial(
        ChaosConfig(
            dataset=str(shared_data / "taobao" / "UserBehavior_head84k.csv.gz"),
            users=30,  # about 3,000 events
            workers=2,
            kills=5,
            chaos_seconds=40.0,
            chunks=40,
            seed=1,
            output=tmp_path,
        )
    )
    story = "\n".join(report.timeline)
    assert report.events > 2000
    assert report.kills >= 5, story
    assert report.workers_added >= 1 and report.workers_removed >= 1, story
    assert report.users_restored > 0, story  # the restores happened
    assert report.worker_failures == 0, story
    assert report.lost == 0, story
    assert report.double_applied == 0, story
    assert report.state_mismatches == 0, f"max state diff {report.max_state_diff}\n{story}"
    assert report.vector_mismatches == 0, f"max vector diff {report.max_vector_diff}\n{story}"
