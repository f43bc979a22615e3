"""Replay publishes a real log keyed by user, in time order, nothing lost; tail reads back."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from test_stream_support import REPO

from hytrec.model.data import load_dataset
from hytrec.stream.broker import EmbeddedBroker
from hytrec.stream.replay import ReplayConfig, log_events, publish_events
from hytrec.stream.schemas import Recommendation
from hytrec.stream.tail import collect_recommendations, read_topic

pytestmark = pytest.mark.integration
N_EVENTS = 3000


@pytest.fixture
def broker():
    with EmbeddedBroker() as running:
        yield running


def test_replay_of_real_taobao_events_keeps_per_user_order(broker, shared_data):
    log = load_dataset(
        shared_data / "taobao" / "UserBehavior_head84k.csv.gz", on_bad_row="skip", progress=False
    )
    sent = list(itertools.islice(log_events(log), N_EVENTS))
    assert [e["ts"] for e in sent] == sorted(e["ts"] for e in sent)  # global time order
    report = publish_events(sent, broker.bootstrap, ReplayConfig(progress=False))
    assert report.events == N_EVENTS

    received = list(
        read_topic(broker.bootstrap, "behaviors", max_messages=N_EVENTS, idle_timeout_s=10)
    )
    assert len(received) == N_EVENTS
    by_user = defaultdict(list)
    partition_of = {}
    for record in received:
        payload = json.loads(record.value)
        assert record.key == payload["user_id"].encode()
        assert partition_of.setdefault(payload["user_id"], record.partition) == record.partition
        by_user[payload["user_id"]].append((record.offset, payload))
    expected = defaultdict(list)
    for event in sent:
        expected[event["user_id"]].append(event)
    assert {
        u: [p for _, p in sorted(rows, key=lambda r: r[0])] for u, rows in by_user.items()
    } == dict(expected)


def test_replay_command_honours_limit_and_tail_command_prints_json(broker, tmp_path):
    events = tmp_path / "events.csv"  # the Taobao CSV format, read by the project's loaders
    events.write_text(
        "".join(f"{u},{100 + i},7,pv,{1511544000 + i}\n" for i, u in enumerate([1, 2, 1, 3, 2, 1]))
    )
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "hytrec.cli",
            "replay",
            str(events),
            "--bootstrap",
            broker.bootstrap,
            "--limit",
            "4",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout.splitlines()[-1])["events"] == 4
    assert len(list(read_topic(broker.bootstrap, "behaviors", idle_timeout_s=1))) == 4

    rec = Recommendation(
        user_id="1",
        items=["9", "8"],
        scores=[2.0, 1.0],
        model_version="v",
        source_partition=0,
        source_offset=3,
        event_ts=1511544003,
        received_at=1.0,
        produced_at=1.01,
    )
    publish_to(broker.bootstrap, "recommendations", rec.to_json(), key=b"1")
    tail = subprocess.run(
        [
            sys.executable,
            "-m",
            "hytrec.cli",
            "tail",
            "--bootstrap",
            broker.bootstrap,
            "--json",
            "--max",
            "1",
            "--timeout",
            "10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tail.returncode == 0, tail.stderr
    assert Recommendation.from_json(tail.stdout.strip().encode()) == rec
    assert collect_recommendations(broker.bootstrap, until=lambda got: len(got) == 1) == [rec]


def test_replay_command_publishes_a_file_of_ones_own_through_columns(broker, tmp_path):
    events = tmp_path / "shop.tsv"  # a tab between fields by the suffix; ISO times; own words
    events.write_text(
        "customer\tsku\twhen\taction\n"
        "c1\tA-1\t2024-03-01T10:00:00Z\tview\n"
        "c2\tB-7\t2024-03-01T09:00:00+01:00\tbasket\n"
        "c1\tB-7\t2024-03-01T11:30:00Z\torder\n"
    )
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "hytrec.cli",
            "replay",
            str(events),
            "--columns",
            "user=customer,item=sku,ts=when,behavior=action",
            "--behaviors",
            "add_to_cart=basket;payment=order",
            "--time-format",
            "iso",
            "--bootstrap",
            broker.bootstrap,
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    got = [json.loads(r.value) for r in read_topic(broker.bootstrap, "behaviors", idle_timeout_s=2)]
    at = 1709287200  # 2024-03-01 10:00 UTC
    assert sorted((e["ts"], e["user_id"], e["item_id"], e["behavior"]) for e in got) == [
        (at - 7200, "c2", "B-7", "add_to_cart"),
        (at, "c1", "A-1", "product_click"),
        (at + 5400, "c1", "B-7", "payment"),
    ]


def publish_to(bootstrap: str, topic: str, value: bytes, key: bytes | None = None) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    producer.send(topic, key=key, value=value).get(timeout=10)
    producer.close()


@pytest.mark.parametrize("command", [["tail"], ["replay", "taobao"]])
def test_tail_and_replay_without_a_broker_fail_fast_and_say_why(command):
    from hytrec.stream.broker import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "hytrec.cli", *command, "--bootstrap", address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert f"no Kafka broker answers at {address}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - started < 20  # no client waiting 30 s for a broker
