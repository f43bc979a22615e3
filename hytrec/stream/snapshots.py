"""Snapshots of user state in the `user-state` topic: encoding, decoding and reading back.

A snapshot record holds one user's whole serving state after some prefix of its events:

    key    user id (UTF-8)
    value  b"HYS1", a 4-byte little-endian header size, a JSON header, then the raw
           little-endian bytes of the user's state tensors (`StreamState.parts()`), in the
           header's order. The header: format, user, applied_offset (the last `behaviors`
           offset applied to the state), partition, model_version, written_at and
           tensors: [[name, dtype, shape], ...]; a reader matches the parts by name.
           (safetensors did the same job 8x slower: 0.28 ms per 42 KB user, which a
           checkpoint of 800 users felt.)

The topic is co-partitioned with `behaviors` (same partition count; a user's snapshot goes
to the partition its events come from), so the owner of a `behaviors` partition finds all
its users in the same-numbered `user-state` partition. It is compacted on real Kafka (the
latest snapshot per user is what counts); the reader never relies on that: it keeps, per
user, the record with the highest applied offset, which is also right when an old owner
(a zombie) writes late.

Where the partition ends. Tansu answers ListOffsets(LATEST) with "base offset of the last
batch + 1" when that batch holds several records, which is short of the real end, so the
reader does not ask for end offsets at all. It first appends a small sentinel record (key
`SENTINEL_KEY`) to each partition it reads and takes the offset the broker gave it: every
snapshot written before (all of a previous owner's, whose writes were confirmed before it
acknowledged their events) lies below that offset, so reading up to and including the
sentinel reads everything. Sentinels share one key, so compaction keeps one per partition;
readers skip them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

log = logging.getLogger(__name__)

FORMAT = "hytrec-user-state/2"  # /2: named tensors
SENTINEL_KEY = b"\x00hytrec-sentinel"


@dataclass(slots=True)
class UserSnapshot:
    user_id: str
    applied_offset: int  # the last behaviours offset applied to `tensors`
    partition: int  # the user's behaviours partition (= its user-state partition)
    model_version: str
    parts: dict[str, torch.Tensor]  # StreamState.parts() by name, without the slot dimension
    written_at: float = 0.0


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    user_id: str
    applied_offset: int
    partition: int
    model_version: str


MAGIC = b"HYS1"
_DTYPES = {torch.float32: "f4", torch.float64: "f8", torch.int64: "i8", torch.int32: "i4"}
_TORCH = {name: dtype for dtype, name in _DTYPES.items()}


def encode_snapshot(snapshot: UserSnapshot) -> bytes:
    arrays = {n: t.detach().to("cpu").contiguous() for n, t in snapshot.parts.items()}
    header = json.dumps(
        {
            "format": FORMAT,
            "user": snapshot.user_id,
            "applied_offset": snapshot.applied_offset,
            "partition": snapshot.partition,
            "model_version": snapshot.model_version,
            "written_at": snapshot.written_at or time.time(),
            "tensors": [[n, _DTYPES[t.dtype], list(t.shape)] for n, t in arrays.items()],
        },
        separators=(",", ":"),
    ).encode()
    parts = [MAGIC, len(header).to_bytes(4, "little"), header]
    parts += [
        t.numpy().astype("<" + _DTYPES[t.dtype], copy=False).tobytes() for t in arrays.values()
    ]
    return b"".join(parts)


def _header(value: bytes) -> tuple[dict, int]:
    if value[:4] != MAGIC or len(value) < 8:
        raise ValueError("not a user-state snapshot")
    size = int.from_bytes(value[4:8], "little")
    header = json.loads(value[8 : 8 + size])
    if header.get("format") != FORMAT:
        raise ValueError(f"unknown snapshot format {header.get('format')!r}")
    return header, 8 + size


def decode_header(value: bytes) -> SnapshotHeader:
    """The metadata of a snapshot record, without decoding its tensors."""
    header, _ = _header(value)
    return SnapshotHeader(
        user_id=header["user"],
        applied_offset=int(header["applied_offset"]),
        partition=int(header["partition"]),
        model_version=header["model_version"],
    )


def decode_snapshot(value: bytes) -> UserSnapshot:
    header, at = _header(value)
    parts = {}
    for name, dtype, shape in header["tensors"]:
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(value, dtype=np.dtype("<" + dtype), count=count, offset=at)
        parts[name] = torch.from_numpy(array.reshape(shape).copy()).to(_TORCH[dtype])
        at += array.nbytes
    if at != len(value):
        raise ValueError("snapshot size does not match its header")
    return UserSnapshot(
        user_id=header["user"],
        applied_offset=int(header["applied_offset"]),
        partition=int(header["partition"]),
        model_version=header["model_version"],
        parts=parts,
        written_at=float(header.get("written_at", 0.0)),
    )


def append_sentinels(
    bootstrap: str, topic: str, partitions: Sequence[int], timeout_s: float = 30.0
) -> dict[int, int]:
    """Append a sentinel to each partition; partition -> its offset (everything written
    before it lies below)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-snapshot-sentinel",
        acks="all",
        enable_idempotence=False,  # Tansu refuses InitProducerId
        max_in_flight_requests_per_connection=1,
        linger_ms=0,
    )
    try:
        futures = {
            p: producer.send(topic, key=SENTINEL_KEY, value=b"sentinel", partition=p)
            for p in partitions
        }
        producer.flush(timeout=timeout_s)
        return {p: future.get(timeout=timeout_s).offset for p, future in futures.items()}
    finally:
        producer.close(timeout=5)


def read_latest(
    bootstrap: str,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    timeout_s: float = 60.0,
) -> dict[str, tuple[SnapshotHeader, bytes]]:
    """Read partition p of `topic` from offset start to end (exclusive) for each
    p -> (start, end) of `ranges`; the latest snapshot of every user found (the one with the
    highest applied offset), as (header, raw value). Raises TimeoutError if a range cannot
    be read in `timeout_s`."""
    latest: dict[str, tuple[SnapshotHeader, bytes]] = {}
    todo = {p: (start, end) for p, (start, end) in ranges.items() if end > start}
    if not todo:
        return latest
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-snapshot-reader",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a start below the log start (compacted) reads from it
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=8 * 2**20,
        fetch_max_bytes=32 * 2**20,
    )
    try:
        tps = {p: TopicPartition(topic, p) for p in todo}
        consumer.assign(list(tps.values()))
        for p, (start, _) in todo.items():
            consumer.seek(tps[p], start)
        deadline = time.monotonic() + timeout_s
        bad = 0
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}: could not read up to the sentinel of partitions {sorted(todo)}"
                )
            for tp, records in consumer.poll(timeout_ms=200).items():
                end = todo.get(tp.partition, (0, -1))[1]
                for record in records:
                    if record.offset >= end:
                        break
                    if record.key == SENTINEL_KEY or record.value is None:
                        continue
                    try:
                        header = decode_header(record.value)
                    except (ValueError, KeyError, TypeError):
                        bad += 1
                        continue
                    kept = latest.get(header.user_id)
                    if kept is None or header.applied_offset >= kept[0].applied_offset:
                        latest[header.user_id] = (header, record.value)
            for p in list(todo):
                if consumer.position(tps[p]) >= todo[p][1]:
                    consumer.pause(tps[p])
                    del todo[p]
        if bad:
            log.warning("%s: skipped %d records that are not snapshots", topic, bad)
    finally:
        consumer.close()
    return latest


def read_snapshots(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    start: Mapping[int, int] | None = None,
    timeout_s: float = 60.0,
) -> tuple[dict[str, tuple[SnapshotHeader, bytes]], dict[int, int]]:
    """Everything written to these partitions before now: the latest snapshot per user and
    partition -> the offset to read from next time (just past the sentinel)."""
    if not partitions:
        return {}, {}
    sentinels = append_sentinels(bootstrap, topic, partitions, timeout_s)
    ends = {p: offset + 1 for p, offset in sentinels.items()}
    start = start or {}
    latest = read_latest(
        bootstrap, topic, {p: (start.get(p, 0), ends[p]) for p in partitions}, timeout_s
    )
    return latest, ends
