"""The batching worker: consume `behaviors`, micro-batch, run the engine, publish, then
acknowledge at the next checkpoint.

One agent (concurrency 1) iterates the stream event by event with acks disabled and feeds
a `MicroBatcher`; a flush runs when the batch is full (in the agent, which is backpressure)
or when its oldest event has waited W ms (a timer task). A flush

1. validates nothing twice: each message was parsed when it arrived, invalid ones wait in
   the batch as dead letters so they are acknowledged in order with their neighbours;
2. runs `engine.process(valid events)` on the engine's thread, so the event loop goes on
   (the engine is synchronous and may hold the GPU for a while);
3. publishes the recommendations and dead letters and waits for the broker
   (`publishing.py`);
4. keeps the batch's messages for the next checkpoint, which saves the changed users'
   states and only then acknowledges the messages (`checkpoints.py`).

Checkpoints run every `snapshot_interval_s` (0: after every batch), and at once when a
rebalance starts or the worker stops gracefully: Faust then waits until every consumed
message is acknowledged, and the next owner restores the states instead of replaying.
Why an interval: per batch would write the same busy users again and again (42 KB each
with the default model); per interval writes each changed user once per interval, and a
crash replays up to one interval more of events, which the engine then skips or re-applies
on the restored state.

The other concerns live in their own modules: new-log detection (`newlog.py`), restores on
rebalance (`checkpoints.py`), hot swap (`hotswap.py`). The rules between them:
- one flush lock: batches, checkpoint cuts, restores and swaps never interleave, so a
  batch runs wholly on one engine over fully restored partitions (asserted in `run_batch`);
- after the first failure (the engine raised, or a restore could not be done) nothing
  more is processed, checkpointed or acknowledged (a step that failed half-way may have
  left half-applied states, which no snapshot may save); the partitions' next owner
  restores and consumes again. A broker that goes away, or refuses a record, is not such a
  failure: `outage.py` sends again until it answers, and what it refuses for good is
  logged and counted (`publishing.py`) or checkpointed again (`checkpoints.py`);
- every consumed message is accounted for (`accounting.py`): the parser's verdict and the
  engine's lists settle it as applied, dead-lettered or a replay skipped.

Faust's own batching (`stream.take`) lost acknowledged-but-unprocessed events during
rebalances here (see docs/ARCHITECTURE.md), hence per-event iteration and explicit acks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust

from hytrec.stream.batcher import MicroBatcher
from hytrec.stream.broker import ensure_topics
from hytrec.stream.checkpoints import Checkpoints
from hytrec.stream.hotswap import ModelSwaps, ModelWatcher
from hytrec.stream.metrics import StreamMetrics
from hytrec.stream.newlog import LogWatch
from hytrec.stream.outage import quiet_client_logs
from hytrec.stream.publishing import Publisher, WorkerStats, log_disk_tier
from hytrec.stream.schemas import (
    BehaviorEvent,
    DeadLetter,
    Engine,
    EngineResult,
    InvalidMessage,
    dead_letter,
    parse_record,
)

if TYPE_CHECKING:
    from hytrec.stream.app import WorkerConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A consumed message waiting for its batch: the event or its dead letter, and the
    generation of its partition's log when it was consumed (see `newlog.py`)."""

    event: Any  # faust.Event, acknowledged after the flush (None in unit tests)
    parsed: BehaviorEvent | None
    dead_letter: DeadLetter | None
    generation: int = 0

    @property
    def partition(self) -> int:
        return self.event.message.partition if self.event is not None else self.parsed.partition

    @property
    def offset(self) -> int:
        return self.event.message.offset if self.event is not None else self.parsed.offset

    def release(self) -> None:
        """Done with, but not acknowledged: Faust no longer waits for it and never commits
        its offset (a message of a replaced log)."""
        if self.event is not None:
            self.event.message.acked = True


class BatchingWorker:
    def __init__(
        self,
        app: faust.App,
        config: WorkerConfig,
        engine_factory: Callable[[], Engine] | None,
        engine_loader: Callable[[Path], Engine] | None = None,
    ):
        """`engine_factory` builds the engine; with `config.models_dir`, `engine_loader`
        builds one from a checkpoint directory, and the factory (may be None) serves only
        while that directory holds no loadable checkpoint."""
        if config.models_dir and engine_loader is None:
            raise ValueError("a models directory needs an engine loader (checkpoint -> engine)")
        if not config.models_dir and engine_factory is None:
            raise ValueError("give an engine factory or a models directory")
        self.app = app
        self.config = config
        self.engine_factory = engine_factory
        self.engine_loader = engine_loader
        self.engine: Engine | None = None
        self.engine_source = ""  # where the first engine came from, when not the factory
        self.stats = WorkerStats()
        self.metrics = StreamMetrics(self)  # Prometheus, served at /metrics with --web-port
        self.batcher: MicroBatcher[Pending] = MicroBatcher(config.batch)
        self.ready = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="hytrec-engine")
        self.stream: Any = None  # the Faust stream, acks disabled
        # set by the first failed batch, checkpoint or restore: from then on nothing more
        # is processed, checkpointed or acknowledged
        self.failed: BaseException | None = None
        self.logged_stop = False
        # behaviours partition -> the last offset a batch of it ran (a swap rebuilds the new
        # model's states up to there)
        self.run_through: dict[int, int] = {}
        self.publisher = Publisher(self)
        self.checkpoints = Checkpoints(self)
        self.logs = LogWatch(self)
        self.models = ModelWatcher(config.models_dir) if config.models_dir else None
        self.swaps = ModelSwaps(self, self.models)

    @property
    def snapshots(self) -> bool:
        """Whether the engine's user states are checkpointed (model engines are)."""
        return self.engine is not None and hasattr(self.engine, "export_states")

    async def on_engine_thread(self, fn: Callable, *args: Any) -> Any:
        """Run `fn(*args)` on the engine's one thread (the engine is not thread-safe)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def stopping(self) -> bool:
        """The app is stopping or the worker failed: retries give up."""
        return self.failed is not None or bool(getattr(self.app, "should_stop", False))

    # ------------------------------------------------------------------ start

    async def start_engine(self) -> None:
        """Create missing topics (both ways of starting a worker pass here), build the engine."""
        started = time.perf_counter()
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the admin client's chatter
        quiet_client_logs()  # an outage must not write dozens of lines a second
        await self.on_engine_thread(
            ensure_topics, self.config.bootstrap, self.config.topics, 30.0, self.config.app_id
        )
        if self.engine is None:  # run_worker builds it before joining the group
            self.engine = await self.on_engine_thread(self.first_engine)
        log.info(
            "engine ready: model %s (%.1f s)%s",
            self.engine.model_version,
            time.perf_counter() - started,
            "" if self.snapshots else "; its states are not checkpointed",
        )
        if self.engine_source:  # said here: run_worker may build it before logging is set up
            log.info("serving %s", self.engine_source)
        self.ready.set()

    def first_engine(self) -> Engine:
        """The newest loadable checkpoint of the models directory, else the factory's: a
        worker restarted after a swap serves the model its snapshots were written with."""
        if self.models is not None:
            self.models.models_dir.mkdir(parents=True, exist_ok=True)
            loaded = self.models.load_next(self.engine_loader, None)
            if loaded is not None:
                self.engine_source = f"{loaded.path} from the models directory"
                return loaded.engine
            if self.engine_factory is None:
                raise RuntimeError(
                    f"{self.models.models_dir} holds no loadable checkpoint and no other "
                    "engine was given (publish one with `hytrec publish-model`)"
                )
        return self.engine_factory()

    async def watch_models(self) -> None:
        await self.swaps.watch()

    # ------------------------------------------------------------------ consuming

    async def consume(self, stream: faust.StreamT) -> None:
        self.stream = stream.noack()
        async for event in self.stream.events():
            await self.ready.wait()
            message = event.message
            if not await self.holds(message):
                # another worker owns the partition now and reads this event again; applied
                # here, to a user this worker no longer holds, it would make a snapshot of
                # a state without the user's earlier events
                self.stats.events_not_held += 1
                event.message.acked = True  # done with, never committed (`Pending.release`)
                continue
            # offsets are checked for holes only on messages fetched since the assignment's
            # seek (one in the agent's hand across a rebalance is older than the seek)
            fresh = getattr(message, "generation_id", None) == getattr(
                self.app, "consumer_generation_id", None
            )
            self.stats.accounting.consumed(message.partition, message.offset if fresh else None)
            if self.batcher.add(self.admit(event), time.monotonic()):
                await self.flush()

    async def holds(self, message: Any) -> bool:
        """Whether the message's partition is assigned here, its states restored and its
        log checked (waiting for a restore under way); False for a partition that is not
        (a message Faust fetched before the partition was revoked)."""
        while True:  # restored and checked, and still so (a restore may start meanwhile)
            if message.partition not in self.checkpoints.assignment:
                if not await self.checkpoints.wait_restored(message.partition):
                    return False
            await self.logs.observe(message)
            if message.partition in self.checkpoints.assignment:
                return True

    def parse(
        self, message: Any, received_at: float | None = None
    ) -> BehaviorEvent | InvalidMessage:
        """A consumed message as a behaviour event, or why not (`schemas.parse_record`)."""
        received_at = time.time() if received_at is None else received_at
        return parse_record(message, self.config.parse, received_at)

    def admit(self, event: Any) -> Pending:
        message = event.message
        received_at = time.time()
        generation = self.logs.generation_of(message.partition)
        parsed = self.parse(message, received_at)
        if isinstance(parsed, BehaviorEvent):
            return Pending(event, parsed, None, generation)
        self.stats.rejected[parsed.reason_code] += 1
        letter = dead_letter(
            parsed.reason_code,
            parsed.detail,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            failed_at=received_at,
            max_payload_bytes=self.config.dlq_max_payload_bytes,
        )
        return Pending(event, None, letter, generation)

    async def run_timer(self) -> None:
        """Flush a batch whose oldest event has waited max_wait_ms; checkpoint when due, and
        at once when a rebalance starts or the worker stops gracefully: Faust then waits for
        every consumed message's ack, and the next owner restores instead of replaying."""
        idle = self.config.batch.max_wait_ms / 1000.0 or 0.01
        while True:
            left = self.batcher.time_left(time.monotonic())
            await asyncio.sleep(idle if left is None else max(left, 0.0))
            urgent = self.handing_over()
            waiting = self.checkpoints.waiting
            if (
                self.batcher.due(time.monotonic())
                or (waiting and self.checkpoints.due())
                or (urgent and (len(self.batcher) or waiting))
            ):
                await self.flush(checkpoint=urgent)
            if urgent and getattr(self.app, "should_stop", False):
                self.log_stop()

    def log_stop(self) -> None:
        """The last word on where every message went, once: from the timer's last turn, or
        from `run_worker` when Faust stopped the timer before it came round again."""
        if self.logged_stop:
            return
        self.logged_stop = True
        log.info("stopping; %s", self.stats.accounting.line())
        log_disk_tier(self.engine)

    def handing_over(self) -> bool:
        """A rebalance is under way, or the app is stopping without having crashed (after a
        crash nothing more may be acknowledged)."""
        app = self.app
        stopping = getattr(app, "should_stop", False) and not getattr(app, "crashed", False)
        return bool(getattr(app, "rebalancing", False) or stopping)

    async def stop_on(self, exc: BaseException, what: str, *args: Any) -> None:
        """The first failure: log it, stop everything from here on, crash the app (a
        restarted worker or the partitions' next owner restores the last snapshots and
        consumes again from the committed offsets)."""
        first = self.failed is None
        self.failed = self.failed or exc
        if first:
            log.exception(what + "; stopping the worker", *args)
        await self.app.crash(exc)

    # ------------------------------------------------------------------ batches

    async def flush(self, checkpoint: bool = False) -> None:
        """Process the waiting batch; checkpoint when due (or when `checkpoint`)."""
        async with self.flush_lock:
            await self.flush_locked(checkpoint)

    async def flush_locked(self, checkpoint: bool) -> None:
        if self.failed is not None:
            return  # stopping: what waits is never processed nor acknowledged
        pending = self.batcher.take()
        try:
            if pending:
                await self.run_batch(pending)
            if self.checkpoints.waiting and (checkpoint or self.checkpoints.due()):
                confirming = await self.checkpoints.start()
                if checkpoint:  # a rebalance or a swap: everything acknowledged before going on
                    await confirming
        except Exception as exc:
            await self.stop_on(exc, "batch of %d events or checkpoint failed", len(pending))
            raise

    async def run_batch(self, pending: list[Pending]) -> None:
        assert self.flush_lock.locked(), "a batch runs under the flush lock, on one engine"
        events = [p.parsed for p in pending if p.parsed is not None]
        unrestored = {e.partition for e in events} - self.checkpoints.assignment
        assert not (unrestored and self.snapshots), f"events of {unrestored} before their states"
        started = time.perf_counter()
        if events:
            result = await self.on_engine_thread(self.engine.process, events)
        else:
            result = EngineResult(recommendations=[], rejected=[])
        engine_done = time.perf_counter()
        await self.publisher.publish(pending, result)
        self.stats.accounting.settle(
            [p.partition for p in pending if p.dead_letter is not None], events, result
        )
        for p in pending:
            self.run_through[p.partition] = max(self.run_through.get(p.partition, -1), p.offset)
        # one recommendation per user whose state changed: user -> behaviours partition
        changed = {rec.user_id: rec.source_partition for rec in result.recommendations}
        self.checkpoints.processed(pending, changed)
        self.publisher.count(
            result, engine_done - started, time.perf_counter() - engine_done, len(pending)
        )
