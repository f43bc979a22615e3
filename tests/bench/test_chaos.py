"""Effectively-once user state (issue 5): snapshots of user state, their restore, and the
chaos test: workers killed with SIGKILL at random moments, added and removed, while real
Taobao events stream through; every user's final state equals the offline replay of
exactly its events."""

from __future__ import annotations

import re

import pytest
import torch

from hytrec.bench.chaos import ChaosConfig, run_trial, states_agree
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.snapshots import (
    UserSnapshot,
    decode_header,
    decode_snapshot,
    encode_snapshot,
    read_snapshots,
)
from hytrec.stream.state_store import NO_OFFSET, UserStateStore

TOPIC = "user-state.g"


def small_model() -> HyTRec:
    return HyTRec(HyTRecConfig(num_items=50, num_categories=5, d_model=32, dropout=0)).eval()


def filled_store(model: HyTRec, users: list[str], slots: int) -> UserStateStore:
    store = UserStateStore(model, slots)
    for i, user in enumerate(users):
        index = store.acquire([user])
        for t in store.state.parts().values():
            t[index] = torch.full_like(t[index], i + 1)
        store.mark_applied(user, 3, 10 * (i + 1))
    return store


def test_a_snapshot_round_trips_and_its_header_reads_alone():
    model = small_model()
    store = filled_store(model, ["a", "b"], slots=2)
    kept = store.export_users(["a", "b", "nobody"])
    assert sorted(kept) == ["a", "b"]
    snap = UserSnapshot("b", 3, kept["b"].applied, "v1", kept["b"].parts, log="topic-id-1")
    value = encode_snapshot(snap)
    header = decode_header(value)
    assert (header.user_id, header.applied_offset, header.partition) == ("b", 20, 3)
    assert header.applied == {3: 20} and header.log == "topic-id-1"
    back = decode_snapshot(value)
    assert back.model_version == "v1" and back.applied_offset == 20
    assert back.parts.keys() == kept["b"].parts.keys() == store.state.parts().keys()
    assert all(torch.equal(back.parts[n], t) for n, t in kept["b"].parts.items())
    assert {n: t.dtype for n, t in back.parts.items()} == {
        n: t.dtype for n, t in store.state.parts().items()
    }
    with pytest.raises(ValueError, match="not a user-state snapshot"):
        decode_header(b"not a snapshot at all")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda v: v[:-1], "header says"),  # truncated
        (lambda v: v[:-8] + bytes(8), "checksum"),  # a flipped tail
        (lambda v: v[:12] + b"#" + v[13:], "format"),  # a broken header
        (lambda v: v + b"\x00", "header says"),  # trailing garbage
    ],
    ids=["truncated", "bit-rot", "header", "trailing"],
)
def test_a_damaged_snapshot_is_refused_not_misread(damage, message):
    model = small_model()
    store = filled_store(model, ["a"], slots=1)
    kept = store.export_users(["a"])["a"]
    value = encode_snapshot(UserSnapshot("a", 3, kept.applied, "v1", kept.parts))
    with pytest.raises(ValueError, match=message):
        decode_header(damage(value))


def test_store_exports_device_and_evicted_users_and_imports_them_back():
    model = small_model()
    store = filled_store(model, ["a", "b", "c"], slots=2)  # "a" was evicted to host
    assert "a" in store.evicted
    kept = store.export_users(["a", "c"])
    assert kept["a"].applied == {3: 10} and kept["c"].applied == {3: 30}

    other = UserStateStore(model, 1)
    other.import_user("a", kept["a"].parts, kept["a"].applied)
    other.import_user("c", kept["c"].parts, kept["c"].applied)
    assert other.offset_of("a", 3) == 10 and other.offset_of("c", 3) == 30
    assert other.offset_of("a", 2) == NO_OFFSET  # another partition's offsets are its own
    slot = other.acquire(["c"])  # loads "c" from host memory into the slot
    parts = other.state.parts()
    assert all(torch.equal(parts[n][slot][0], v) for n, v in kept["c"].parts.items())
    other.import_user("c", kept["a"].parts, {3: 99})  # into the slot it holds
    assert other.offset_of("c", 3) == 99
    assert other.reset_offsets(["c", "a"], 3) == 2 and other.offset_of("c", 3) == NO_OFFSET
    assert "c" in other  # a new log: the state stays, its offsets go
    assert other.forget(["a", "c", "nobody"]) == 2
    assert len(other) == 0 and other.offset_of("c", 3) == NO_OFFSET
    with pytest.raises(ValueError, match="layout"):
        other.import_user("x", {**kept["a"].parts, "count": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="layout"):  # a part missing
        other.import_user("x", {n: t for n, t in kept["a"].parts.items() if n != "last_ts"}, {})


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
    ahead = UserSnapshot("u", 0, {0: 5}, engine.model_version, tensors)
    assert engine.import_states([ahead]) == 1
    assert engine.import_states([UserSnapshot("u", 0, {0: 5}, engine.model_version, tensors)]) == 0
    assert engine.import_states([UserSnapshot("v", 0, {0: 7}, "another-model", tensors)]) == 0
    (out,) = engine.export_states({"u": 0}, log="topic-1")
    assert (out.applied_offset, out.partition, out.model_version) == (5, 0, engine.model_version)
    assert out.log == "topic-1"
    assert engine.drop_users(["u"]) == 1 and engine.export_states({"u": 0}) == []


@pytest.mark.integration
def test_snapshots_are_read_up_to_a_sentinel_despite_multi_record_batches():
    """Tansu misreports a partition's end when its last batch holds several records; the
    reader appends a sentinel and reads up to it instead of asking for the end. It keeps
    the latest snapshot of the current log per user, and reports corrupt records."""
    from kafka import KafkaProducer

    from hytrec.stream.broker import EmbeddedBroker, TopicConfig, ensure_topics

    model = small_model()
    tensors = {n: t[0] for n, t in model.new_state(1).parts().items()}
    with EmbeddedBroker(topics=TopicConfig(behaviors_partitions=2)) as broker:
        ensure_topics(broker.bootstrap, TopicConfig(behaviors_partitions=2), group="g")
        producer = KafkaProducer(
            bootstrap_servers=broker.bootstrap, enable_idempotence=False, linger_ms=20
        )
        for offset in range(30):  # batched: many records per produce request
            user = f"u{offset % 7}"
            snap = UserSnapshot(user, 1, {1: offset}, "v1", tensors, log="log-a")
            producer.send(TOPIC, key=user.encode(), value=encode_snapshot(snap), partition=1)
        producer.flush()
        found = read_snapshots(broker.bootstrap, TOPIC, [0, 1], log_id="log-a")
        assert {u: h.applied_offset for u, (h, _) in found.latest.items()} == {
            f"u{k}": max(o for o in range(30) if o % 7 == k) for k in range(7)
        }
        assert found.ends == {0: 1, 1: 31}  # just past each partition's sentinel
        assert not found.corrupt and not found.other_log
        again = read_snapshots(broker.bootstrap, TOPIC, [1], start=found.ends)
        assert again.latest == {}  # read from where the last read stopped: nothing new

        # records of another log are skipped; a corrupt record is reported unless a valid
        # one of the same user follows it
        other = UserSnapshot("u0", 1, {1: 99}, "v1", tensors, log="log-b")
        producer.send(TOPIC, key=b"u0", value=encode_snapshot(other), partition=1)
        good = encode_snapshot(UserSnapshot("u1", 1, {1: 50}, "v1", tensors, log="log-a"))
        producer.send(TOPIC, key=b"u1", value=good[:-3], partition=1)  # u1: corrupt, then good
        producer.send(TOPIC, key=b"u1", value=good, partition=1)
        producer.send(TOPIC, key=b"u2", value=good[:-3], partition=1)  # u2: corrupt, last
        producer.send(TOPIC, key=None, value=b"junk", partition=0)  # nobody's
        producer.flush()
        producer.close()
        found = read_snapshots(broker.bootstrap, TOPIC, [0, 1], log_id="log-a")
        assert found.other_log == 1 and found.latest["u0"][0].applied_offset == 28
        assert found.latest["u1"][0].applied_offset == 50 and found.superseded == 1
        assert [(c.partition, c.user_id) for c in found.corrupt] == [(0, None), (1, "u2")]
        assert "header says" in found.corrupt[1].reason


@pytest.mark.integration
@pytest.mark.parametrize("disk_tier", [False, True])
def test_kill_9_and_rebalances_leave_every_user_state_equal_to_the_offline_replay(
    shared_data, tmp_path, disk_tier
):
    """With the disk tier, each worker holds 4 users in slots and 4 in host memory: most of
    its ~15 users live on disk, read back on their next event."""
    report = run_trial(
        ChaosConfig(
            dataset=str(shared_data / "taobao" / "UserBehavior_head84k.csv.gz"),
            users=30,  # about 3,000 events
            workers=2,
            kills=5,
            chaos_seconds=40.0,
            chunks=40,
            seed=1,
            disk_tier=disk_tier,
            output=tmp_path,
        )
    )
    story = "\n".join(report.timeline)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("worker-*.log"))
    read_back = [int(n) for n in re.findall(r"(\d+) read back", logs)]
    assert (max(read_back, default=0) > 0) == disk_tier, read_back  # states came off disk
    assert report.events > 2000
    assert report.kills >= 5, story
    assert report.workers_added >= 1 and report.workers_removed >= 1, story
    assert report.users_restored > 0, story  # the restores happened
    assert report.worker_failures == 0, story
    assert report.lost == 0, story
    assert report.double_applied == 0, story
    assert report.state_mismatches == 0, f"max state diff {report.max_state_diff}\n{story}"
    assert report.vector_mismatches == 0, f"max vector diff {report.max_vector_diff}\n{story}"
    # every worker's last accounting line balances: consumed = applied + dead-lettered +
    # replays skipped + in flight, nothing unaccounted
    assert report.unaccounted == 0 and report.accounting["balanced"], report.accounting
    assert report.accounting["consumed"] > 0


def test_the_state_check_scales_with_each_part_and_catches_a_changed_state():
    generator = torch.Generator().manual_seed(0)
    offline = {
        "tadn.0": torch.randn(2, 32, 32, generator=generator) * 0.3,
        "mean_sum.0": torch.randn(64, generator=generator) * 100,  # a sum over many events
        "count": torch.tensor(500),
    }
    rounded = {k: v.clone() for k, v in offline.items()}
    # what micro-batching does in fp32 (measured: sums ~1e-4 off, TADN states < 1e-6)
    rounded["mean_sum.0"][offline["mean_sum.0"].abs().argmin()] += 2.9e-4
    rounded["tadn.0"] += 1e-6
    assert states_agree(rounded, offline, 1e-4) == (True, pytest.approx(2.9e-4, rel=1e-3))
    for name, change in (("tadn.0", 1e-3), ("mean_sum.0", 0.5)):  # well under one event
        changed = {k: v.clone() for k, v in offline.items()}
        changed[name].view(-1)[3] += change
        assert not states_agree(changed, offline, 1e-4)[0], name
    assert not states_agree({**offline, "count": torch.tensor(501)}, offline, 1e-4)[0]
    with pytest.raises(ValueError, match="snapshot parts"):
        states_agree({"count": offline["count"]}, offline, 1e-4)
