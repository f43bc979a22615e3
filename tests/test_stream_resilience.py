"""The worker under hostile conditions, against real broker processes: a burst of thousands
of bad messages (all in the DLQ with their reasons, valid neighbours unaffected), and a
graceful stop long before the next checkpoint is due: the worker checkpoints at once, and
its successor restores every user instead of replaying their events. (A broker killed under
load: `test_stream_adversarial.py`.)"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch
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

from hytrec.model.events import Vocabulary
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.broker import EmbeddedBroker
from hytrec.stream.newlog import Fingerprint
from hytrec.stream.schemas import MAX_ID_CHARS, encode_behavior
from hytrec.stream.tail import read_topic, record_at

pytestmark = pytest.mark.integration


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        max_request_size=1 << 20,
        linger_ms=5,
    )


def send_valid(bootstrap: str, users: list[str], first: int, count: int, sent_by_user) -> None:
    out = producer(bootstrap)
    for i in range(first, first + count):
        user = users[i % len(users)]
        out.send("behaviors", key=user.encode(), value=encode_behavior(behavior_payload(user, i)))
        sent_by_user[user].append((f"item-{i}", TS + i))
    out.flush()
    out.close()


def stopped_cleanly(worker, log_path) -> None:
    stop_worker(worker)
    log = log_path.read_text()
    assert worker.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def bad_message(i: int) -> tuple[str, bytes | None, bytes | None]:
    """(expected reason, key, value): the i-th of a cycle through every kind of bad input."""
    user = f"burst-{i % 7}"
    key = user.encode()
    kinds = [
        ("invalid_json", user.encode(), encode_behavior(behavior_payload(user, i))[:-3]),
        ("not_object", None, b'"just a string"'),
        ("wrong_type", None, encode_behavior(behavior_payload(user, i, ts=str(TS)))),
        ("missing_field", None, b'{"user_id": "u", "item_id": "i", "behavior": "pv"}'),
        ("unknown_field", None, encode_behavior(behavior_payload(user, i, price=9.5))),
        ("too_long", None, encode_behavior(behavior_payload("u" * (MAX_ID_CHARS + 1), i))),
        ("negative_ts", key, encode_behavior(behavior_payload(user, i, ts=-i - 1))),
        ("future_ts", key, encode_behavior(behavior_payload(user, i, ts=TS * 1000))),
        ("oversized", None, encode_behavior(behavior_payload(user, i, extras={"x": "y" * 70_000}))),
        ("empty_value", key, None),
        ("too_deep", key, b"[" * (2048 + i % 100)),
        ("ancient_ts", key, encode_behavior(behavior_payload(user, i, ts=i % 1000))),
        ("missing_key", None, encode_behavior(behavior_payload(user, i))),
        ("key_mismatch", b"someone-else", encode_behavior(behavior_payload(user, i))),
    ]
    return kinds[i % len(kinds)]


def test_a_burst_of_thousands_of_bad_messages_lands_in_the_dlq_and_spares_valid_events(
    tmp_path,
):
    bad_count, users = 3000, [f"good-{u}" for u in range(5)]
    with EmbeddedBroker() as broker:
        worker = start_worker(broker.bootstrap, tmp_path, batch_size=256)
        try:
            sent_by_user: dict[str, list] = defaultdict(list)
            expected = Counter()
            out = producer(broker.bootstrap)
            for i in range(bad_count):
                reason, key, value = bad_message(i)
                out.send("behaviors", key=key, value=value)
                expected[reason] += 1
                if i % 10 == 0:  # valid events amid the burst
                    user = users[i % len(users)]
                    out.send(
                        "behaviors",
                        key=user.encode(),
                        value=encode_behavior(behavior_payload(user, i)),
                    )
                    sent_by_user[user].append((f"item-{i}", TS + i))
            out.flush()
            out.close()

            def all_letters():
                found = list(read_topic(broker.bootstrap, "behaviors-dlq", idle_timeout_s=1.0))
                return found if len(found) >= bad_count else None

            letters = wait_for(all_letters, 120, f"{bad_count} dead letters", interval_s=0.5)
            reasons = Counter(json.loads(r.value)["reason_code"] for r in letters)
            assert reasons == expected
            wait_for(
                lambda: sum(a[2] in sent_by_user for a in applied_events(tmp_path)) >= 300,
                60,
                "the 300 valid events",
            )
            check_applied_once_in_order(applied_events(tmp_path), sent_by_user)
            assert worker.poll() is None, "the worker stopped"
        finally:
            stopped_cleanly(worker, tmp_path / "worker.log")


def test_record_at_finds_a_record_and_tells_a_missing_one():
    """The probe behind new-log detection: the record at an offset, or None past the log's
    end; a record's fingerprint is the same read by Faust (seconds) or kafka-python (ms)."""
    with EmbeddedBroker() as broker:
        out = producer(broker.bootstrap)
        for i in range(3):
            payload = behavior_payload("probe", i)
            out.send("behaviors", key=b"probe", value=encode_behavior(payload), partition=1)
        out.flush()
        out.close()
        record = record_at(broker.bootstrap, "behaviors", 1, 1)
        assert record is not None and record.offset == 1
        assert json.loads(record.value)["item_id"] == "item-1"
        assert record_at(broker.bootstrap, "behaviors", 1, 7) is None  # past the end
        assert record_at(broker.bootstrap, "behaviors", 2, 0, timeout_s=1.0) is None  # empty

        as_faust = SimpleNamespace(
            offset=1, key=record.key, value=record.value, timestamp=record.timestamp / 1000
        )
        assert Fingerprint.of(as_faust) == Fingerprint.of(record)
        other = SimpleNamespace(**{**vars(as_faust), "timestamp": as_faust.timestamp + 1})
        assert Fingerprint.of(other) != Fingerprint.of(record)


def test_a_graceful_stop_checkpoints_at_once_and_the_successor_restores(tmp_path):
    users = [f"u{n}" for n in range(10)]
    torch.manual_seed(0)
    items, categories = Vocabulary(f"item-{i}" for i in range(300)), Vocabulary(["c"])
    cfg = HyTRecConfig(num_items=len(items), num_categories=len(categories), d_model=16, dropout=0)
    checkpoint = HyTRec(cfg, items, categories).save(tmp_path / "checkpoint")
    # far longer than the test: only the stop itself can write the checkpoint
    args = ["--checkpoint", str(checkpoint), "--snapshot-interval", "600"]
    sent_by_user = defaultdict(list)

    def answered_through(bootstrap, count):
        answered = {
            json.loads(r.value)["event_ts"]
            for r in read_topic(bootstrap, "recommendations", idle_timeout_s=0.5)
        }
        return TS + count - 1 in answered and all(
            TS + i in answered for i in range(count - 10, count)
        )

    def batch_lines(name):
        log = (tmp_path / name / "worker.log").read_text()
        return log, re.findall(r"batches \d+, events in (\d+)", log)

    with EmbeddedBroker() as broker:
        first = start_worker(broker.bootstrap, tmp_path / "first", engine=None, extra_args=args)
        send_valid(broker.bootstrap, users, 0, 200, sent_by_user)
        wait_for(lambda: answered_through(broker.bootstrap, 200), 90, "the first 200 answered")
        started = time.monotonic()
        stopped_cleanly(first, tmp_path / "first" / "worker.log")
        stop_seconds = time.monotonic() - started

        second = start_worker(broker.bootstrap, tmp_path / "second", engine=None, extra_args=args)
        send_valid(broker.bootstrap, users, 200, 10, sent_by_user)
        wait_for(lambda: answered_through(broker.bootstrap, 210), 90, "the next 10 answered")
        stopped_cleanly(second, tmp_path / "second" / "worker.log")

    # stop_worker would have killed it after 20 s: it stopped on its own, checkpoint written
    assert stop_seconds < 15, f"the graceful stop took {stop_seconds:.1f} s"
    log, events_in = batch_lines("second")
    assert "restored 10 of 10 users" in log, log[-3000:]
    # the successor consumed only the 10 new events: the first 200 were committed
    assert events_in and int(events_in[-1]) == 10, events_in
    # each worker's last word, once, where every message it consumed went
    for name, consumed in (("first", 200), ("second", 10)):
        log = (tmp_path / name / "worker.log").read_text()
        stops = re.findall(r"stopping; accounting: consumed (\d+) = .*; unaccounted (\d+)", log)
        assert stops == [(str(consumed), "0")], stops
