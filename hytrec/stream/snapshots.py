"""Snapshots of user state in the user-state topic: encoding, decoding and reading back.

A snapshot record holds one user's whole serving state after some prefix of its events:

    key    user id (UTF-8)
    value  b"HYS1", a 4-byte little-endian header size, a JSON header, then the raw
           little-endian bytes of the user's state tensors (`SlotState.parts()`), in the
           header's order. The header: format, user, partition (where the record is),
           applied_offsets ({behaviours partition: last offset applied to the state}),
           log (the identity of the `behaviors` log those offsets belong to: its Kafka
           topic id), model_version, written_at, tensors: [[name, dtype, shape], ...] (a
           reader matches the parts by name) and crc32 of the tensor bytes. (safetensors
           did the same job 8x slower: 0.28 ms per 42 KB user, which a checkpoint of 800
           users felt.)

The topic (one per consumer group: `TopicConfig.state_topic(group)`, so that two groups
never restore each other's states) is co-partitioned with `behaviors` (same partition
count; a user's snapshot goes to the partition its events come from), so the owner of a
`behaviors` partition finds all its users in the same-numbered partition. It is compacted
on real Kafka (the latest snapshot per user is what counts); the reader never relies on
that: it keeps, per user, the valid record with the highest applied offset, which is also
right when an old owner (a zombie) writes late.

What the reader refuses. A record whose header, length or checksum does not check out is
*corrupt*: `read_latest` reports it with its position and key, and the worker either falls
back to that user's last good state and replays its events (`checkpoints.py`), or, when
the record cannot even say whose it is, stops with an error naming topic, partition and
offset; it never restores an older state and moves on. A corrupt record is harmless once a
valid one of the same user follows it in the partition. A record whose `log` is not the
current `behaviors` log holds offsets of a log that is gone (the broker lost its data, or
the topic was made again): it is skipped and counted, never restored.

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
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

log = logging.getLogger(__name__)

FORMAT = "hytrec-user-state/4"  # /2: named tensors; /3: offsets per partition, log, crc32;
# /4: the repeat head's buffer (parts `recent`, `recent_counts`) in the state of a model with one
SENTINEL_KEY = b"\x00hytrec-sentinel"
NO_OFFSET = -1


@dataclass(slots=True)
class UserSnapshot:
    user_id: str
    partition: int  # the user's behaviours partition (= its user-state partition)
    applied: dict[int, int]  # behaviours partition -> the last offset applied to `parts`
    model_version: str
    parts: dict[str, torch.Tensor]  # SlotState.parts() by name, without the slot dimension
    log: str = ""  # identity of the behaviours log the offsets belong to (its topic id)
    written_at: float = 0.0

    @property
    def applied_offset(self) -> int:
        """The last offset of its own partition applied to the state."""
        return self.applied.get(self.partition, NO_OFFSET)


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    user_id: str
    partition: int
    applied: dict[int, int]
    model_version: str
    log: str

    @property
    def applied_offset(self) -> int:
        return self.applied.get(self.partition, NO_OFFSET)


def ahead_of(snapshot: UserSnapshot | SnapshotHeader, store) -> bool:
    """Whether a snapshot (or its header) should replace what the store holds of its user:
    it covers a later offset of its partition, or it covers no offset at all (a history
    from before the log, `backfill --from-file`) and the store (a `UserStateStore`, or None
    for an engine without one) does not know the user."""
    if store is None:
        return snapshot.applied_offset > NO_OFFSET or not snapshot.applied
    if not snapshot.applied:
        return snapshot.user_id not in store
    return snapshot.applied_offset > store.offset_of(snapshot.user_id, snapshot.partition)


MAGIC = b"HYS1"
_DTYPES = {
    torch.float32: "f4",
    torch.float64: "f8",
    torch.int64: "i8",
    torch.int32: "i4",
    torch.bool: "b1",
}
_TORCH = {name: dtype for dtype, name in _DTYPES.items()}


def encode_snapshot(snapshot: UserSnapshot) -> bytes:
    arrays = {n: t.detach().to("cpu").contiguous() for n, t in snapshot.parts.items()}
    body = [t.numpy().astype("<" + _DTYPES[t.dtype], copy=False).tobytes() for t in arrays.values()]
    crc = 0
    for chunk in body:
        crc = zlib.crc32(chunk, crc)
    header = json.dumps(
        {
            "format": FORMAT,
            "user": snapshot.user_id,
            "partition": snapshot.partition,
            "applied_offsets": {str(p): o for p, o in snapshot.applied.items()},
            "log": snapshot.log,
            "model_version": snapshot.model_version,
            "written_at": snapshot.written_at or time.time(),
            "tensors": [[n, _DTYPES[t.dtype], list(t.shape)] for n, t in arrays.items()],
            "crc32": crc,
        },
        separators=(",", ":"),
    ).encode()
    return b"".join([MAGIC, len(header).to_bytes(4, "little"), header, *body])


def _header(value: bytes) -> tuple[dict, int]:
    """The JSON header and where the tensor bytes start; ValueError unless the record is a
    whole, uncorrupted snapshot of this format (length and checksum checked)."""
    if value[:4] != MAGIC or len(value) < 8:
        raise ValueError("not a user-state snapshot")
    size = int.from_bytes(value[4:8], "little")
    try:
        header = json.loads(value[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"unreadable snapshot header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"unknown snapshot format {found!r}")
    try:
        expected = sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for _, dtype, shape in header["tensors"]
        )
        crc = int(header["crc32"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"snapshot header without a valid tensor layout: {exc!r}") from None
    if 8 + size + expected != len(value):
        raise ValueError(f"snapshot is {len(value)} bytes, its header says {8 + size + expected}")
    if zlib.crc32(memoryview(value)[8 + size :]) != crc:
        raise ValueError("snapshot tensor bytes do not match their checksum")
    return header, 8 + size


def decode_header(value: bytes) -> SnapshotHeader:
    """The metadata of a snapshot record, after checking the record is whole (length and
    checksum); ValueError when it is not."""
    header, _ = _header(value)
    try:
        return SnapshotHeader(
            user_id=str(header["user"]),
            partition=int(header["partition"]),
            applied={int(p): int(o) for p, o in header["applied_offsets"].items()},
            model_version=str(header["model_version"]),
            log=str(header["log"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"snapshot header lacks a field: {exc!r}") from None


def decode_snapshot(value: bytes) -> UserSnapshot:
    head = decode_header(value)
    header, at = _header(value)
    parts = {}
    for name, dtype, shape in header["tensors"]:
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(value, dtype=np.dtype("<" + dtype), count=count, offset=at)
        parts[name] = torch.from_numpy(array.reshape(shape).copy()).to(_TORCH[dtype])
        at += array.nbytes
    return UserSnapshot(
        user_id=head.user_id,
        partition=head.partition,
        applied=head.applied,
        model_version=head.model_version,
        parts=parts,
        log=head.log,
        written_at=float(header.get("written_at", 0.0)),
    )


@dataclass(frozen=True, slots=True)
class CorruptRecord:
    """A user-state record that is not a valid snapshot: where it is and its key."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    reason: str

    @property
    def user_id(self) -> str | None:
        """The user the record was written for, when its key says so."""
        if not self.key or self.key == SENTINEL_KEY:
            return None
        try:
            return self.key.decode()
        except UnicodeDecodeError:
            return None

    def describe(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset} (key {self.key!r}): {self.reason}"


@dataclass
class SnapshotRead:
    """What `read_latest` found in some partitions of the user-state topic."""

    latest: dict[str, tuple[SnapshotHeader, bytes]] = field(default_factory=dict)
    # corrupt records that no valid record of the same user follows in the partition
    corrupt: list[CorruptRecord] = field(default_factory=list)
    superseded: int = 0  # corrupt records a later valid one of the same user made harmless
    other_log: int = 0  # valid records whose offsets belong to another behaviours log
    ends: dict[int, int] = field(default_factory=dict)  # partition -> where to read next


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
    log_id: str | None = None,
) -> SnapshotRead:
    """Read partition p of `topic` from offset start to end (exclusive) for each
    p -> (start, end) of `ranges`: the latest valid snapshot of every user (the one with
    the highest applied offset), as (header, raw value), with `log_id` (when given) only;
    and the corrupt records no later valid one supersedes. Raises TimeoutError if a range
    cannot be read in `timeout_s`."""
    found = SnapshotRead()
    todo = {p: (start, end) for p, (start, end) in ranges.items() if end > start}
    if not todo:
        return found
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
    corrupt: dict[tuple[int, str], CorruptRecord] = {}  # (partition, user) -> the newest
    try:
        tps = {p: TopicPartition(topic, p) for p in todo}
        consumer.assign(list(tps.values()))
        for p, (start, _) in todo.items():
            consumer.seek(tps[p], start)
        deadline = time.monotonic() + timeout_s
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
                    if record.key == SENTINEL_KEY:
                        continue
                    try:
                        header = decode_header(record.value or b"")
                    except ValueError as exc:
                        bad = CorruptRecord(
                            topic, tp.partition, record.offset, record.key, str(exc)
                        )
                        who = (tp.partition, bad.user_id or f"key {record.key!r}")
                        found.superseded += who in corrupt  # the newest corrupt one decides
                        corrupt[who] = bad
                        continue
                    if corrupt.pop((tp.partition, header.user_id), None) is not None:
                        found.superseded += 1  # a valid record follows the corrupt one
                    if log_id is not None and header.log != log_id:
                        found.other_log += 1
                        continue
                    kept = found.latest.get(header.user_id)
                    if kept is None or header.applied_offset >= kept[0].applied_offset:
                        found.latest[header.user_id] = (header, record.value)
            for p in list(todo):
                if consumer.position(tps[p]) >= todo[p][1]:
                    consumer.pause(tps[p])
                    del todo[p]
    finally:
        consumer.close()
    found.corrupt = sorted(corrupt.values(), key=lambda c: (c.partition, c.offset))
    if found.other_log or found.superseded:
        log.warning(
            "%s: skipped %d snapshots of another behaviours log and %d corrupt records that "
            "later snapshots superseded",
            topic,
            found.other_log,
            found.superseded,
        )
    return found


def read_snapshots(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    start: Mapping[int, int] | None = None,
    timeout_s: float = 60.0,
    log_id: str | None = None,
) -> SnapshotRead:
    """Everything written to these partitions before now (see `read_latest`), with
    `ends`: partition -> the offset to read from next time (just past the sentinel)."""
    if not partitions:
        return SnapshotRead()
    sentinels = append_sentinels(bootstrap, topic, partitions, timeout_s)
    ends = {p: offset + 1 for p, offset in sentinels.items()}
    start = start or {}
    found = read_latest(
        bootstrap, topic, {p: (start.get(p, 0), ends[p]) for p in partitions}, timeout_s, log_id
    )
    found.ends = ends
    return found
