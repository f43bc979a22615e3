"""What a real Kafka deployment throws at the worker, against real broker processes and the
model engine (issue 19): an adversarial corpus of messages, then a broker killed with -9
under load and a new one on the same port; and a corrupt newest snapshot on restore. The
worker never exits, every consumed message is accounted for (applied, dead-lettered with
a reason, or skipped as a replay), and no event is silently lost."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter, defaultdict

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from test_stream_support import (
    applied_events,
    behavior_payload,
    check_applied_once_in_order,
    start_worker,
    stop_worker,
    wait_for,
)

from hytrec.model.events import Vocabulary
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.broker import EmbeddedBroker, TopicConfig, ensure_topics, free_port
from hytrec.stream.engine import EngineConfig, build_engine
from hytrec.stream.newlog import TopicIds
from hytrec.stream.schemas import REASONS, encode_behavior
from hytrec.stream.snapshots import decode_snapshot, encode_snapshot, read_snapshots
from hytrec.stream.tail import read_topic

pytestmark = pytest.mark.integration
ITEMS = 20_000  # the model knows item-0 .. item-19999; others are new in the shop
OUTCOMES = ("consumed", "applied", "dead_lettered", "replays_skipped", "unaccounted")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    items, categories = Vocabulary(f"item-{i}" for i in range(ITEMS)), Vocabulary(["c"])
    cfg = HyTRecConfig(num_items=len(items), num_categories=2, d_model=16, dropout=0)
    return HyTRec(cfg, items, categories).save(tmp_path_factory.mktemp("adversarial") / "model")


def producer(bootstrap: str, **options) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        max_request_size=4 << 20,
        linger_ms=5,
        **options,
    )


def scrape(url: str) -> dict[str, float]:
    """The worker's metrics; {} while its web server is not up."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return {}
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    }


def accounting(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """partition -> outcome -> count, from /metrics."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, value in metrics.items():
        if name.startswith("hytrec_partition_events_total{"):
            labels = dict(part.split("=") for part in name[name.index("{") + 1 : -1].split(","))
            out[labels["partition"].strip('"')][labels["outcome"].strip('"')] = value
        elif name.startswith("hytrec_partition_events_in_flight{"):
            out[name.split('"')[1]]["in_flight"] = value
    return out


def balanced(account: dict[str, dict[str, float]]) -> bool:
    return all(
        c["consumed"] == c["applied"] + c["dead_lettered"] + c["replays_skipped"] + c["in_flight"]
        and c["unaccounted"] == 0
        for c in account.values()
    )


class Corpus:
    """Messages with what must become of each: applied (valid events, by item id) or a
    dead letter (its reason and key)."""

    def __init__(self):
        self.messages: list[tuple[bytes | None, bytes | None]] = []
        self.applied: dict[str, list[tuple[str, int]]] = defaultdict(list)  # user -> (item, ts)
        self.letters: Counter = Counter()  # (reason, key) -> count
        self.i = 0

    def valid(self, user: str, **change) -> dict:
        self.i += 1
        payload = behavior_payload(user, self.i, **change)
        self.messages.append((user.encode(), encode_behavior(payload)))
        self.applied[user].append((payload["item_id"], payload["ts"]))
        return payload

    def bad(self, reason: str, key: bytes | None, value: bytes | None) -> None:
        self.messages.append((key, value))
        self.letters[(reason, key[:1024] if key else key)] += 1


def adversarial_corpus(now: int) -> Corpus:
    """Every case of issue 19 and those covered before, amid valid events."""
    c = Corpus()
    for round_ in range(3):
        for u in range(6):
            c.valid(f"user-{u}", ts=now - 3600 + 60 * (round_ * 6 + u))
    # a 1 MB message, and 180 KB of control bytes (1 MB once JSON-escaped): dead letters
    # that must stay small enough to publish
    c.bad("oversized", b"user-0", b"x" * 1_000_000)
    blob = encode_behavior(behavior_payload("user-0", 0, extras={"b": "\x01" * 180_000}))
    c.bad("oversized", b"user-0", blob)
    c.bad("too_deep", b"user-1", b"[" * 2048)  # RecursionError in json.loads before
    c.bad("invalid_json", b"user-1", b'{"user_id": "user-1", "item_id": ')
    c.bad("invalid_json", b"user-1", b'{"user_id": "\xff\xfe"}')
    c.bad("not_object", b"user-2", b"[1, 2]")
    c.bad("empty_value", b"user-2", None)
    c.bad("wrong_type", b"user-2", encode_behavior(behavior_payload("user-2", 0, ts="soon")))
    c.bad("unknown_field", b"user-3", encode_behavior(behavior_payload("user-3", 0, price=1)))
    c.bad("too_long", b"user-3", encode_behavior(behavior_payload("u" * 300, 0)))
    c.bad(
        "unknown_behavior", b"user-3", encode_behavior(behavior_payload("user-3", 0, behavior="x"))
    )
    # keyless and mis-keyed: they would land on another partition than the user's
    c.bad("missing_key", None, encode_behavior(behavior_payload("user-4", 0, ts=now)))
    c.bad("key_mismatch", b"user-5", encode_behavior(behavior_payload("user-4", 0, ts=now)))
    c.bad("key_mismatch", b"k" * 5000, encode_behavior(behavior_payload("user-4", 0, ts=now)))
    # time: 1970, a clock 3 h fast, within the allowance then real time (never blocked)
    c.bad("ancient_ts", b"user-5", encode_behavior(behavior_payload("user-5", 0, ts=0)))
    c.bad("negative_ts", b"user-5", encode_behavior(behavior_payload("user-5", 0, ts=-1)))
    c.bad("future_ts", b"user-5", encode_behavior(behavior_payload("user-5", 0, ts=now + 3 * 3600)))
    c.valid("skewed", ts=now + 200)  # a client 200 s fast: inside the 300 s allowance
    c.valid("skewed", ts=now)  # its next event on a true clock: still applied
    c.valid("skewed", ts=now + 1)
    c.bad("out_of_order", b"skewed", encode_behavior(behavior_payload("skewed", 0, ts=now - 3600)))
    # events sharing a second, items new in the shop, a producer retry's duplicate
    for _ in range(3):
        c.valid("same-second", ts=now - 10)
    c.valid("shopper", ts=now - 5, item_id="brand-new-item-1")
    c.valid("shopper", ts=now - 4, item_id="brand-new-item-2")
    retried = c.valid("retried", ts=now - 3)
    c.messages.append(c.messages[-1])  # the same bytes again: applied twice (README)
    c.applied["retried"].append((retried["item_id"], retried["ts"]))
    for u in range(6):
        c.valid(f"user-{u}", ts=now - 2)
    return c


def test_adversarial_corpus_then_a_broker_killed_under_load(checkpoint, tmp_path, monkeypatch):
    """The worker runs the model engine and never exits. Phase 1, the corpus: every valid
    event is applied once in order, every other message is one dead letter with its reason
    and its original key, and the per-partition accounting balances exactly. Phase 2, the
    broker is killed with -9 while events flow and a new one (empty: memory storage) starts
    on the same port: the worker reconnects, finds the new log, and applies every event of
    it (none skipped as a replay of the old log's offsets)."""
    monkeypatch.setenv("HYTREC_TEST_CHECKPOINT", str(checkpoint))
    port, web = free_port(), free_port()
    url = f"http://127.0.0.1:{web}/metrics"
    broker = EmbeddedBroker(port=port)
    broker.start()
    args = ["--web-port", str(web), "--snapshot-interval", "0.5"]
    worker = start_worker(
        broker.bootstrap,
        tmp_path,
        engine="test_stream_support:make_logging_model_engine",
        extra_args=args,
    )
    log_path = tmp_path / "worker.log"
    try:
        # ---------------------------------------------------------------- the corpus
        now = int(time.time())
        corpus = adversarial_corpus(now)
        out = producer(broker.bootstrap)
        for key, value in corpus.messages:
            out.send("behaviors", key=key, value=value)
        out.flush()
        out.close()
        sent = len(corpus.messages)

        def settled():
            account = accounting(scrape(url)) if worker.poll() is None else {}
            total = {
                k: sum(c.get(k, 0) for c in account.values()) for k in ("consumed", "in_flight")
            }
            return account if total["consumed"] == sent and total["in_flight"] == 0 else None

        account = wait_for(settled, 90, f"the worker to settle all {sent} messages", 0.5)
        assert balanced(account), account
        letters = list(read_topic(broker.bootstrap, "behaviors-dlq", idle_timeout_s=1.0))
        got = Counter((json.loads(r.value)["reason_code"], r.key) for r in letters)
        assert got == corpus.letters
        assert all(reason in REASONS for reason, _ in got)
        assert max(len(r.value) for r in letters) < 120_000  # a 1 MB message: a small letter
        total = {k: sum(c[k] for c in account.values()) for k in OUTCOMES}
        assert total["dead_lettered"] == sum(corpus.letters.values())
        assert total["applied"] == sum(len(v) for v in corpus.applied.values())
        assert total["replays_skipped"] == 0 and total["unaccounted"] == 0
        # the producer's duplicate is two messages: applied twice, like any two events
        check_applied_once_in_order(applied_events(tmp_path), corpus.applied)
        assert worker.poll() is None, log_path.read_text()[-3000:]

        # ---------------------------------------------------------------- kill -9 the broker
        users = [f"load-{u}" for u in range(8)]
        confirmed: list[tuple[float, dict]] = []  # (when, payload) of every delivered event
        stop = threading.Event()

        def produce() -> None:
            out, i = None, 100_000
            while not stop.is_set():
                try:
                    if out is None:
                        out = producer(broker_address, request_timeout_ms=3000, retries=10)
                    user = users[i % len(users)]
                    payload = behavior_payload(user, i, ts=int(time.time()))
                    future = out.send(
                        "behaviors", key=user.encode(), value=encode_behavior(payload)
                    )
                    future.get(timeout=10)
                    confirmed.append((time.monotonic(), payload))
                    i += 1
                except Exception:  # noqa: BLE001 - the broker is down: try again
                    if out is not None:
                        out.close(timeout=1)
                    out = None
                    time.sleep(0.2)
                time.sleep(0.005)
            if out is not None:
                out.close()

        broker_address = broker.bootstrap
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        wait_for(lambda: len(confirmed) > 300, 60, "events flowing")
        killed_at = time.monotonic()
        os.kill(broker.pid, signal.SIGKILL)
        broker.process.wait()
        broker.process = None
        lines_before = len(log_path.read_text().splitlines())
        time.sleep(5)  # the worker and the producer find the broker gone
        broker = EmbeddedBroker(port=port)
        broker.start()
        restarted_at = time.monotonic()
        wait_for(lambda: sum(t > restarted_at for t, _ in confirmed) > 300, 90, "the new log")
        stop.set()
        thread.join(30)

        new_log = {
            json.loads(r.value)["item_id"]
            for r in read_topic(broker.bootstrap, "behaviors", idle_timeout_s=1.0)
        }
        assert {p["item_id"] for t, p in confirmed if t > restarted_at} <= new_log

        def applied_new_log():
            items = {item for _, _, _, item, _ in applied_events(tmp_path)}
            return new_log <= items

        wait_for(applied_new_log, 90, f"the {len(new_log)} events of the new log applied")
        applied = applied_events(tmp_path)
        twice = {item for item, n in Counter(a[3] for a in applied).items() if n > 1}
        # the corpus's duplicate, and at most the sends in flight at the kill, which the
        # producer retried into the new log after the old one had taken them
        assert corpus.applied["retried"][0][0] in twice and len(twice) <= 3, twice
        story = log_path.read_text()
        assert "is a new log" in story, story[-3000:]
        # the outage is logged once per change of state, not dozens of lines a second
        outage = [
            line
            for line in story.splitlines()[lines_before:]
            if "[WARNING]" in line or "[ERROR]" in line
        ]
        assert len(outage) < 60, "\n".join(outage)
        assert worker.poll() is None, story[-3000:]
        account = wait_for(
            lambda: (a := accounting(scrape(url))) and balanced(a) and a, 30, "balance"
        )
        total = {
            k: sum(c.get(k, 0) for c in account.values()) for k in ("in_flight", "unaccounted")
        }
        assert total == {"in_flight": 0, "unaccounted": 0}, account
        print(f"outage and recovery: {time.monotonic() - killed_at:.1f} s, {len(outage)} lines")
    finally:
        stop_worker(worker)
        broker.stop()
    assert worker.returncode == 0, log_path.read_text()[-3000:]


def test_a_corrupt_newest_snapshot_falls_back_and_loses_no_event(checkpoint, tmp_path, monkeypatch):
    """User u's newest snapshot cannot be decoded; its previous one covers fewer events, and
    the group's committed offset is past the newest. The worker restores the older state,
    replays u's events between it and the committed offset from `behaviors`, then consumes
    on: u's final state holds every event, each once (before the fix the events between
    the two snapshots were lost)."""
    monkeypatch.setenv("HYTREC_TEST_CHECKPOINT", str(checkpoint))
    group = "corrupt"
    topics = TopicConfig()
    with EmbeddedBroker(topics=topics) as broker:
        ensure_topics(broker.bootstrap, topics, group=group)
        out = producer(broker.bootstrap)
        now = int(time.time())
        positions, payloads = [], []
        for i in range(30):
            user = "u" if i % 2 == 0 else "v"
            payload = behavior_payload(user, i, ts=now - 1000 + i)
            meta = out.send("behaviors", key=user.encode(), value=encode_behavior(payload))
            positions.append(meta.get(timeout=10))
            payloads.append(payload)
        out.flush()
        mine = [(m, p) for m, p in zip(positions, payloads, strict=True) if p["user_id"] == "u"]
        partition = mine[0][0].partition
        assert all(m.partition == partition for m, _ in mine)

        # the previous owner: a snapshot after u's first 5 events (valid), one after its
        # first 10 (corrupt on the way), and its offsets committed past the 10th
        engine = build_engine(checkpoint, config=EngineConfig(device="cpu"))
        log_id = TopicIds(broker.bootstrap)("behaviors")

        def snapshot_after(n: int) -> bytes:
            events = [as_event(p, m) for m, p in mine[:n]]
            engine.drop_users(["u"])
            engine.process(events)
            (snap,) = engine.export_states({"u": partition}, log=log_id)
            return encode_snapshot(snap)

        state_topic = topics.state_topic(group)
        out.send(state_topic, key=b"u", value=snapshot_after(5), partition=partition)
        out.send(state_topic, key=b"u", value=snapshot_after(10)[:-100], partition=partition)
        out.flush()
        out.close()
        committed = mine[9][0].offset + 1
        commit(broker.bootstrap, group, partition, committed)

        worker = start_worker(
            broker.bootstrap,
            tmp_path,
            group=group,
            engine="test_stream_support:make_logging_model_engine",
            extra_args=["--snapshot-interval", "0.2"],
        )
        try:

            def u_complete():
                found = read_snapshots(broker.bootstrap, state_topic, [partition], log_id=log_id)
                kept = found.latest.get("u")
                return kept is not None and kept[0].applied_offset == mine[-1][0].offset and kept

            header, value = wait_for(u_complete, 90, "u's snapshot covering all its events")
        finally:
            stop_worker(worker)
        story = (tmp_path / "worker.log").read_text()
        assert worker.returncode == 0, story[-3000:]
    assert int(decode_snapshot(value).parts["count"]) == len(mine), story[-3000:]
    assert "corrupt snapshot" in story and "'u'" in story
    applied_u = [a for a in applied_events(tmp_path) if a[2] == "u"]
    # events 6..10 replayed from behaviors, 11..15 consumed: each once
    assert [a[1] for a in applied_u] == [m.offset for m, _ in mine[5:]]


def as_event(payload: dict, meta):
    from hytrec.stream.schemas import BehaviorEvent

    return BehaviorEvent(
        user_id=payload["user_id"],
        item_id=payload["item_id"],
        category_id=payload["category_id"],
        behavior=payload["behavior"],
        ts=payload["ts"],
        partition=meta.partition,
        offset=meta.offset,
        received_at=0.0,
    )


def commit(bootstrap: str, group: str, partition: int, offset: int) -> None:
    """Commit `offset` for the group, as its previous member would have."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tp = TopicPartition("behaviors", partition)
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
        assert consumer.committed(tp) == offset
    finally:
        consumer.close(autocommit=False)
