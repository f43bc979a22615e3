"""Backfill: build every user's serving state from the `behaviors` log in long runs instead of
event by event through the worker, and write it as a snapshot a worker restores (issue 17).

    hytrec backfill --checkpoint DIR --group G

1. Read `behaviors` from the beginning up to its end as the broker gives it at the start (a
   cut: events that come later are the worker's), through the worker's parser
   (`schemas.parse_record`): a record it refuses goes to the dead-letter topic with its reason.
2. Group the events by user (each user's in log order) and apply them with the engine's
   `apply`: the worker's admission (replays skipped, late events refused or moved forward)
   and the model's `step`, which takes each user's history in runs of up to `max_run`
   events. A run of 8 or more events goes through the chunked (parallel) form, so the
   states are those of the stream up to float rounding (`benchmark backfill` measures it),
   at a fraction of its cost: no Kafka round trip, no index search, no recommendation, and
   few long steps instead of many short ones. Users are taken longest history first, a few
   hundred per step, so that the runs of one step have similar lengths (little padding).
3. Write each user's state as a snapshot (`snapshots.py`) into the group's user-state topic,
   labelled with the model version, the `behaviors` log's id and the last offset applied
   per partition, to the partition its events come from. A worker of that group that is
   assigned the partition restores these states and skips every event at or below their
   offsets: it replays nothing the backfill applied.

From a file (`--from-file`, any dataset `load_named` reads, `--columns` for a table of
your own): the history BEFORE the `behaviors` topic, e.g. the shop's warehouse export when
the stream goes live. Each user's events are applied in time order and its state is
written, to the partition the Kafka key partitioner gives its user id (murmur2, as every
Kafka producer keyed by user id), with no applied offsets: a worker restores it for a
user it does not know yet and applies every event of the topic on top. Users that
already have a snapshot of this model in the group's topic are left alone (their state
holds topic events already: the file's history can no longer go underneath).

Resumable: before it builds anything, the backfill reads the group's user-state topic; a user
whose snapshot (same model version, same log) already covers all its events read is left
alone, and one whose snapshot covers part of them starts from that snapshot. A run that
stops half-way is run again and does the rest. A refused record is dead-lettered again on
each run that reads it (the letter names topic, partition and offset: duplicates are
recognisable).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from tqdm import tqdm

from hytrec.model.events import EventLog
from hytrec.stream.broker import TopicConfig, ensure_topics
from hytrec.stream.engine import RecommendationEngine
from hytrec.stream.newlog import TopicIds
from hytrec.stream.replay import log_events
from hytrec.stream.schemas import (
    DLQ_MAX_PAYLOAD_BYTES,
    BehaviorEvent,
    InvalidMessage,
    ParseLimits,
    dead_letter,
    encode_behavior,
    parse_record,
)
from hytrec.stream.snapshots import NO_OFFSET, decode_snapshot, encode_snapshot, read_snapshots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackfillConfig:
    group: str = "hytrec"  # the consumer group whose workers will restore the states
    topics: TopicConfig = TopicConfig()
    parse: ParseLimits = ParseLimits()  # as the worker's: the same records are refused
    dlq_max_payload_bytes: int = DLQ_MAX_PAYLOAD_BYTES  # of a refused message, in its letter
    # one step takes at most `users_per_step` users and `max_run` events of each, and (as
    # runs are padded to the longest) at most `tokens_per_step` users x longest run
    users_per_step: int = 512
    max_run: int = 1024
    tokens_per_step: int = 32_768
    timeout_s: float = 120.0  # for the broker to answer a read or confirm the writes
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.users_per_step, self.max_run, self.tokens_per_step) < 1:
            raise ValueError("users_per_step, max_run and tokens_per_step must be >= 1")


@dataclass
class BackfillReport:
    events_read: int = 0  # behaviours records read (valid or not)
    events_applied: int = 0  # to a state (this run)
    events_already_applied: int = 0  # covered by a snapshot found in the user-state topic
    dead_letters: int = 0  # refused by the parser or the engine (`out_of_order`)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    users: int = 0  # with events in the cut
    users_written: int = 0
    users_up_to_date: int = 0  # their snapshot covered every event read: left alone
    users_resumed: int = 0  # started from a snapshot that covered part of their events
    source: str = ""  # the topic, or the file
    snapshot_bytes: int = 0
    ends: dict[int, int] = field(default_factory=dict)  # partition -> first offset not read
    model_version: str = ""
    log_id: str = ""
    read_seconds: float = 0.0
    build_seconds: float = 0.0  # admission and model steps
    write_seconds: float = 0.0  # encoding, sending and waiting for the broker
    seconds: float = 0.0  # all of it, reading the user-state topic included

    @property
    def events_per_s(self) -> float:
        return self.events_read / self.seconds if self.seconds else 0.0


@dataclass
class History:
    """What one read of `behaviors` gave: the valid events in log order per partition, the
    refused records with why, and where the read stopped."""

    events: list[BehaviorEvent]
    invalid: list[tuple[object, InvalidMessage]]
    ends: dict[int, int]


def read_history(
    bootstrap: str,
    topic: str,
    limits: ParseLimits,
    timeout_s: float = 120.0,
    progress: bool = True,
    ranges: dict[int, tuple[int, int]] | None = None,
) -> History:
    """The records of `topic` parsed as the worker parses them: with `ranges`, partition p
    from offset start up to end (exclusive) for each p -> (start, end); without, every
    partition from its start up to its end offset as asked now. (Tansu may answer short of
    the end by part of the last batch; a fetch returns whole batches, so the rest of that
    batch comes too.)"""
    return asyncio.run(_read_history(bootstrap, topic, limits, timeout_s, progress, ranges))


async def _read_history(bootstrap, topic, limits, timeout_s, progress, ranges) -> History:
    # aiokafka, not kafka-python: its C record decoding reads ~10x faster here
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-backfill",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a start below the log's start reads from that start
        fetch_max_wait_ms=50,  # Tansu answers a long poll only after half of it
        max_partition_fetch_bytes=8 * 2**20,
    )
    await consumer.start()
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise ValueError(f"topic {topic!r} does not exist at {bootstrap}")
        chosen = sorted(found) if ranges is None else sorted(ranges)
        partitions = [TopicPartition(topic, p) for p in chosen]
        consumer.assign(partitions)
        if ranges is None:
            # offset 0, not seek_to_beginning: Tansu's ListOffsets(EARLIEST) may name a later
            # batch (app.py's consumer says why); on Kafka a lost offset 0 resets to the start
            for tp in partitions:
                consumer.seek(tp, 0)
            wanted = await consumer.end_offsets(partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, ranges[tp.partition][0])
            wanted = {tp: ranges[tp.partition][1] for tp in partitions}
        start = {tp: await consumer.position(tp) for tp in partitions}
        todo = {tp for tp in partitions if start[tp] < wanted[tp]}
        events: list[BehaviorEvent] = []
        invalid: list[tuple[object, InvalidMessage]] = []
        deadline = time.monotonic() + timeout_s
        total = sum(wanted[tp] - start[tp] for tp in todo)
        with tqdm(total=total, desc="read", unit="event", disable=not progress) as bar:
            while todo:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{topic}: read {bar.n:,} of {total:,} records in {timeout_s:.0f} s"
                    )
                batches = await consumer.getmany(*todo, timeout_ms=200)
                now = time.time()
                for tp, records in batches.items():
                    if ranges is not None:  # exactly the range asked for
                        records = [r for r in records if r.offset < wanted[tp]]
                    for record in records:
                        parsed = parse_record(record, limits, now)
                        if isinstance(parsed, BehaviorEvent):
                            events.append(parsed)
                        else:
                            invalid.append((record, parsed))
                    bar.update(len(records))
                todo = {tp for tp in todo if await consumer.position(tp) < wanted[tp]}
        if ranges is None:
            ends = {tp.partition: await consumer.position(tp) for tp in partitions}
        else:
            ends = {tp.partition: wanted[tp] for tp in partitions}
    finally:
        await consumer.stop()
    return History(events, invalid, ends)


def build_states(
    engine: RecommendationEngine,
    events: Sequence[BehaviorEvent],
    config: BackfillConfig = BackfillConfig(),
    done: Callable[[list[str]], None] | None = None,
) -> list[tuple[BehaviorEvent, str, str]]:
    """Apply `events` (log order) to the users' states in `engine`'s store, each user's
    history in runs of at most `max_run` events, longest histories first, as many users per
    step as `users_per_step` and `tokens_per_step` allow (similar lengths: little padding).
    After each group of users, their states are settled (`RecommendationEngine.settle`) and
    `done(users)` is called (the backfill writes and forgets them there). The events the
    engine refused, with reason and detail."""
    by_user: dict[str, list[BehaviorEvent]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)
    users = sorted(by_user, key=lambda u: -len(by_user[u]))
    most_users = min(config.users_per_step, engine.store.num_slots)
    rejected: list[tuple[BehaviorEvent, str, str]] = []
    with tqdm(total=len(events), desc="build", unit="event", disable=not config.progress) as bar:
        start = 0
        while start < len(users):
            longest = len(by_user[users[start]])
            size = config.tokens_per_step // min(longest, config.max_run)
            group = users[start : start + max(1, min(size, most_users))]
            start += len(group)
            for begin in range(0, longest, config.max_run):
                segment = [e for u in group for e in by_user[u][begin : begin + config.max_run]]
                rejected += engine.apply(segment).rejected
                bar.update(len(segment))
            engine.settle(group)
            if done is not None:
                done(group)
    return rejected


def backfill(
    engine: RecommendationEngine, bootstrap: str, config: BackfillConfig = BackfillConfig()
) -> BackfillReport:
    """Read `behaviors`, build the states, write them to the group's user-state topic; see
    the module docstring. The engine's store should be empty (a fresh engine)."""
    started = time.perf_counter()
    report, state_topic = _start(engine, bootstrap, config)
    report.source = config.topics.behaviors
    history = read_history(
        bootstrap, config.topics.behaviors, config.parse, config.timeout_s, config.progress
    )
    report.events_read = len(history.events) + len(history.invalid)
    report.ends = history.ends
    report.read_seconds = time.perf_counter() - started

    # where each user's events come from, and the last offset read per partition
    partition_of: dict[str, int] = {}
    newest: dict[str, dict[int, int]] = defaultdict(dict)
    for event in history.events:
        partition_of[event.user_id] = event.partition  # as the worker: the latest wins
        newest[event.user_id][event.partition] = event.offset
    report.users = len(partition_of)
    events = _resume(engine, bootstrap, state_topic, history, newest, report)
    _build_and_write(engine, bootstrap, config, events, partition_of, history.invalid, report)
    report.seconds = time.perf_counter() - started
    _log_report(report, state_topic)
    return report


def backfill_file(
    engine: RecommendationEngine,
    bootstrap: str,
    events: EventLog,
    config: BackfillConfig = BackfillConfig(),
    source: str = "",
) -> BackfillReport:
    """Build every user's state from a log of the history before the `behaviors` topic and
    write it without applied offsets (see the module docstring)."""
    started = time.perf_counter()
    report, state_topic = _start(engine, bootstrap, config)
    report.source = source or "a file"
    partitions = config.topics.behaviors_partitions
    users = events.users.raw_ids()
    partition_of = {user: key_partition(user, partitions) for user in users}
    found = read_snapshots(
        bootstrap, state_topic, list(range(partitions)), timeout_s=60.0, log_id=report.log_id
    )
    taken = {
        user
        for user, (header, _) in found.latest.items()
        if header.model_version == engine.model_version
    }
    stream = []
    next_offset = [0] * partitions  # positions in the file, per partition: never written
    for payload in log_events(events):  # time order: each user's events in order
        user = payload["user_id"]
        if user in taken:
            continue
        p = partition_of[user]
        stream.append(BehaviorEvent(**payload, partition=p, offset=next_offset[p], received_at=0.0))
        next_offset[p] += 1
    report.events_read = len(events)
    report.users = len(events.users)
    report.users_up_to_date = len(taken & set(users))
    report.events_already_applied = len(events) - len(stream)
    report.read_seconds = time.perf_counter() - started
    _build_and_write(engine, bootstrap, config, stream, partition_of, [], report, offsets=False)
    report.seconds = time.perf_counter() - started
    _log_report(report, state_topic)
    return report


def key_partition(user_id: str, partitions: int) -> int:
    """The partition a Kafka producer's default partitioner gives this user id as key."""
    from kafka.partitioner.default import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def _start(engine, bootstrap: str, config: BackfillConfig) -> tuple[BackfillReport, str]:
    """The topics made, the log's id read: an empty report, and the user-state topic."""
    ensure_topics(bootstrap, config.topics, group=config.group)
    ids = TopicIds(bootstrap)
    try:
        log_id = ids(config.topics.behaviors)
    finally:
        ids.close()
    report = BackfillReport(model_version=engine.model_version, log_id=log_id)
    return report, config.topics.state_topic(config.group)


def _build_and_write(
    engine, bootstrap, config, events, partition_of, invalid, report, offsets: bool = True
) -> None:
    """Build the states of `events`, write each user's snapshot as its group is done (with
    its applied offsets, or none when `offsets` is False: positions in a file are no
    offsets of the log), then the dead letters; wait until the broker has them all."""
    state_topic = config.topics.state_topic(config.group)
    producer = BackgroundProducer(bootstrap)
    try:

        def write(users: list[str]) -> None:
            begun = time.perf_counter()
            if not offsets:
                for user in users:
                    engine.store.applied.pop(user, None)
            snapshots = engine.export_states({u: partition_of[u] for u in users}, report.log_id)
            for snap in snapshots:
                value = encode_snapshot(snap)
                report.snapshot_bytes += len(value)
                producer.send(state_topic, snap.user_id.encode(), value, snap.partition)
            report.users_written += len(snapshots)
            engine.drop_users(users)  # written: the store stays as small as one group
            report.write_seconds += time.perf_counter() - begun

        begun = time.perf_counter()
        rejected = build_states(engine, events, config, write)
        report.build_seconds = time.perf_counter() - begun - report.write_seconds
        letters = _dead_letters(invalid, rejected, config)
        for key, value in letters:
            producer.send(config.topics.dlq, key, value)
        begun = time.perf_counter()
        producer.wait(config.timeout_s)  # raises what the broker refused
        report.write_seconds += time.perf_counter() - begun
    finally:
        producer.close()
    report.events_applied = engine.stats.events_applied
    report.dead_letters = len(letters)
    for _, why in invalid:
        report.rejected[why.reason_code] = report.rejected.get(why.reason_code, 0) + 1
    for _, reason, _ in rejected:
        report.rejected[reason] = report.rejected.get(reason, 0) + 1


def _log_report(report: BackfillReport, state_topic: str) -> None:
    log.info(
        "backfill of %s into %s: %d events of %d users read, %d applied, %d snapshots "
        "written, %d dead letters, %d users up to date, %d resumed (%.1f s, %.0f events/s)",
        report.source,
        state_topic,
        report.events_read,
        report.users,
        report.events_applied,
        report.users_written,
        report.dead_letters,
        report.users_up_to_date,
        report.users_resumed,
        report.seconds,
        report.events_per_s,
    )


class BackgroundProducer:
    """An aiokafka producer on an event loop of its own thread, for synchronous code: `send`
    queues a record and returns at once, `wait` blocks until the broker confirmed every
    record sent so far. (kafka-python's producer builds its batches in Python: writing the
    snapshots took 5x the time of building the states.)"""

    def __init__(self, bootstrap: str):
        from aiokafka import AIOKafkaProducer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="hytrec-backfill-producer", daemon=True
        )
        self.thread.start()

        async def start() -> AIOKafkaProducer:
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                client_id="hytrec-backfill",
                acks="all",
                linger_ms=20,
                max_batch_size=2**20,  # snapshots are tens of KB: many per request
                max_request_size=16 * 2**20,
            )
            await producer.start()
            return producer

        self.producer = self._run(start())
        self.sent: list[Future] = []

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None):
        self.sent.append(
            asyncio.run_coroutine_threadsafe(
                self.producer.send_and_wait(topic, value, key=key, partition=partition), self.loop
            )
        )

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        sent, self.sent = self.sent, []
        for future in sent:
            future.result(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        try:
            self._run(self.producer.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


def _resume(engine, bootstrap, state_topic, history, newest, report) -> list[BehaviorEvent]:
    """The events still to apply: users whose snapshot of this model and log covers all
    their events read are left out; those whose snapshot covers a part start from it (the
    engine skips the events at or below its offsets)."""
    found = read_snapshots(
        bootstrap, state_topic, sorted(history.ends), timeout_s=60.0, log_id=report.log_id
    )
    up_to_date: set[str] = set()
    partial = []
    for user, (header, value) in found.latest.items():
        if user not in newest or header.model_version != engine.model_version:
            continue
        covered = all(
            header.applied.get(p, NO_OFFSET) >= offset for p, offset in newest[user].items()
        )
        if covered:
            up_to_date.add(user)
        else:
            partial.append(decode_snapshot(value))
    engine.import_states(partial)
    report.users_up_to_date, report.users_resumed = len(up_to_date), len(partial)
    kept = [e for e in history.events if e.user_id not in up_to_date]
    report.events_already_applied = len(history.events) - len(kept)
    return kept


def _dead_letters(invalid, rejected, config: BackfillConfig) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of the DLQ records: records the parser refused, then events the engine
    refused (as the worker writes them)."""
    now = time.time()
    topic = config.topics.behaviors
    letters = []
    for record, why in invalid:
        letter = dead_letter(
            why.reason_code,
            why.detail,
            topic=topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            failed_at=now,
            max_payload_bytes=config.dlq_max_payload_bytes,
        )
        letters.append((letter.key, letter.value))
    for event, reason, detail in rejected:
        letter = dead_letter(
            reason,
            detail,
            topic=topic,
            partition=event.partition,
            offset=event.offset,
            key=event.user_id.encode(),
            value=encode_behavior(event.payload()),
            failed_at=now,
            max_payload_bytes=config.dlq_max_payload_bytes,
        )
        letters.append((letter.key, letter.value))
    return letters
