"""Publishing a processed batch: its recommendations (key = user id) and its dead letters
(the messages that did not parse, and the events the engine refused, each with its original
key and bytes), all sent together; the batch is done when the broker confirmed every record.

Nothing here stops the worker. Through a broker outage every record is sent again until
the broker takes it (`outage.deliver`: the batch waits, which is backpressure). A record
that no retry can get in (too large, say) is logged and counted (`publish_failures`,
`dlq_publish_failures`) and the stream goes on; dead letters are bounded in size
(`schemas.dead_letter`), so that one cannot be refused for size, and a poison message
is therefore dead-lettered and acknowledged like any other, never read again and again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hytrec.stream.accounting import Accounting
from hytrec.stream.outage import Outage, Record, deliver
from hytrec.stream.schemas import EngineResult, dead_letter, encode_behavior

if TYPE_CHECKING:
    from hytrec.stream.worker import BatchingWorker, Pending

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    """The worker's counters, exposed at /metrics (`metrics.py`)."""

    accounting: Accounting = field(default_factory=Accounting)  # per partition
    rejected: Counter = field(default_factory=Counter)  # reason_code -> dead letters
    recommendations_out: int = 0
    publish_failures: int = 0  # recommendations the broker refused for good
    dlq_publish_failures: int = 0  # dead letters the broker refused for good (logged)
    batches: int = 0
    engine_seconds: float = 0.0
    publish_seconds: float = 0.0
    checkpoints: int = 0
    checkpoints_failed: int = 0  # redone by the next checkpoint
    snapshots_written: int = 0
    snapshot_bytes: int = 0
    checkpoint_seconds: float = 0.0
    users_restored: int = 0
    snapshots_other_log: int = 0  # skipped on restore: offsets of a replaced log
    snapshots_corrupt: int = 0  # records that were not valid snapshots
    events_replayed_for_corrupt: int = 0  # read back from behaviors for their users
    log_resets: int = 0  # behaviours partitions found to be a new log (see newlog.py)
    users_dropped: int = 0
    restore_seconds: float = 0.0
    model_swaps: int = 0
    model_load_seconds: float = 0.0  # loading models and building their indexes, all swaps
    model_swap_seconds: float = 0.0  # holding the flush lock for swaps (batches wait)
    users_rebuilt: int = 0  # user states rebuilt from the log by swaps (`--backfill`)
    users_rebuilt_partial: int = 0  # ... from a partial history: the log lost their oldest
    events_not_held: int = 0  # consumed for a partition no longer assigned: left to its owner

    @property
    def events_in(self) -> int:
        return self.accounting.total().consumed

    @property
    def events_applied(self) -> int:
        return self.accounting.total().applied

    @property
    def skipped_duplicates(self) -> int:
        return self.accounting.total().replays_skipped


class Publisher:
    def __init__(self, worker: BatchingWorker):
        self.worker = worker
        self.outage = Outage("publishing recommendations and dead letters")
        self.refused: Counter = Counter()  # (topic, error type) -> records refused for good

    def dead_letters(self, pending: list[Pending], result: EngineResult) -> list[Record]:
        """The batch's DLQ records: messages that did not parse, then the engine's rejects,
        each keyed and holding the bytes of the message as it was consumed."""
        config = self.worker.config
        records = [
            Record(config.topics.dlq, p.dead_letter.key, p.dead_letter.value)
            for p in pending
            if p.dead_letter is not None
        ]
        origin = {(p.partition, p.offset): p for p in pending if p.parsed is not None}
        now = time.time()
        for event, reason, detail in result.rejected:
            source = origin.get((event.partition, event.offset))
            if source is not None and source.event is not None:
                key, value = source.event.message.key, source.event.message.value
            else:  # a test stands in for Faust: the event as a producer would send it
                key, value = event.user_id.encode(), encode_behavior(event.payload())
            letter = dead_letter(
                reason,
                detail,
                topic=config.topics.behaviors,
                partition=event.partition,
                offset=event.offset,
                key=key,
                value=value,
                failed_at=now,
                max_payload_bytes=config.dlq_max_payload_bytes,
            )
            records.append(Record(config.topics.dlq, letter.key, letter.value))
        return records

    async def publish(self, pending: list[Pending], result: EngineResult) -> None:
        """Send the batch's recommendations and dead letters; return once the broker
        confirmed every one (or refused it for good: logged and counted)."""
        worker = self.worker
        topics = worker.config.topics
        records = [
            Record(topics.recommendations, rec.user_id.encode(), rec.to_json())
            for rec in result.recommendations
        ]
        records += self.dead_letters(pending, result)
        failed = await deliver(worker.app.producer, records, self.outage, worker.stopping)
        for i, exc in failed.items():
            record = records[i]
            if record.topic == topics.dlq:
                worker.stats.dlq_publish_failures += 1
            else:
                worker.stats.publish_failures += 1
            what = (record.topic, type(exc).__name__)
            self.refused[what] += 1
            if self.refused[what] in (1, 10, 100) or self.refused[what] % 1000 == 0:
                log.error(
                    "the broker refused a record of %s for good (%s: %s; %d so far): logged "
                    "and counted, the stream goes on%s",
                    record.topic,
                    type(exc).__name__,
                    exc,
                    self.refused[what],
                    f"; the dead letter was {record.value[:500]!r}"
                    if record.topic == topics.dlq
                    else "",
                )

    def count(
        self, result: EngineResult, engine_s: float, publish_s: float, batch_size: int | None
    ) -> None:
        worker = self.worker
        worker.metrics.observe_batch(result, batch_size, engine_s, publish_s, worker.engine)
        stats = worker.stats
        stats.batches += 1
        stats.recommendations_out += len(result.recommendations)
        stats.rejected.update(reason for _, reason, _ in result.rejected)
        stats.engine_seconds += engine_s
        stats.publish_seconds += publish_s
        if stats.batches % worker.config.log_every_batches == 0:
            log.info(
                "batches %d, events in %d, recommendations out %d, rejected %d %s, "
                "duplicates skipped %d, engine %.1f s, publish %.1f s, checkpoints %d "
                "(%d snapshots, %.1f MB, %.1f s); %s",
                stats.batches,
                stats.events_in,
                stats.recommendations_out,
                sum(stats.rejected.values()),
                dict(stats.rejected),
                stats.skipped_duplicates,
                stats.engine_seconds,
                stats.publish_seconds,
                stats.checkpoints,
                stats.snapshots_written,
                stats.snapshot_bytes / 1e6,
                stats.checkpoint_seconds,
                stats.accounting.line(),
            )
            log_disk_tier(worker.engine)


def log_disk_tier(engine) -> None:
    """A log line on the engine's disk tier, when it has one (with the periodic line)."""
    disk = getattr(getattr(engine, "store", None), "disk", None)
    if disk is not None:
        log.info(
            "state tiers: %d users on disk (%d states written there, %d read back)",
            len(disk),
            disk.writes,
            disk.reads,
        )
