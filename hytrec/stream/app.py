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
4. only then acknowledges the batch's messages, so Faust commits an offset only past events
   whose effect is published. A crash anywhere before 4 replays them (at-least-once); the
   engine skips what it already applied (issue 5).

Faust's own batching (`stream.take`) lost acknowledged-but-unprocessed events during
rebalances here (see ARCHITECTURE.md), hence per-event iteration and explicit acks. On a
revocation Faust waits until every consumed message is acknowledged, which the timer's
flush does within W ms.

Run it as `hytrec worker ...` or the Faust way, configured by environment variables
(see `WorkerConfig.from_env`): `faust -A hytrec.stream.app worker -l info`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from hytrec.stream.batcher import BatchConfig, MicroBatcher
from hytrec.stream.broker import TopicConfig, ensure_topics
from hytrec.stream.schemas import (
    BehaviorEvent,
    Engine,
    EngineResult,
    InvalidMessage,
    dead_letter,
    encode_behavior,
    parse_behavior,
)

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
    web_port: int | None = None  # Faust's web server (metrics later); None: off
    data_dir: str = ".cache/hytrec/faust"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerConfig:
        """HYTREC_BOOTSTRAP, HYTREC_GROUP, HYTREC_BATCH_SIZE, HYTREC_BATCH_WAIT_MS,
        HYTREC_BEHAVIORS_PARTITIONS, HYTREC_RECOMMENDATIONS_PARTITIONS, HYTREC_EMBEDDED_BROKER
        (1/0), HYTREC_WEB_PORT, HYTREC_DATA_DIR; unset ones keep their defaults."""
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


@dataclass(slots=True)
class _Pending:
    """A consumed message waiting for its batch: the event or its dead letter."""

    event: Any  # faust.Event, acknowledged after the flush
    parsed: BehaviorEvent | None
    dead_letter: bytes | None


class BatchingWorker:
    def __init__(self, app: faust.App, config: WorkerConfig, engine_factory: Callable[[], Engine]):
        self.app = app
        self.config = config
        self.engine_factory = engine_factory
        self.engine: Engine | None = None
        self.stats = WorkerStats()
        self.batcher: MicroBatcher[_Pending] = MicroBatcher(config.batch)
        self._ready = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hytrec-engine")
        self._stream: Any = None

    async def start_engine(self) -> None:
        """Create missing topics (both ways of starting a worker pass here), build the engine."""
        started = time.perf_counter()
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the admin client's chatter
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor, ensure_topics, self.config.bootstrap, self.config.topics
        )
        self.engine = await loop.run_in_executor(self._executor, self.engine_factory)
        log.info(
            "engine ready: model %s (%.1f s)",
            self.engine.model_version,
            time.perf_counter() - started,
        )
        self._ready.set()

    async def consume(self, stream: faust.StreamT) -> None:
        self._stream = stream.noack()
        async for event in self._stream.events():
            await self._ready.wait()
            if self.batcher.add(self._admit(event), time.monotonic()):
                await self.flush()

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
        """Flush a batch whose oldest event has waited max_wait_ms."""
        idle = self.config.batch.max_wait_ms / 1000.0 or 0.01
        while True:
            left = self.batcher.time_left(time.monotonic())
            await asyncio.sleep(idle if left is None else max(left, 0.0))
            if self.batcher.due(time.monotonic()):
                await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            pending = self.batcher.take()
            if not pending:
                return
            events = [p.parsed for p in pending if p.parsed is not None]
            started = time.perf_counter()
            try:
                if events:
                    result = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.engine.process, events
                    )
                else:
                    result = EngineResult(recommendations=[], rejected=[], skipped_duplicates=0)
                engine_done = time.perf_counter()
                await self._publish(pending, result)
            except Exception as exc:
                # nothing of this batch is acknowledged: stop, and a restarted worker (or
                # the partitions' next owner) consumes it again from the committed offsets
                log.exception("batch of %d events failed; stopping the worker", len(pending))
                await self.app.crash(exc)
                raise
            for p in pending:  # only now may Faust commit past these offsets
                await self._stream.ack(p.event)
            self._count(result, engine_done - started, time.perf_counter() - engine_done)

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

    def _count(self, result: EngineResult, engine_s: float, publish_s: float) -> None:
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
                "duplicates skipped %d, engine %.1f s, publish %.1f s",
                stats.batches,
                stats.events_in,
                stats.recommendations_out,
                sum(stats.rejected.values()),
                dict(stats.rejected),
                stats.skipped_duplicates,
                stats.engine_seconds,
                stats.publish_seconds,
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


def create_app(config: WorkerConfig, engine_factory: Callable[[], Engine]) -> StreamApp:
    """The Faust app with the batching agent; the engine is built when the worker starts."""
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
    worker = app.hytrec_worker = BatchingWorker(app, config, engine_factory)
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


def run_worker(
    config: WorkerConfig, engine_factory: Callable[[], Engine], loglevel: str = "info"
) -> int:
    """Run a Faust worker until it is stopped; its exit status."""
    app = create_app(config, engine_factory)
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
        _app = create_app(
            WorkerConfig.from_env(env),
            engine_factory_from(
                env.get("HYTREC_CHECKPOINT"),
                env.get("HYTREC_INDEX"),
                env.get("HYTREC_ENGINE"),
                _engine_config_from_env(env),
            ),
        )
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
