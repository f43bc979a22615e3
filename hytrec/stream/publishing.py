"""Publishing a processed batch: its recommendations (key = user id) and its dead letters
(the messages that did not parse, and the events the engine refused), all sent together;
the batch is done when the broker confirmed every record. And the worker's counters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hytrec.stream.schemas import EngineResult, dead_letter, encode_behavior

if TYPE_CHECKING:
    from hytrec.stream.worker import BatchingWorker, Pending

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    """The worker's counters, exposed at /metrics (`metrics.py`)."""

    events_in: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason_code -> count
    recommendations_out: int = 0
    skipped_duplicates: int = 0
    batches: int = 0
    engine_seconds: float = 0.0
    publish_seconds: float = 0.0
    checkpoints: int = 0
    snapshots_written: int = 0
    snapshot_bytes: int = 0
    checkpoint_seconds: float = 0.0
    users_restored: int = 0
    log_resets: int = 0  # behaviours partitions found to be a new log (see newlog.py)
    users_dropped: int = 0
    restore_seconds: float = 0.0
    model_swaps: int = 0
    model_load_seconds: float = 0.0  # loading models and building their indexes, all swaps
    model_swap_seconds: float = 0.0  # holding the flush lock for swaps (batches wait)


class Publisher:
    def __init__(self, worker: BatchingWorker):
        self.worker = worker

    async def publish(self, pending: list[Pending], result: EngineResult) -> None:
        """Send the batch's recommendations and dead letters; return once the broker
        confirmed every one."""
        worker = self.worker
        topics, producer = worker.config.topics, worker.app.producer
        deliveries = []
        for rec in result.recommendations:
            deliveries.append(
                await producer.send(
                    topics.recommendations, rec.user_id.encode(), rec.to_json(), None, None, None
                )
            )
        letters = [p.dead_letter for p in pending if p.dead_letter is not None]
        now = time.time()
        for event, reason, detail in result.rejected:
            letters.append(
                dead_letter(
                    reason,
                    detail,
                    topic=topics.behaviors,
                    partition=event.partition,
                    offset=event.offset,
                    key=event.user_id.encode(),
                    value=encode_behavior(event.payload()),
                    failed_at=now,
                )
            )
        for letter in letters:
            deliveries.append(await producer.send(topics.dlq, None, letter, None, None, None))
        await asyncio.gather(*deliveries)  # every record confirmed by the broker

    def count(
        self, result: EngineResult, engine_s: float, publish_s: float, batch_size: int | None
    ) -> None:
        worker = self.worker
        worker.metrics.observe_batch(result, batch_size, engine_s, publish_s, worker.engine)
        stats = worker.stats
        stats.batches += 1
        stats.recommendations_out += len(result.recommendations)
        stats.skipped_duplicates += result.skipped_duplicates
        stats.rejected.update(reason for _, reason, _ in result.rejected)
        stats.engine_seconds += engine_s
        stats.publish_seconds += publish_s
        if stats.batches % worker.config.log_every_batches == 0:
            log.info(
                "batches %d, events in %d, recommendations out %d, rejected %d %s, "
                "duplicates skipped %d, engine %.1f s, publish %.1f s, checkpoints %d "
                "(%d snapshots, %.1f MB, %.1f s)",
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
            )
