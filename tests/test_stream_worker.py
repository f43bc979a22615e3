"""The Faust worker against a real broker process, with the test engine of
test_stream_support: every valid event applied once and in per-user order, one
recommendation per changed user answering its newest event, bad input in the DLQ."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict

import pytest
from kafka import KafkaProducer
from test_stream_support import (
    TS,
    applied_events,
    behavior_payload,
    check_applied_once_in_order,
    start_worker,
    stop_worker,
    wait_for,
)

from hytrec.model.data import load_dataset
from hytrec.stream.broker import EmbeddedBroker
from hytrec.stream.replay import ReplayConfig, log_events, publish_events
from hytrec.stream.schemas import Recommendation, encode_behavior, original_bytes
from hytrec.stream.tail import read_topic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(bootstrap, tmp dir) with a broker and one worker running the test engine."""
    tmp = tmp_path_factory.mktemp("worker")
    with EmbeddedBroker() as broker:
        worker = start_worker(broker.bootstrap, tmp)
        try:
            yield broker.bootstrap, tmp
        finally:
            stop_worker(worker)
        log = (tmp / "worker.log").read_text()
        assert worker.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


def records(bootstrap: str, topic: str) -> list:
    return list(read_topic(bootstrap, topic, idle_timeout_s=0.5))


def latest_recommendations(bootstrap: str) -> dict[str, Recommendation]:
    latest = {}
    for record in records(bootstrap, "recommendations"):
        rec = Recommendation.from_json(record.value)
        assert record.key == rec.user_id.encode()
        latest[rec.user_id] = rec
    return latest


def wait_answered(bootstrap: str, sent_by_user: dict, timeout_s: float):
    """The latest recommendation per user, once each answers the user's newest event."""

    def answered():
        latest = latest_recommendations(bootstrap)
        done = all(
            u in latest
            and latest[u].event_ts == events[-1][1]
            and latest[u].items[0] == events[-1][0]
            for u, events in sent_by_user.items()
        )
        return latest if done else None

    return wait_for(answered, timeout_s, "a recommendation answering every user's newest event")


def test_real_taobao_replay_recommends_for_every_user(pipeline, shared_data):
    bootstrap, tmp = pipeline
    log = load_dataset(
        shared_data / "taobao" / "UserBehavior_head84k.csv.gz", on_bad_row="skip", progress=False
    )
    sent = list(itertools.islice(log_events(log), 3000))
    publish_events(sent, bootstrap, ReplayConfig(progress=False))
    sent_by_user = defaultdict(list)
    for e in sent:
        sent_by_user[e["user_id"]].append((e["item_id"], e["ts"]))

    latest = wait_answered(bootstrap, sent_by_user, 90)
    applied = [a for a in applied_events(tmp) if a[2] in sent_by_user]
    assert len(applied) == len(sent)
    check_applied_once_in_order(applied, sent_by_user)
    assert all(rec.model_version == "last-items-1" for rec in latest.values())
    assert not [
        r for r in records(bootstrap, "behaviors-dlq") if json.loads(r.value)["key"] in sent_by_user
    ]


def test_malformed_messages_go_to_the_dlq_and_neighbours_are_processed(pipeline):
    bootstrap, tmp = pipeline

    bad = {  # reason -> (key, value)
        "invalid_json": (b"bad-u0", b'{"user_id": "bad-u0", "item_id": '),
        "not_object": (b"bad-u0", b"[1, 2]"),
        "wrong_type": (b"bad-u1", encode_behavior(behavior_payload("bad-u1", 0, ts="yesterday"))),
        "unknown_field": (b"bad-u1", encode_behavior(behavior_payload("bad-u1", 0, price=3))),
        "missing_field": (
            b"bad-u2",
            b'{"item_id": "x", "category_id": "c", "behavior": "pv", "ts": 1}',
        ),
        "empty_field": (b"", encode_behavior(behavior_payload("", 0))),
        "missing_key": (None, encode_behavior(behavior_payload("bad-u1", 0))),
        "too_deep": (b"bad-u2", b"[" * 2048),
        "ancient_ts": (b"bad-u3", encode_behavior(behavior_payload("bad-u3", 0, ts=0))),
        "key_mismatch": (b"bad-u3", encode_behavior(behavior_payload("bad-u2", 0))),
        "unknown_behavior": (
            b"bad-u3",
            encode_behavior(behavior_payload("bad-u3", 0, behavior="sneeze")),
        ),
        "negative_ts": (b"bad-u0", encode_behavior(behavior_payload("bad-u0", 0, ts=-5))),
        "future_ts": (b"bad-u1", encode_behavior(behavior_payload("bad-u1", 0, ts=2**40))),
        "oversized": (
            b"bad-u2",
            encode_behavior(behavior_payload("bad-u2", 0, extras={"blob": "x" * 70_000})),
        ),
        "empty_value": (b"bad-u3", None),
        "out_of_order": (  # the test engine refuses an event older than the user's newest
            b"bad-u0",
            encode_behavior(behavior_payload("bad-u0", 0, ts=TS - 10**6)),
        ),
    }
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        max_request_size=1 << 20,
    )
    sent_by_user = defaultdict(list)
    bad_items = list(bad.items())
    for i in range(400):
        user = f"bad-u{i % 4}"
        valid = behavior_payload(user, i + 1)
        producer.send("behaviors", key=user.encode(), value=encode_behavior(valid))
        sent_by_user[user].append((valid["item_id"], valid["ts"]))
        if i % 25 == 0 and bad_items:
            key, value = bad_items.pop()[1]
            producer.send("behaviors", key=key, value=value)
    producer.flush()
    producer.close()
    assert not bad_items

    def dead_letters():
        found = [json.loads(r.value) for r in records(bootstrap, "behaviors-dlq")]
        return found if len(found) >= len(bad) else None

    letters = wait_for(dead_letters, 60, f"{len(bad)} dead letters")
    assert sorted(letter["reason_code"] for letter in letters) == sorted(bad)
    for record in records(bootstrap, "behaviors-dlq"):
        letter = json.loads(record.value)
        key, value = bad[letter["reason_code"]]
        assert letter["topic"] == "behaviors" and letter["detail"]
        # the engine's rejects too: the bytes and key as they were consumed (the 70 KB
        # message cut to 16 KiB, with its length and hash)
        kept = original_bytes(letter)
        if value is None:
            assert kept is None
        else:
            assert value.startswith(kept) and letter["payload_bytes"] == len(value)
            assert letter["payload_sha256"] == hashlib.sha256(value).hexdigest()
            assert letter["payload_truncated"] == (len(kept) < len(value))
        assert original_bytes(letter, "key") == key
        assert record.key == key  # the dead letter keeps the original key (None: none)

    wait_for(
        lambda: sum(a[2] in sent_by_user for a in applied_events(tmp)) >= 400,
        60,
        "the 400 valid events",
    )
    applied = [a for a in applied_events(tmp) if a[2] in sent_by_user]
    check_applied_once_in_order(applied, sent_by_user)
    wait_answered(bootstrap, sent_by_user, 30)


def test_a_failing_batch_is_not_acknowledged_and_is_consumed_again(tmp_path):
    """An engine error stops the worker before the batch is acknowledged; the next worker
    of the group consumes that batch again (at-least-once), so no event is lost."""
    with EmbeddedBroker() as broker:
        failing = start_worker(
            broker.bootstrap,
            tmp_path / "first",
            group="crash",
            engine="test_stream_support:make_failing_engine",
        )
        events = [
            {
                "user_id": f"c{i % 5}",
                "item_id": "boom" if i == 40 else f"i{i}",
                "category_id": "c",
                "behavior": "pv",
                "ts": TS + i,
            }
            for i in range(60)
        ]
        publish_events(events, broker.bootstrap, ReplayConfig(progress=False))
        wait_for(lambda: failing.poll() is not None, 60, "the failing worker to stop")
        assert failing.returncode != 0
        first = {(p, o) for p, o, *_ in applied_events(tmp_path / "first")}
        assert "RuntimeError: engine bug" in (tmp_path / "first" / "worker.log").read_text()

        second = start_worker(broker.bootstrap, tmp_path / "second", group="crash")
        try:
            wait_for(
                lambda: any(a[3] == "boom" for a in applied_events(tmp_path / "second")),
                60,
                "the failed batch to be consumed again",
            )
            all_positions = {
                (r.partition, r.offset)
                for r in read_topic(
                    broker.bootstrap, "behaviors", max_messages=len(events), idle_timeout_s=5
                )
            }
            wait_for(
                lambda: (
                    first | {(p, o) for p, o, *_ in applied_events(tmp_path / "second")}
                    == all_positions
                ),
                30,
                "every event applied",
            )
        finally:
            stop_worker(second)
