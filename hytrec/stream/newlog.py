"""New-log detection: tell a replay of the same `behaviors` log from a log that replaced it.

A log is replaced when the broker lost its data (the embedded broker keeps logs in memory:
after a restart the topics are made again and their offsets start again at 0) or when the
topic was deleted and made again. The users' applied offsets then belong to a log that is
gone: kept, they would skip every new event at or below them as a replay. Two signs tell:

- the topic's id (Kafka topic ids, which a topic made again does not keep) differs from the
  one the worker's offsets belong to (`log_id`). Checked when partitions are assigned
  (before any snapshot is read), before every checkpoint acknowledges its messages, and
  whenever offsets go back;
- offsets of a partition went back (every replay after a rebalance or restart does that)
  and the record at the newest offset consumed is another one, or none (a log replaced
  under the same topic id). The record is read once per replay.

On a new log the partition's users keep their states but forget their applied offsets of
it, the log's generation moves on, and messages consumed from the old log are never
acknowledged (an offset of a gone log must not be committed into the new one: the next
owner would skip the new log's events below it). Snapshots carry the `log_id` their
offsets belong to, and a reader skips those of another log (`snapshots.py`).

Ordering (asserted in `observe`): a message is checked here before it joins a batch, and
what was consumed from an old log is applied before the new log's first event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from faust.types import TP
from kafka import KafkaAdminClient

from hytrec.stream.broker import ensure_topics
from hytrec.stream.outage import Outage, until_answered
from hytrec.stream.tail import record_at

if TYPE_CHECKING:
    from hytrec.stream.worker import BatchingWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What tells a record from another at the same offset of a partition."""

    offset: int
    key: bytes | None
    timestamp_ms: int
    value_crc: int

    @classmethod
    def of(cls, message: Any) -> Fingerprint:
        """Of a Faust message (timestamp in seconds) or a kafka-python record (in ms)."""
        ts = message.timestamp
        timestamp_ms = round(ts * 1000) if isinstance(ts, float) else int(ts)
        return cls(message.offset, message.key, timestamp_ms, zlib.crc32(message.value or b""))


class TopicIds:
    """The current id of a topic, from the broker's metadata (one admin client, kept)."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()

    def __call__(self, topic: str) -> str:
        with self._lock:
            try:
                if self._admin is None:
                    self._admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap,
                        client_id="hytrec-log-id",
                        request_timeout_ms=5000,
                    )
                (described,) = self._admin.describe_topics([topic])
            except Exception:
                self.close()  # a fresh client next time
                raise
        if described.get("error_code"):
            raise RuntimeError(f"topic {topic!r}: metadata error {described['error_code']}")
        return str(described.get("topic_id") or "")

    def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()


class LogWatch:
    def __init__(self, worker: BatchingWorker):
        self.worker = worker
        self.topic_ids = TopicIds(worker.config.bootstrap)
        self.outage = Outage("reading the behaviors topic's metadata")
        self.log_id: str | None = None  # the topic id the applied offsets belong to
        self.generation: dict[int, int] = {}  # partition -> new logs seen so far
        # the newest message consumed per partition (the Faust message: fingerprinted only
        # when checked), and the newest offset below which a replay was found to be of the
        # same log
        self.newest: dict[int, Any] = {}
        self.replay_checked: dict[int, int] = {}
        self.commit_refused = False  # logged once per replaced topic

    def generation_of(self, partition: int) -> int:
        return self.generation.get(partition, 0)

    async def current_log_id(self) -> str:
        """The behaviors topic's id now (retried while the broker does not answer)."""
        topic = self.worker.config.topics.behaviors
        return await until_answered(
            lambda: self.topic_ids(topic), self.outage, self.worker.stopping
        )

    async def may_commit(self) -> bool:
        """Whether Faust may commit offsets now: the topic is the one they belong to (one
        metadata request; unanswered: not now, Faust tries again at its next commit)."""
        if self.log_id is None:
            return True  # nothing learned yet, so nothing consumed either
        topic = self.worker.config.topics.behaviors
        try:
            current = await asyncio.get_running_loop().run_in_executor(None, self.topic_ids, topic)
        except Exception:  # noqa: BLE001 - the broker does not answer: no commit now
            return False
        if current != self.log_id and not self.commit_refused:
            self.commit_refused = True
            log.warning(
                "%s was made again (id %s, offsets belong to %s): no offset is committed "
                "until the worker has taken up the new log",
                topic,
                current,
                self.log_id,
            )
        return current == self.log_id

    async def check_topic(self, partitions: set[int], flushed: bool = False) -> bool:
        """Whether the topic was made again since the offsets' log id was learned; if so,
        every partition in `partitions` (and every one with known users) starts a new log
        now. The first call learns the id. `flushed`: the caller holds the flush lock and
        has flushed the waiting batch."""
        current = await self.current_log_id()
        if self.log_id is None or current == self.log_id:
            self.log_id = current
            return False
        old, self.log_id = self.log_id, current
        self.commit_refused = False
        worker = self.worker
        config = worker.config
        # the broker lost its data: the group's user-state topic too, which a broker that
        # creates topics on first use would make with its own partition count
        await until_answered(
            lambda: ensure_topics(config.bootstrap, config.topics, 30.0, config.app_id),
            self.outage,
            worker.stopping,
        )
        if not flushed:  # what was consumed from the old log is applied first
            async with self.worker.flush_lock:
                await self.worker.flush_locked(checkpoint=False)
        known = set(self.worker.checkpoints.partition_of.values())
        for partition in sorted(partitions | known | set(self.newest)):
            await self._new_log(partition, f"the topic's id changed from {old} to {current}")
        return True

    async def observe(self, message: Any) -> None:
        """Before `message` joins a batch: when its offset is not past the newest consumed
        of its partition, find out whether its log is still the same."""
        partition = message.partition
        newest = self.newest.get(partition)
        if newest is not None and message.offset <= newest.offset:
            await self._check(partition, newest, message.offset)
            newest = self.newest.get(partition)  # None after a new log
        if newest is None or message.offset > newest.offset:
            self.newest[partition] = message
        assert self.newest[partition].offset >= message.offset  # checked, or a new newest

    async def _check(self, partition: int, newest: Any, offset: int) -> None:
        """Offsets went back: a replay of the same log, whose events the engine skips, or a
        new log, whose events the engine must not skip although their offsets are at or
        below the users' applied offsets. Once per replay."""
        if self.replay_checked.get(partition) == newest.offset:
            return
        if await self.check_topic({partition}):
            return
        worker = self.worker
        topic = worker.config.topics.behaviors
        record = await until_answered(
            lambda: record_at(worker.config.bootstrap, topic, partition, newest.offset, 5.0),
            Outage(f"reading {topic}[{partition}]@{newest.offset}"),
            worker.stopping,
        )
        if record is not None and Fingerprint.of(newest) == Fingerprint.of(record):
            self.replay_checked[partition] = newest.offset
            return
        await worker.flush()  # what was consumed from the old log is applied first
        await self._new_log(
            partition, f"offset {newest.offset} no longer holds the event consumed there"
        )

    async def _new_log(self, partition: int, why: str) -> None:
        """After the old log's waiting events were applied."""
        worker = self.worker
        assert not any(
            p.parsed is not None and p.parsed.partition == partition for p in worker.batcher.items
        ), "the old log's events are applied before the new log starts"
        users = worker.checkpoints.users_of(partition)
        reset = getattr(worker.engine, "reset_offsets", None)
        if reset is not None:
            await worker.on_engine_thread(reset, users, partition)
        worker.checkpoints.new_log(partition, users)
        forget_acks = getattr(getattr(worker.app, "consumer", None), "forget_acks", None)
        if forget_acks is not None:  # the old log's acknowledged offsets are never committed
            forget_acks(TP(worker.config.topics.behaviors, partition))
        self.generation[partition] = self.generation_of(partition) + 1
        self.newest.pop(partition, None)
        self.replay_checked.pop(partition, None)
        worker.stats.log_resets += 1
        log.warning(
            "%s[%d] is a new log (%s; the broker lost its data?): %s the applied offsets of "
            "its %d known users, keeping their states, and applying the new log on top; its "
            "messages consumed from the old log are not acknowledged",
            worker.config.topics.behaviors,
            partition,
            why,
            "reset" if reset is not None else "this engine cannot reset (no reset_offsets)",
            len(users),
        )
