"""The Faust app: consume `behaviors`, micro-batch, run the engine, publish, then acknowledge.

One agent (concurrency 1) iterates the stream event by event with acks disabled and feeds
a `MicroBatcher`; a flush runs when the batch is full (in the agent, which is backpressure)
or when its oldest event has waited W ms (a timer task). A flush

1. validates nothing twice: each message was parsed when it arrived, invalid ones wait in
   the batch as dead letters so they are acknowledged in order with their neighbours;
2. runs `engine.process(valid events)` in a one-thread executor, so the event loop goes on
   (the engine is synchronous and may hold the GPU for a while);
3. publishes the recommendations (key = user id) and every dead letter (parse errors and
   the engine's rejects) together and waits until the broker confirmed them all;
4. keeps the batch's messages for the next checkpoint, which writes a snapshot of every
   user whose state changed since the last one to the compacted `user-state` topic
   (co-partitioned with `behaviors`, key = user id; see `snapshots.py`), waits until the
   broker confirmed them, and only then acknowledges the messages. Faust therefore commits
   an offset only past events whose effect is published *and* saved in a snapshot.

Checkpoints run every `snapshot_interval_s` (0: after every batch), and at once when a
rebalance starts. Only the cut holds the batches up: the changed users' states are copied
between two batches; encoding, writing and confirming the snapshots and acknowledging the
messages run in a task while the next batches go on (checkpoints confirm in order).

Why an interval: per batch would write the same busy users again and again (42 KB each
with the default model; a batch of 256 events touches ~200 users, so ~1 GB per 100k
events); per interval writes each changed user once per interval, and the only price is
that a crash replays up to one interval more of events, which the engine then skips or
re-applies on the restored state. Engines without `export_states` (test engines) write no
snapshots: their messages are acknowledged right after the publish.

Restoring. When partitions are assigned, the worker (before it processes any event of the
new assignment: the agent waits, and so does Faust's resume) drops the users of partitions
it lost, and reads the `user-state` partitions it holds up to a sentinel it appends itself
(Tansu misreports end offsets): for each user the snapshot with the highest applied offset
replaces the store's state when it is ahead of it. Partitions it kept are read only from
where it stopped last time (usually its own snapshots, which are not ahead). The engine
then skips every replayed event at or below a user's applied offset: effectively-once on
state, at-least-once on recommendations (a replayed event may be answered again).

Faust's own batching (`stream.take`) lost acknowledged-but-unprocessed events during
rebalances here (see ARCHITECTURE.md), hence per-event iteration and explicit acks. On a
revocation, and when the worker stops gracefully, Faust waits until every consumed message
is acknowledged: the timer sees the rebalance (`app.rebalancing`) or the stop
(`app.should_stop`, not crashed) and flushes and checkpoints at once, so the next owner
restores the states instead of replaying the events.

Hot swap (`models_dir`, see `hotswap.py`). A task looks at the models directory every
`models_poll_s`; a newer checkpoint is loaded and its index built in a thread of its own,
then `swap_engine` takes the flush lock, runs and checkpoints the old engine's waiting batch
and swaps the engine reference: a batch runs wholly on one engine, and no search is in
flight (searches run inside batches). User states are reset (logged with their count).

New logs. Offsets of a partition go back on every replay, and also when the broker lost the
log (the embedded broker keeps logs in memory: after a restart offsets start again at 0,
and the per-user applied offsets would skip every new event). When they go back, the worker
reads the record at the newest offset it consumed (`_check_log`): the same record means a
replay; another or none means a new log, whose users keep their states but forget their
applied offsets.

Run it as `hytrec worker ...` or the Faust way, configured by environment variables
(see `WorkerConfig.from_env`): `faust -A hytrec.stream.app worker -l info`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from hytrec.stream.batcher import BatchConfig, MicroBatcher
from hytrec.stream.broker import TopicConfig, ensure_topics
from hytrec.stream.hotswap import LoadedEngine, ModelWatcher, checkpoint_loader
from hytrec.stream.metrics import CONTENT_TYPE, StreamMetrics
from hytrec.stream.schemas import (
    BehaviorEvent,
    Engine,
    EngineResult,
    InvalidMessage,
    dead_letter,
    encode_behavior,
    parse_behavior,
)
from hytrec.stream.snapshots import decode_snapshot, encode_snapshot, read_snapshots
from hytrec.stream.tail import record_at

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    bootstrap: str = "127.0.0.1:9092"  # comma-separated host:port list
    app_id: str = "hytrec-worker"  # the Kafka consumer group
    topics: TopicConfig = TopicConfig()
    batch: BatchConfig = BatchConfig()
    max_message_bytes: int = 64 * 1024  # larger behaviour messages go to the DLQ
    max_future_s: float = 24 * 3600.0  # event times further ahead of the clock are refused
    # The embedded broker answers a fetch only after half its max wait and joins a group
    # after half the session timeout: on it, use these; on real Kafka keep Faust's defaults.
    embedded_broker: bool = False
    fetch_max_wait_ms: int = 50
    session_timeout_s: float = 6.0
    log_every_batches: int = 100
    snapshot_interval_s: float = 2.0  # checkpoint changed user states this often; 0: each batch
    restore_timeout_s: float = 120.0  # reading the user-state partitions on an assignment
    web_port: int | None = None  # Faust's web server, serves /metrics; None: off
    data_dir: str = ".cache/hytrec/faust"
    models_dir: str | None = None  # hot swap: serve the newest checkpoint here (hotswap.py)
    models_poll_s: float = 10.0  # how often the models directory is looked at

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerConfig:
        """HYTREC_BOOTSTRAP, HYTREC_GROUP, HYTREC_BATCH_SIZE, HYTREC_BATCH_WAIT_MS,
        HYTREC_BEHAVIORS_PARTITIONS, HYTREC_RECOMMENDATIONS_PARTITIONS, HYTREC_EMBEDDED_BROKER
        (1/0), HYTREC_WEB_PORT, HYTREC_DATA_DIR, HYTREC_SNAPSHOT_INTERVAL_S,
        HYTREC_MODELS_DIR, HYTREC_MODELS_POLL_S; unset ones keep their defaults."""
        d = cls()
        web_port = env.get("HYTREC_WEB_PORT")
        return cls(
            bootstrap=env.get("HYTREC_BOOTSTRAP", d.bootstrap),
            app_id=env.get("HYTREC_GROUP", d.app_id),
            topics=TopicConfig(
                behaviors_partitions=int(
                    env.get("HYTREC_BEHAVIORS_PARTITIONS", d.topics.behaviors_partitions)
                ),
                recommendations_partitions=int(
                    env.get(
                        "HYTREC_RECOMMENDATIONS_PARTITIONS", d.topics.recommendations_partitions
                    )
                ),
            ),
            batch=BatchConfig(
                max_items=int(env.get("HYTREC_BATCH_SIZE", d.batch.max_items)),
                max_wait_ms=float(env.get("HYTREC_BATCH_WAIT_MS", d.batch.max_wait_ms)),
            ),
            embedded_broker=env.get("HYTREC_EMBEDDED_BROKER", "0") not in ("", "0", "false"),
            web_port=int(web_port) if web_port else None,
            data_dir=env.get("HYTREC_DATA_DIR", d.data_dir),
            snapshot_interval_s=float(env.get("HYTREC_SNAPSHOT_INTERVAL_S", d.snapshot_interval_s)),
            models_dir=env.get("HYTREC_MODELS_DIR") or None,
            models_poll_s=float(env.get("HYTREC_MODELS_POLL_S", d.models_poll_s)),
        )


@dataclass
class WorkerStats:
    """Counters for the metrics issue; read them from `BatchingWorker.stats`."""

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
    log_resets: int = 0  # behaviours partitions found to be a new log (see _check_log)
    users_dropped: int = 0
    restore_seconds: float = 0.0
    model_swaps: int = 0
    model_load_seconds: float = 0.0  # loading models and building their indexes, all swaps
    model_swap_seconds: float = 0.0  # holding the flush lock for swaps (batches wait)


@dataclass(slots=True)
class _Pending:
    """A consumed message waiting for its batch: the event or its dead letter."""

    event: Any  # faust.Event, acknowledged after the flush
    parsed: BehaviorEvent | None
    dead_letter: bytes | None


@dataclass(frozen=True, slots=True)
class _Fingerprint:
    """What tells a record from another at the same offset of a partition."""

    offset: int
    key: bytes | None
    timestamp_ms: int
    value_crc: int

    @classmethod
    def of(cls, message: Any) -> _Fingerprint:
        """Of a Faust message (timestamp in seconds) or a kafka-python record (in ms)."""
        ts = message.timestamp
        timestamp_ms = round(ts * 1000) if isinstance(ts, float) else int(ts)
        return cls(message.offset, message.key, timestamp_ms, zlib.crc32(message.value or b""))


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
        self.models = ModelWatcher(config.models_dir) if config.models_dir else None
        self.engine: Engine | None = None
        self.stats = WorkerStats()
        self.metrics = StreamMetrics(self)  # Prometheus, served at /metrics with --web-port
        self.batcher: MicroBatcher[_Pending] = MicroBatcher(config.batch)
        self._ready = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hytrec-engine")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="hytrec-model-load")
        self._stream: Any = None
        # delivery (issue 5): messages processed but not yet covered by a checkpoint, users
        # changed since the last one, each known user's behaviours partition, the
        # behaviours partitions held and where their user-state partitions were read up to
        self._unacked: list[_Pending] = []
        self._dirty: set[str] = set()
        self._partition_of: dict[str, int] = {}
        self._assignment: set[int] = set()
        self._state_position: dict[int, int] = {}
        # the newest message consumed per behaviours partition, and the newest offset below
        # which a replay was found to be of the same log (see `_check_log`)
        self._newest: dict[int, Any] = {}  # the Faust message; fingerprinted only when checked
        self._replay_checked: dict[int, int] = {}
        self._restoring: asyncio.Future | None = None
        self._last_checkpoint = time.monotonic()
        self._confirming: asyncio.Future | None = None  # the newest checkpoint's task
        # set by the first failed batch, checkpoint or restore: from then on nothing more is
        # processed, checkpointed or acknowledged (a step that failed half-way may have left
        # half-applied states, which a later snapshot must not save)
        self._failed: BaseException | None = None

    @property
    def snapshots(self) -> bool:
        """Whether the engine's user states are checkpointed (model engines are)."""
        return self.engine is not None and hasattr(self.engine, "export_states")

    async def start_engine(self) -> None:
        """Create missing topics (both ways of starting a worker pass here), build the engine."""
        started = time.perf_counter()
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the admin client's chatter
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor, ensure_topics, self.config.bootstrap, self.config.topics
        )
        self.engine = await loop.run_in_executor(self._executor, self._first_engine)
        log.info(
            "engine ready: model %s (%.1f s)%s",
            self.engine.model_version,
            time.perf_counter() - started,
            "" if self.snapshots else "; its states are not checkpointed",
        )
        self._ready.set()

    def _first_engine(self) -> Engine:
        """The newest loadable checkpoint of the models directory, else the factory's: a
        worker restarted after a swap serves the model its snapshots were written with."""
        if self.models is not None:
            self.models.models_dir.mkdir(parents=True, exist_ok=True)
            loaded = self.models.load_next(self.engine_loader, None)
            if loaded is not None:
                log.info("serving %s from the models directory", loaded.path)
                return loaded.engine
            if self.engine_factory is None:
                raise RuntimeError(
                    f"{self.models.models_dir} holds no loadable checkpoint and no other "
                    "engine was given (publish one with `hytrec publish-model`)"
                )
        return self.engine_factory()

    # ------------------------------------------------------------------ hot swap

    async def watch_models(self) -> None:
        """Every `models_poll_s`: load the models directory's newest checkpoint when its
        version differs from the serving one (in a thread of its own: neither the event
        loop nor the engine's thread waits for it), then swap it in between batches."""
        await self._ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.models_poll_s)
            try:
                loaded = await loop.run_in_executor(
                    self._loader,
                    self.models.load_next,
                    self.engine_loader,
                    self.engine.model_version,
                )
            except OSError:  # the directory is unreadable now; the next poll tries again
                log.exception("cannot look at models directory %s", self.models.models_dir)
                continue
            if loaded is not None:
                await self.swap_engine(loaded)

    async def swap_engine(self, loaded: LoadedEngine) -> None:
        """Serve `loaded.engine` from the next batch on. Under the flush lock: the old
        engine's waiting batch runs and its states are checkpointed and acknowledged first,
        so every batch runs on one engine and every event is applied by exactly one. The
        old model's user states mean nothing under the new weights: they are reset."""
        started = time.perf_counter()
        async with self._flush_lock:
            await self._flush_locked(checkpoint=True)
            old, self.engine = self.engine, loaded.engine
            swap_s = time.perf_counter() - started
        reset = len(getattr(old, "store", ()))
        stats = self.stats
        stats.model_swaps += 1
        stats.model_load_seconds += loaded.load_seconds
        stats.model_swap_seconds += swap_s
        log.info(
            "model swapped %s -> %s (%s): %d user states reset (the new model starts them "
            "empty; snapshots of %s are refused from now on); load and index %.2f s, "
            "batches held %.3f s",
            old.model_version,
            loaded.engine.model_version,
            loaded.path,
            reset,
            old.model_version,
            loaded.load_seconds,
            swap_s,
        )

    async def consume(self, stream: faust.StreamT) -> None:
        self._stream = stream.noack()
        async for event in self._stream.events():
            await self._ready.wait()
            message = event.message
            if message.partition not in self._assignment:
                await self._wait_restored(message.partition)
            newest = self._newest.get(message.partition)
            if newest is not None and message.offset <= newest.offset:
                await self._check_log(message.partition, newest, message.offset)
                newest = self._newest.get(message.partition)  # None after a new log
            if newest is None or message.offset > newest.offset:
                self._newest[message.partition] = message
            if self.batcher.add(self._admit(event), time.monotonic()):
                await self.flush()

    async def _check_log(self, partition: int, newest: Any, offset: int) -> None:
        """Offsets went back: a replay (after a rebalance or restart) of the same log, whose
        events the engine skips, or a new log (the broker lost its data, e.g. the embedded
        broker's memory storage after a restart), whose events the engine must not skip
        although their offsets are at or below the users' applied offsets. The record at
        the newest offset seen tells them apart, once per replay."""
        if self._replay_checked.get(partition) == newest.offset:
            return
        topic = self.config.topics.behaviors
        record = await asyncio.get_running_loop().run_in_executor(
            None, record_at, self.config.bootstrap, topic, partition, newest.offset, 5.0
        )
        if record is not None and _Fingerprint.of(newest) == _Fingerprint.of(record):
            self._replay_checked[partition] = newest.offset
            return
        await self.flush()  # what was consumed from the old log is applied first
        users = [u for u, p in self._partition_of.items() if p == partition]
        reset = getattr(self.engine, "reset_offsets", None)
        if reset is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, reset, users)
        self._dirty.update(users)  # snapshots in the new log (the old ones are gone with it)
        self._state_position.pop(partition, None)
        del self._newest[partition]
        self._replay_checked.pop(partition, None)
        self.stats.log_resets += 1
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

    def _admit(self, event: Any) -> _Pending:
        message = event.message
        received_at = time.time()
        self.stats.events_in += 1
        try:
            parsed = parse_behavior(
                message.value,
                message.key,
                partition=message.partition,
                offset=message.offset,
                received_at=received_at,
                max_bytes=self.config.max_message_bytes,
                max_future_s=self.config.max_future_s,
            )
            return _Pending(event, parsed, None)
        except InvalidMessage as exc:
            self.stats.rejected[exc.reason_code] += 1
            return _Pending(
                event,
                None,
                dead_letter(
                    exc.reason_code,
                    exc.detail,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    key=message.key,
                    value=message.value,
                    failed_at=received_at,
                ),
            )

    async def run_timer(self) -> None:
        """Flush a batch whose oldest event has waited max_wait_ms; checkpoint when due, and
        at once when a rebalance starts or the worker stops gracefully: Faust then waits for
        every consumed message's ack, and the next owner restores instead of replaying."""
        idle = self.config.batch.max_wait_ms / 1000.0 or 0.01
        while True:
            left = self.batcher.time_left(time.monotonic())
            await asyncio.sleep(idle if left is None else max(left, 0.0))
            urgent = self._handing_over()
            if (
                self.batcher.due(time.monotonic())
                or (self._unacked and self._checkpoint_due())
                or (urgent and (len(self.batcher) or self._unacked))
            ):
                await self.flush(checkpoint=urgent)

    def _handing_over(self) -> bool:
        """A rebalance is under way, or the app is stopping without having crashed (after a
        crash nothing more may be acknowledged)."""
        app = self.app
        stopping = getattr(app, "should_stop", False) and not getattr(app, "crashed", False)
        return bool(getattr(app, "rebalancing", False) or stopping)

    async def _stop_on(self, exc: BaseException, what: str, *args: Any) -> None:
        """The first failure: log it, stop everything from here on, crash the app (a
        restarted worker or the partitions' next owner restores the last snapshots and
        consumes again from the committed offsets)."""
        first = self._failed is None
        self._failed = self._failed or exc
        if first:
            log.exception(what + "; stopping the worker", *args)
        await self.app.crash(exc)

    def _checkpoint_due(self) -> bool:
        if not self.snapshots:
            return True
        interval = self.config.snapshot_interval_s
        return interval <= 0 or time.monotonic() - self._last_checkpoint >= interval

    async def flush(self, checkpoint: bool = False) -> None:
        """Process the waiting batch; checkpoint when due (or when `checkpoint`)."""
        async with self._flush_lock:
            await self._flush_locked(checkpoint)

    async def _flush_locked(self, checkpoint: bool) -> None:
        if self._failed is not None:
            return  # stopping: what waits is never processed nor acknowledged
        pending = self.batcher.take()
        try:
            if pending:
                await self._run_batch(pending)
            if self._unacked and (checkpoint or self._checkpoint_due()):
                confirming = await self._start_checkpoint()
                if checkpoint:  # a rebalance or a swap: everything acknowledged before going on
                    await confirming
        except Exception as exc:
            await self._stop_on(exc, "batch of %d events or checkpoint failed", len(pending))
            raise

    async def _run_batch(self, pending: list[_Pending]) -> None:
        events = [p.parsed for p in pending if p.parsed is not None]
        started = time.perf_counter()
        if events:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.process, events
            )
        else:
            result = EngineResult(recommendations=[], rejected=[], skipped_duplicates=0)
        engine_done = time.perf_counter()
        await self._publish(pending, result)
        self._unacked.extend(pending)
        for rec in result.recommendations:  # one per user whose state changed
            self._dirty.add(rec.user_id)
            self._partition_of[rec.user_id] = rec.source_partition
        self._count(result, engine_done - started, time.perf_counter() - engine_done, len(pending))

    async def _start_checkpoint(self) -> asyncio.Future:
        """Under the flush lock: cut what the checkpoint covers (the messages processed so
        far and the states of the users they changed, copied now), then write the snapshots
        and acknowledge the messages in a task, while the next batches run. Checkpoints
        confirm one after another. The task (awaited where everything must be acknowledged
        before going on)."""
        started = time.perf_counter()
        unacked, self._unacked = self._unacked, []
        snapshots: list = []
        if self.snapshots and self._dirty:
            dirty = {u: self._partition_of[u] for u in self._dirty}
            self._dirty = set()
            snapshots = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.export_states, dirty
            )
        self._last_checkpoint = time.monotonic()
        previous = self._confirming
        self._confirming = asyncio.ensure_future(
            self._confirm_checkpoint(snapshots, unacked, previous, started)
        )
        return self._confirming

    async def _confirm_checkpoint(
        self,
        snapshots: list,
        unacked: list[_Pending],
        previous: asyncio.Future | None,
        started: float,
    ) -> None:
        """Write the snapshots, wait for the broker, then acknowledge the messages they cover
        (only now may Faust commit past these offsets). A failure stops the worker with
        nothing of this checkpoint acknowledged."""
        try:
            if previous is not None:
                await previous
            records = []
            if snapshots:
                records = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: [(s.user_id, s.partition, encode_snapshot(s)) for s in snapshots]
                )
                producer, topic = self.app.producer, self.config.topics.user_state
                deliveries = [
                    await producer.send(topic, user.encode(), value, partition, None, None)
                    for user, partition, value in records
                ]
                await asyncio.gather(*deliveries)
            for p in unacked:
                await self._stream.ack(p.event)
        except Exception as exc:
            await self._stop_on(exc, "checkpoint of %d snapshots failed", len(snapshots))
            raise
        self.stats.snapshots_written += len(records)
        self.stats.snapshot_bytes += sum(len(value) for _, _, value in records)
        self.stats.checkpoints += 1
        self.stats.checkpoint_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ rebalances

    async def on_partitions_assigned(self, assigned: set) -> None:
        """Faust's signal: start restoring the new assignment's states (the agent and
        Faust's resume wait for it; see `wait_restored`)."""
        partitions = {tp.partition for tp in assigned if tp.topic == self.config.topics.behaviors}
        previous = self._restoring
        self._restoring = asyncio.ensure_future(self._reassign(partitions, previous))

    async def _wait_restored(self, partition: int) -> None:
        """No event of a newly assigned partition before that partition's user states."""
        deadline = time.monotonic() + 5.0
        while partition not in self._assignment:
            if self._restoring is not None and not self._restoring.done():
                await self._restoring
            elif time.monotonic() > deadline:
                log.warning("an event of partition %d, which was never assigned", partition)
                return
            else:
                await asyncio.sleep(0.01)

    async def wait_restored(self) -> None:
        """Faust's on_rebalance_complete signal, awaited before it resumes the partitions:
        wait for a restore in progress. Not before the engine exists: Faust starts the task
        that builds it only after this first rebalance (the agent waits then)."""
        if self._ready.is_set() and self._restoring is not None:
            await self._restoring

    async def _reassign(self, partitions: set[int], previous: asyncio.Future | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self._ready.wait()
        try:
            async with self._flush_lock:
                await self._flush_locked(checkpoint=True)  # usually done on revocation
                lost = self._assignment - partitions
                self._assignment = set()  # events wait until the states are back
                if self.snapshots:
                    await self._restore(partitions, lost)
                self._assignment = set(partitions)
        except Exception as exc:
            await self._stop_on(exc, "restoring user states failed")
            raise

    async def _restore(self, partitions: set[int], lost: set[int]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        gone = [u for u, p in self._partition_of.items() if p in lost]
        for user in gone:
            del self._partition_of[user]
            self._dirty.discard(user)
        for p in lost:
            self._state_position.pop(p, None)
        dropped = await loop.run_in_executor(self._executor, self.engine.drop_users, gone)
        latest, ends = await loop.run_in_executor(
            None,
            functools.partial(
                read_snapshots,
                self.config.bootstrap,
                self.config.topics.user_state,
                sorted(partitions),
                dict(self._state_position),
                self.config.restore_timeout_s,
            ),
        )
        restored = await loop.run_in_executor(self._executor, self._import_states, latest)
        self._state_position.update(ends)
        self.stats.users_restored += restored
        self.stats.users_dropped += dropped
        self.stats.restore_seconds += time.perf_counter() - started
        log.info(
            "assignment %s: restored %d of %d users from %s, dropped %d (%.2f s)",
            sorted(partitions),
            restored,
            len(latest),
            self.config.topics.user_state,
            dropped,
            time.perf_counter() - started,
        )

    def _import_states(self, latest: dict) -> int:
        """Runs on the engine's thread: decode the snapshots ahead of the store, import."""
        offset_of = getattr(getattr(self.engine, "store", None), "offset_of", None)
        snapshots = []
        for header, value in latest.values():
            self._partition_of.setdefault(header.user_id, header.partition)
            if offset_of is None or header.applied_offset > offset_of(header.user_id):
                snapshots.append(decode_snapshot(value))
        return self.engine.import_states(snapshots) if snapshots else 0

    async def _publish(self, pending: list[_Pending], result: EngineResult) -> None:
        topics, producer = self.config.topics, self.app.producer
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

    def _count(
        self, result: EngineResult, engine_s: float, publish_s: float, batch_size: int | None = None
    ) -> None:
        self.metrics.observe_batch(result, batch_size, engine_s, publish_s, self.engine)
        stats = self.stats
        stats.batches += 1
        stats.recommendations_out += len(result.recommendations)
        stats.skipped_duplicates += result.skipped_duplicates
        stats.rejected.update(reason for _, reason, _ in result.rejected)
        stats.engine_seconds += engine_s
        stats.publish_seconds += publish_s
        if stats.batches % self.config.log_every_batches == 0:
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


class _LowLatencyConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 literally; aiokafka reads this attribute only
        # when it builds its fetcher in start(), so setting it here takes effect.
        consumer._fetch_max_wait_ms = self.app.hytrec_config.fetch_max_wait_ms
        return consumer


class _LowLatencyConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self):
        return _LowLatencyConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _LowLatencyTransport(faust_aiokafka.Transport):
    Consumer = _LowLatencyConsumer


class StreamApp(faust.App):
    """A Faust app that uses a short fetch wait when told it runs on the embedded broker."""

    hytrec_config: WorkerConfig
    hytrec_worker: BatchingWorker

    def _new_transport(self):
        if self.hytrec_config.embedded_broker:
            return _LowLatencyTransport(self.conf.broker_consumer, self)
        return super()._new_transport()


def create_app(
    config: WorkerConfig,
    engine_factory: Callable[[], Engine] | None,
    engine_loader: Callable[[Path], Engine] | None = None,
) -> StreamApp:
    """The Faust app with the batching agent; the engine is built when the worker starts
    (see `BatchingWorker` for the two ways)."""
    settings: dict[str, Any] = {}
    if config.embedded_broker:
        # the group keeps its first member's session timeout on Tansu: short from the start
        settings.update(
            broker_session_timeout=config.session_timeout_s,
            broker_heartbeat_interval=config.session_timeout_s / 6,
            broker_rebalance_timeout=config.session_timeout_s,
        )
    app = StreamApp(
        config.app_id,
        broker=[f"kafka://{server.strip()}" for server in config.bootstrap.split(",")],
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",  # a new group reads what was published before
        topic_partitions=config.topics.behaviors_partitions,
        web_enabled=config.web_port is not None,
        web_port=config.web_port or 6066,
        datadir=config.data_dir,
        **settings,
    )
    app.hytrec_config = config
    worker = app.hytrec_worker = BatchingWorker(app, config, engine_factory, engine_loader)
    behaviors = app.topic(
        config.topics.behaviors,
        key_type=bytes,
        value_type=bytes,
        partitions=config.topics.behaviors_partitions,
    )

    async def behaviors_agent(stream):
        await worker.consume(stream)

    app.agent(behaviors, name="hytrec.behaviors", concurrency=1)(behaviors_agent)
    app.task(worker.start_engine)
    app.task(worker.run_timer)
    if config.models_dir:
        app.task(worker.watch_models)
    if config.web_port is not None:

        @app.page("/metrics")
        async def metrics(view, request):
            """Prometheus text exposition of `worker.metrics` (hytrec/stream/metrics.py)."""
            body = worker.metrics.exposition()
            return view.bytes(body, headers={"Content-Type": CONTENT_TYPE})

    @app.on_partitions_assigned.connect
    async def on_partitions_assigned(sender, assigned, **kwargs):
        await worker.on_partitions_assigned(assigned)

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender, **kwargs):
        await worker.wait_restored()

    return app


def load_factory(spec: str) -> Callable[[], Engine]:
    """'package.module:callable' -> the callable (an engine factory taking no arguments)."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"expected MODULE:CALLABLE, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def engine_factory_from(
    checkpoint: str | None,
    index: str | None = None,
    engine: str | None = None,
    engine_config: Any = None,
) -> Callable[[], Engine]:
    """An engine factory: a MODULE:CALLABLE, or the model engine of a checkpoint
    (`engine_config`: an `EngineConfig`, default when None)."""
    if engine:
        return load_factory(engine)
    if not checkpoint:
        raise ValueError("give a checkpoint directory (or an engine factory MODULE:CALLABLE)")

    def build() -> Engine:
        from hytrec.stream.engine import build_engine  # torch and FAISS load only here

        return build_engine(checkpoint, index_dir=index, config=engine_config)

    return build


def engine_sources(
    checkpoint: str | None,
    index: str | None,
    engine: str | None,
    engine_config: Any,
    models_dir: str | None,
) -> tuple[Callable[[], Engine] | None, Callable[[Path], Engine] | None]:
    """The engine factory (None when only a models directory is given) and, with a models
    directory, the checkpoint -> engine loader of its checkpoints."""
    if not models_dir:
        return engine_factory_from(checkpoint, index, engine, engine_config), None
    if engine:
        raise ValueError("a models directory serves model checkpoints, not an engine factory")
    factory = engine_factory_from(checkpoint, index, None, engine_config) if checkpoint else None
    return factory, checkpoint_loader(engine_config)


def run_worker(
    config: WorkerConfig,
    engine_factory: Callable[[], Engine] | None,
    loglevel: str = "info",
    engine_loader: Callable[[Path], Engine] | None = None,
) -> int:
    """Run a Faust worker until it is stopped; its exit status."""
    app = create_app(config, engine_factory, engine_loader)
    try:
        faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


_app: StreamApp | None = None


def __getattr__(name: str) -> Any:
    """`app`, built on first access from the environment, for `faust -A hytrec.stream.app`:
    HYTREC_CHECKPOINT, HYTREC_INDEX, HYTREC_ENGINE (MODULE:CALLABLE), the variables of
    `_engine_config_from_env` and those of `WorkerConfig.from_env`."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        env = os.environ
        config = WorkerConfig.from_env(env)
        factory, loader = engine_sources(
            env.get("HYTREC_CHECKPOINT"),
            env.get("HYTREC_INDEX"),
            env.get("HYTREC_ENGINE"),
            _engine_config_from_env(env),
            config.models_dir,
        )
        _app = create_app(config, factory, loader)
    return _app


def _engine_config_from_env(env: Mapping[str, str]):
    """HYTREC_DEVICE, HYTREC_TOP_K, HYTREC_STATE_BUDGET_MIB; unset ones keep their defaults."""
    from hytrec.stream.engine import EngineConfig

    d = EngineConfig()
    return EngineConfig(
        top_k=int(env.get("HYTREC_TOP_K", d.top_k)),
        state_budget_bytes=int(float(env.get("HYTREC_STATE_BUDGET_MIB", 0)) * 2**20)
        or d.state_budget_bytes,
        device=env.get("HYTREC_DEVICE", d.device),
    )
