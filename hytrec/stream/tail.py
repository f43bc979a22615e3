"""Read the recommendations (or any topic) back: `hytrec tail` and the demo's collector.

The reader assigns itself every partition of the topic instead of joining a consumer group:
it commits nothing and never rebalances a group that the workers use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from hytrec.stream.schemas import Recommendation


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    from_beginning: bool = True,
    max_messages: int | None = None,
    idle_timeout_s: float = 10.0,
    deadline_s: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[ConsumerRecord]:
    """Records of `topic` in per-partition order; stops after `max_messages`, after
    `idle_timeout_s` without a new record, `deadline_s` after the start, or once `stop` is set."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-tail",
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
    )
    try:
        partitions = _partitions(consumer, topic, time.monotonic() + idle_timeout_s)
        consumer.assign(partitions)
        if from_beginning:
            consumer.seek_to_beginning(*partitions)
        else:
            consumer.seek_to_end(*partitions)
        count, started = 0, time.monotonic()
        last_record = started
        while max_messages is None or count < max_messages:
            now = time.monotonic()
            if now - last_record > idle_timeout_s or (deadline_s and now - started > deadline_s):
                return
            if stop is not None and stop.is_set():
                return
            for records in consumer.poll(timeout_ms=100).values():
                for record in records:
                    yield record
                    count += 1
                    last_record = time.monotonic()
                    if max_messages is not None and count >= max_messages:
                        return
    finally:
        consumer.close()


def record_at(
    bootstrap: str, topic: str, partition: int, offset: int, timeout_s: float = 10.0
) -> ConsumerRecord | None:
    """The record at `offset` of a partition, or None when the partition holds none there
    (its log is shorter, or was deleted or compacted past it). Raises TimeoutError when the
    broker does not answer in `timeout_s`. A log that ends exactly at `offset` costs the
    whole timeout (the fetch waits for a record that may still come)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-record-at",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # an offset past the log's end falls back to its start
        fetch_max_wait_ms=50,
    )
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=100).get(tp, []):
                return record if record.offset == offset else None
            if consumer.position(tp) < offset:  # fell back to the start of a shorter log
                return None
        if consumer.end_offsets([tp])[tp] <= offset:  # a log that ends just there
            return None
        raise TimeoutError(f"{topic}[{partition}] did not answer for offset {offset}")
    finally:
        consumer.close()


def read_range(
    bootstrap: str, topic: str, partition: int, start: int, end: int, timeout_s: float = 60.0
) -> list[ConsumerRecord]:
    """The records of a partition from offset `start` up to `end` (exclusive), in order.
    Raises TimeoutError when they cannot be read in `timeout_s`."""
    if end <= start:
        return []
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-read-range",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a start below the log start reads from that start
        fetch_max_wait_ms=50,
    )
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: could not read {start}..{end}")
            for record in consumer.poll(timeout_ms=200).get(tp, []):
                if record.offset >= end:
                    break
                records.append(record)
        return records
    finally:
        consumer.close()


def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: list[int]
) -> dict[int, int]:
    """partition -> the offset `group` committed for it (where its consumers resume); the
    partitions without one are left out. Does not join the group."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-committed",
        group_id=group,
        enable_auto_commit=False,
    )
    try:
        found = {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close(autocommit=False)
    return {p: offset for p, offset in found.items() if offset is not None}


def _partitions(consumer: KafkaConsumer, topic: str, deadline: float) -> list[TopicPartition]:
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic!r} does not exist")
        time.sleep(0.1)


def collect_recommendations(
    bootstrap: str,
    *,
    topic: str = "recommendations",
    until: Callable[[list[Recommendation]], bool] | None = None,
    max_messages: int | None = None,
    idle_timeout_s: float = 10.0,
    deadline_s: float | None = None,
) -> list[Recommendation]:
    """Recommendations from the start of the topic until `until(collected)` is true, or one
    of the limits of `read_topic` is hit."""
    collected: list[Recommendation] = []
    for record in read_topic(
        bootstrap,
        topic,
        max_messages=max_messages,
        idle_timeout_s=idle_timeout_s,
        deadline_s=deadline_s,
    ):
        collected.append(Recommendation.from_json(record.value))
        if until is not None and until(collected):
            break
    return collected


def describe(rec: Recommendation, top: int = 5) -> str:
    """One readable line: who, what, answering which event, how fast."""
    items = ", ".join(
        f"{item} ({score:.3f})"
        for item, score in zip(rec.items[:top], rec.scores[:top], strict=True)
    )
    more = f" +{len(rec.items) - top}" if len(rec.items) > top else ""
    event_time = datetime.fromtimestamp(rec.event_ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
    latency_ms = (rec.produced_at - rec.received_at) * 1000
    return (
        f"user {rec.user_id}: {items}{more}  [model {rec.model_version}, answers "
        f"p{rec.source_partition}@{rec.source_offset} of {event_time}Z, "
        f"{latency_ms:.0f} ms in worker]"
    )
