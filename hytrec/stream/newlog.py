"""New-log detection: tell a replay of the same `behaviors` log from a log that replaced it.

Offsets of a partition go back on every replay (after a rebalance or a restart) and also
when the broker lost the log (the embedded broker keeps logs in memory: after a restart
offsets start again at 0, and the per-user applied offsets would skip every new event as
a replay). When they go back, the record at the newest offset consumed tells the two
apart: the same record means a replay of the same log; another record or none means a new
log, whose users keep their states but forget their applied offsets.

Ordering (asserted in `LogWatch.observe`): a partition's consumed offsets are checked here
before its event joins a batch, and what was consumed from an old log is applied before
the new log's first event.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


class LogWatch:
    """The newest message consumed per `behaviors` partition, and the newest offset below
    which a replay was found to be of the same log."""

    def __init__(self, worker: BatchingWorker):
        self.worker = worker
        self.newest: dict[int, Any] = {}  # the Faust message; fingerprinted only when checked
        self.replay_checked: dict[int, int] = {}

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
        new log (the broker lost its data), whose events the engine must not skip although
        their offsets are at or below the users' applied offsets. Once per replay."""
        if self.replay_checked.get(partition) == newest.offset:
            return
        worker = self.worker
        topic = worker.config.topics.behaviors
        record = await asyncio.get_running_loop().run_in_executor(
            None, record_at, worker.config.bootstrap, topic, partition, newest.offset, 5.0
        )
        if record is not None and Fingerprint.of(newest) == Fingerprint.of(record):
            self.replay_checked[partition] = newest.offset
            return
        await worker.flush()  # what was consumed from the old log is applied first
        users = worker.checkpoints.users_of(partition)
        reset = getattr(worker.engine, "reset_offsets", None)
        if reset is not None:
            await worker.on_engine_thread(reset, users)
        worker.checkpoints.new_log(partition, users)
        del self.newest[partition]
        self.replay_checked.pop(partition, None)
        worker.stats.log_resets += 1
        log.warning(
            "%s[%d] is a new log: offset %d no longer holds the event applied there (the "
            "broker lost its data?); %s the applied offsets of its %d known users and "
            "applying the new log from offset %d on top of their states",
            topic,
            partition,
            newest.offset,
            "reset" if reset is not None else "this engine cannot reset (no reset_offsets)",
            len(users),
            offset,
        )
