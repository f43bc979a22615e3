"""The backfill: states built from whole histories in long runs equal the states the stream
builds event batch by event batch (every registered streaming model), and against a real
broker it writes snapshots a worker restores instead of replaying, dead-letters what the
worker would refuse, and resumes where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from test_stream_support import (
    applied_events,
    behavior_payload,
    start_worker,
    stop_worker,
    wait_for,
)

from hytrec.bench.backfill_benchmark import probe_vectors
from hytrec.bench.chaos import states_agree
from hytrec.model.events import Behavior, EventLog, Vocabulary
from hytrec.model.registry import MODELS, build_model, spec
from hytrec.stream.backfill import (
    BackfillConfig,
    backfill,
    backfill_file,
    build_states,
    key_partition,
)
from hytrec.stream.broker import EmbeddedBroker, TopicConfig
from hytrec.stream.engine import EngineConfig, build_engine
from hytrec.stream.schemas import BehaviorEvent, ParseLimits, encode_behavior, parse_record
from hytrec.stream.snapshots import decode_snapshot, read_snapshots
from hytrec.stream.tail import read_topic

TS = 1_600_000_000
LENGTHS = [1, 2, 3, 9, 17, 40, 70, 5, 33, 12]  # runs shorter and longer than max_run below
NUM_ITEMS = 40


def uneven_events(lengths=LENGTHS, seed: int = 0) -> list[BehaviorEvent]:
    """Users with histories of these lengths on two partitions, interleaved in time order,
    offsets counted per partition; one event of user u6 comes an hour late (refused)."""
    rng = np.random.default_rng(seed)
    owners = rng.permutation(np.repeat(np.arange(len(lengths)), lengths))
    clock = np.full(len(lengths), TS)
    offsets = [0, 0]
    events = []
    for u in owners:
        clock[u] += int(rng.integers(1, 600))
        partition = int(u) % 2
        events.append(
            BehaviorEvent(
                user_id=f"u{u}",
                item_id=f"i{int(rng.integers(1, NUM_ITEMS))}",
                category_id="c",
                behavior="click",
                ts=int(clock[u]),
                partition=partition,
                offset=offsets[partition],
                received_at=0.0,
            )
        )
        offsets[partition] += 1
    late = [i for i, e in enumerate(events) if e.user_id == "u6"][20]
    events[late] = replace(events[late], ts=events[late].ts - 3600)
    return events


def small_model(name: str, tmp_path):
    log = EventLog(
        user=np.ones(1, dtype=np.int64),
        item=np.ones(1, dtype=np.int64),
        category=np.ones(1, dtype=np.int64),
        behavior=np.full(1, int(Behavior.CLICK)),
        ts=np.full(1, TS),
        users=Vocabulary(["x"]),
        items=Vocabulary(f"i{i}" for i in range(1, NUM_ITEMS)),
        categories=Vocabulary(["c"]),
    )
    torch.manual_seed(0)
    model = build_model(spec(name).config(d_model=16), log).eval()
    return model.save(tmp_path / name)


@pytest.mark.parametrize("name", sorted(n for n, s in MODELS.items() if s.streams))
def test_backfilled_states_equal_the_streamed_ones(name, tmp_path):
    checkpoint = small_model(name, tmp_path)
    events = uneven_events()
    config = EngineConfig(top_k=5, device="cpu")
    streamed = build_engine(checkpoint, config=config)
    stream_refused = []
    for start in range(0, len(events), 7):  # the worker's micro-batches
        stream_refused += streamed.process(events[start : start + 7]).rejected
    users = sorted({e.user_id for e in events})
    expected = streamed.store.export_users(users)

    engine = build_engine(checkpoint, config=config)
    got = {}

    def done(group: list[str]) -> None:  # as the backfill: export, then forget
        got.update(engine.store.export_users(group))
        engine.drop_users(group)

    small = BackfillConfig(max_run=16, tokens_per_step=64, progress=False)
    refused = build_states(engine, events, small, done)
    assert len(engine.store) == 0 and got.keys() == expected.keys()
    assert [(e.partition, e.offset) for e, *_ in refused] == [
        (e.partition, e.offset) for e, *_ in stream_refused
    ]
    assert [reason for _, reason, _ in refused] == ["out_of_order"]
    for user in users:
        assert got[user].applied == expected[user].applied, user
        same, worst = states_agree(got[user].parts, expected[user].parts, 1e-4)
        assert same, (name, user, worst)
    vectors = probe_vectors(engine.model, {u: got[u].parts for u in users})
    reference = probe_vectors(engine.model, {u: expected[u].parts for u in users})
    assert np.abs(vectors - reference).max() <= 1e-4


def test_settling_forms_the_kept_interests_and_allocates_no_unknown_user(tmp_path):
    engine = build_engine(small_model("ulim", tmp_path), config=EngineConfig(device="cpu"))
    events = [e for e in uneven_events() if e.user_id == "u0"][:5]
    engine.apply(events)
    state = engine.store.state
    assert bool(state.slot_stale.any())  # apply reads nothing
    engine.settle(["u0", "nobody"])
    assert not bool(state.slot_stale.any())
    assert "nobody" not in engine.store and len(engine.store) == 1


def test_the_config_refuses_empty_steps():
    with pytest.raises(ValueError, match="must be >= 1"):
        BackfillConfig(max_run=0)


# ---------------------------------------------------------------------------- a real broker


def item(i: int) -> str:
    return f"i{i % (NUM_ITEMS - 1) + 1}"


def publish(bootstrap: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    out = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in messages:
        out.send("behaviors", key=key, value=value)
    out.flush()
    out.close()


def snapshots_of(bootstrap: str, group: str) -> dict[str, object]:
    topic = TopicConfig().state_topic(group)
    found = read_snapshots(bootstrap, topic, list(range(4)))
    return {user: decode_snapshot(value) for user, (_, value) in found.latest.items()}


def test_backfill_through_a_real_broker_restores_a_worker_and_resumes(tmp_path, monkeypatch):
    """Backfill a log with poison in it: every valid event is in a snapshot, every poison
    message is one dead letter; the states equal the offline stream's. Run again: nothing
    to do. Events come for some users: only those are rebuilt, from their snapshots. A
    worker of the group then restores and applies only the events after the backfill."""
    checkpoint = small_model("hytrec", tmp_path)
    users = [f"user-{u}" for u in range(6)]
    payloads = [behavior_payload(users[i % 6], i, ts=TS + i, item_id=item(i)) for i in range(90)]
    poison = [(b"user-0", b"{not json"), (None, encode_behavior(payloads[0]))]
    config = BackfillConfig(group="backfilled", progress=False)
    engine_config = EngineConfig(device="cpu")
    with EmbeddedBroker() as broker:
        publish(broker.bootstrap, [(p["user_id"].encode(), encode_behavior(p)) for p in payloads])
        publish(broker.bootstrap, poison)
        report = backfill(build_engine(checkpoint, config=engine_config), broker.bootstrap, config)
        assert report.events_read == 92 and report.events_applied == 90
        assert report.users_written == 6 and report.dead_letters == 2
        assert report.rejected == {"invalid_json": 1, "missing_key": 1}
        letters = list(read_topic(broker.bootstrap, "behaviors-dlq", idle_timeout_s=1.0))
        assert sorted(json.loads(r.value)["reason_code"] for r in letters) == [
            "invalid_json",
            "missing_key",
        ]
        snapshots = snapshots_of(broker.bootstrap, "backfilled")
        assert sorted(snapshots) == users
        assert {s.model_version for s in snapshots.values()} == {report.model_version}

        # the same states as the stream would build: the engine over the events read back
        streamed = build_engine(checkpoint, config=engine_config)
        records = list(read_topic(broker.bootstrap, "behaviors", idle_timeout_s=1.0))
        events = [parse_record(r, ParseLimits(), time.time()) for r in records]
        valid = [e for e in events if isinstance(e, BehaviorEvent)]
        for start in range(0, len(valid), 5):
            streamed.process(valid[start : start + 5])
        expected = streamed.store.export_users(users)
        for user in users:
            assert snapshots[user].applied == expected[user].applied
            assert states_agree(snapshots[user].parts, expected[user].parts, 1e-4)[0], user

        # again, from the command line: every user is up to date; then two users get new
        # events: only they move
        command = [sys.executable, "-m", "hytrec.cli", "backfill", f"--checkpoint={checkpoint}"]
        command += [f"--bootstrap={broker.bootstrap}", "--group=backfilled", "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        again = json.loads(done.stdout.splitlines()[-1])
        assert again["users_up_to_date"] == 6 and again["events_applied"] == 0
        more = [behavior_payload(users[i % 2], i, ts=TS + 1000 + i, item_id="i3") for i in range(4)]
        publish(broker.bootstrap, [(p["user_id"].encode(), encode_behavior(p)) for p in more])
        resumed = backfill(build_engine(checkpoint, config=engine_config), broker.bootstrap, config)
        assert resumed.users_up_to_date == 4 and resumed.users_resumed == 2
        assert resumed.events_applied == 4

        # a worker of the group restores the states and applies only what comes after
        monkeypatch.setenv("HYTREC_TEST_CHECKPOINT", str(checkpoint))
        worker = start_worker(
            broker.bootstrap,
            tmp_path / "worker",
            group="backfilled",
            engine="test_stream_support:make_logging_model_engine",
        )
        try:
            last = behavior_payload(users[5], 0, ts=TS + 5000, item_id="i4")
            publish(broker.bootstrap, [(b"user-5", encode_behavior(last))])
            wait_for(
                lambda: applied_events(tmp_path / "worker"),
                60,
                "the worker to apply the new event",
            )
            time.sleep(1.0)  # anything it wrongly replayed would come in the same batches
            applied = applied_events(tmp_path / "worker")
            assert [(user, ts) for _, _, user, _, ts in applied] == [("user-5", TS + 5000)]
        finally:
            stop_worker(worker)


def test_a_history_from_a_file_goes_under_the_topic(tmp_path, monkeypatch):
    """`backfill --from-file`: the shop's history before the stream. Each user's state goes
    to the partition its Kafka key gives it, with no offsets; a worker restores it and
    applies the topic's events on top: its saved states equal one engine's over the file's
    events then the topic's. A second run leaves those users alone."""
    checkpoint = small_model("hytrec", tmp_path)
    users = [f"user-{u}" for u in range(5)]
    # (user, item, ts), sorted by user then time, as a log is
    history = sorted(((users[i % 5], item(i), TS + i) for i in range(60)), key=lambda h: h[0])
    log = EventLog(
        user=np.array([int(u.split("-")[1]) + 1 for u, _, _ in history]),
        item=np.array([int(i[1:]) for _, i, _ in history]),
        category=np.ones(60, dtype=np.int64),
        behavior=np.full(60, int(Behavior.CLICK)),
        ts=np.array([t for _, _, t in history]),
        users=Vocabulary(users),
        items=Vocabulary(f"i{i}" for i in range(1, NUM_ITEMS)),
        categories=Vocabulary(["c"]),
    )
    config = BackfillConfig(group="from-file", progress=False)
    engine_config = EngineConfig(device="cpu")
    with EmbeddedBroker() as broker:
        report = backfill_file(
            build_engine(checkpoint, config=engine_config), broker.bootstrap, log, config
        )
        assert report.users_written == 5 and report.events_applied == 60
        saved = snapshots_of(broker.bootstrap, "from-file")
        assert sorted(saved) == users
        for user, snapshot in saved.items():
            assert snapshot.applied == {}  # positions in a file are no offsets of the log
            assert snapshot.partition == key_partition(user, 4)
        again = backfill_file(
            build_engine(checkpoint, config=engine_config), broker.bootstrap, log, config
        )
        assert again.users_up_to_date == 5 and again.users_written == 0

        monkeypatch.setenv("HYTREC_TEST_CHECKPOINT", str(checkpoint))
        worker = start_worker(
            broker.bootstrap,
            tmp_path / "worker",
            group="from-file",
            engine="test_stream_support:make_logging_model_engine",
        )
        try:
            later = [
                behavior_payload(users[i % 5], i, ts=TS + 1000 + i, item_id=item(i + 7))
                for i in range(20)
            ]
            publish(broker.bootstrap, [(p["user_id"].encode(), encode_behavior(p)) for p in later])
            wait_for(
                lambda: len(applied_events(tmp_path / "worker")) == 20,
                60,
                "the worker to apply the topic's 20 events",
            )
        finally:
            stop_worker(worker)  # a graceful stop checkpoints every state
        final = snapshots_of(broker.bootstrap, "from-file")

    # one engine over the file's events, then the topic's (offsets do not enter a state)
    offline = build_engine(checkpoint, config=engine_config)
    file_then_topic = [(u, i, "click", t) for u, i, t in history]
    file_then_topic += [(p["user_id"], p["item_id"], p["behavior"], p["ts"]) for p in later]
    offline.apply(
        [
            BehaviorEvent(u, i, "c", b, t, partition=0, offset=n, received_at=0.0)
            for n, (u, i, b, t) in enumerate(file_then_topic)
        ]
    )
    expected = offline.store.export_users(users)
    for user in users:
        assert states_agree(final[user].parts, expected[user].parts, 1e-4)[0], user
