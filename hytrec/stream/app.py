"""The Faust app of the worker: configuration, wiring and the two ways to run it.

`create_app` builds a Faust app whose one agent hands every `behaviors` message to a
`BatchingWorker` (`worker.py`: batching, engine, publishing, acknowledgement), with the
worker's tasks (batch timer, models directory watch) and rebalance signals (restores in
`checkpoints.py`) connected, and /metrics served when a web port is given.

Run it as `hytrec worker ...` or the Faust way, configured by environment variables
(see `WorkerConfig.from_env`): `faust -A hytrec.stream.app worker -l info`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from hytrec.stream.batcher import BatchConfig
from hytrec.stream.broker import TopicConfig
from hytrec.stream.hotswap import checkpoint_loader
from hytrec.stream.metrics import CONTENT_TYPE
from hytrec.stream.schemas import DLQ_MAX_PAYLOAD_BYTES, Engine, ParseLimits
from hytrec.stream.worker import BatchingWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    bootstrap: str = "127.0.0.1:9092"  # comma-separated host:port list
    app_id: str = "hytrec-worker"  # the Kafka consumer group
    topics: TopicConfig = TopicConfig()
    batch: BatchConfig = BatchConfig()
    parse: ParseLimits = ParseLimits()  # sizes, nesting, future allowance and policy
    dlq_max_payload_bytes: int = DLQ_MAX_PAYLOAD_BYTES  # a dead letter keeps this much
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

    def __post_init__(self) -> None:
        self.topics.state_topic(self.app_id)  # the group names a topic: refuse bad names now

    @property
    def state_topic(self) -> str:
        """This group's user-state topic: groups never share snapshots."""
        return self.topics.state_topic(self.app_id)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerConfig:
        """HYTREC_BOOTSTRAP, HYTREC_GROUP, HYTREC_BATCH_SIZE, HYTREC_BATCH_WAIT_MS,
        HYTREC_BEHAVIORS_PARTITIONS, HYTREC_RECOMMENDATIONS_PARTITIONS, HYTREC_EMBEDDED_BROKER
        (1/0), HYTREC_WEB_PORT, HYTREC_DATA_DIR, HYTREC_SNAPSHOT_INTERVAL_S,
        HYTREC_MODELS_DIR, HYTREC_MODELS_POLL_S, HYTREC_MAX_FUTURE_S, HYTREC_FUTURE_POLICY;
        unset ones keep their defaults."""
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
            parse=ParseLimits(
                max_future_s=float(env.get("HYTREC_MAX_FUTURE_S", d.parse.max_future_s)),
                future_policy=env.get("HYTREC_FUTURE_POLICY", d.parse.future_policy),
            ),
        )


class _LowLatencyConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 literally; aiokafka reads this attribute only
        # when it builds its fetcher in start(), so setting it here takes effect.
        consumer._fetch_max_wait_ms = self.app.hytrec_config.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, with three changes: on the embedded broker a short fetch
    wait; no commit of offsets unless the `behaviors` log they belong to is still the
    broker's (a broker that lost its data and came back must not receive the old log's
    offsets: the group would then skip the new log's events below them; see newlog.py);
    and a partition the group has no committed offset for starts at offset 0, not where
    ListOffsets(EARLIEST) says: Tansu answers it with the batch whose write finished first,
    a later one when a partition's first writes raced, and the events before it would never
    be read (on Kafka, an offset 0 the log no longer holds resets to its start as before)."""

    async def seek_to_committed(self):
        committed = await super().seek_to_committed()
        behaviors = self.app.hytrec_config.topics.behaviors
        for tp, offset in committed.items():
            start = offset if offset is not None and offset > 0 else 0
            if start == 0:
                await self.seek(tp, 0)
            if tp.topic == behaviors:
                self.app.hytrec_worker.stats.accounting.reading_from(tp.partition, start)
        return committed

    def _new_consumer_thread(self):
        if self.app.hytrec_config.embedded_broker:
            return _LowLatencyConsumerThread(self, loop=self.loop, beacon=self.beacon)
        return super()._new_consumer_thread()

    async def _commit(self, offsets):
        if not await self.app.hytrec_worker.logs.may_commit():
            return False  # Faust keeps them acknowledged and tries again later
        return await super()._commit(offsets)

    def forget_acks(self, tp) -> None:
        """Drop what Faust holds to commit for a partition whose log was replaced, as Faust
        itself does for a revoked partition (`Consumer.on_partitions_revoked`)."""
        for held in (self._gap, self._acked, self._acked_index, self._committed_offset):
            held.pop(tp, None)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class StreamApp(faust.App):
    """A Faust app with the consumer above (see `_Consumer`)."""

    hytrec_config: WorkerConfig
    hytrec_worker: BatchingWorker

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)


def create_app(
    config: WorkerConfig,
    engine_factory: Callable[[], Engine] | None,
    engine_loader: Callable[[Path], Engine] | None = None,
) -> StreamApp:
    """The Faust app with the batching agent; the engine is built when the worker starts
    (see `BatchingWorker` for the two ways)."""
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)  # Faust makes only the last part
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
        worker.checkpoints.on_assigned(assigned)

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender, **kwargs):
        await worker.checkpoints.wait_all_restored()

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
    """Run a Faust worker until it is stopped; its exit status. The engine is built first,
    so that a checkpoint that does not load is reported (exit status 2) before the worker
    joins the group or connects at all."""
    app = create_app(config, engine_factory, engine_loader)
    worker = app.hytrec_worker
    try:
        worker.engine = worker.first_engine()
        check_time_rules(config, worker.engine)
    except Exception as exc:  # noqa: BLE001 - any reason: said plainly, no traceback
        print(
            f"hytrec worker: cannot start the engine: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 2
    try:
        faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        worker.log_stop()
    return 0


def check_time_rules(config: WorkerConfig, engine: Engine) -> None:
    """The engine's out-of-order tolerance must cover the parser's future allowance: an
    event accepted from up to that far ahead must not make the user's real-time events
    late (they would be dead-lettered until the clock caught up)."""
    tolerance = getattr(getattr(engine, "config", None), "out_of_order_tolerance_s", None)
    if tolerance is not None and tolerance < config.parse.max_future_s:
        raise ValueError(
            f"out-of-order tolerance {tolerance:g} s is below the future allowance "
            f"{config.parse.max_future_s:g} s: one event from a clock running ahead would "
            "block its user's later events; raise the tolerance or lower the allowance"
        )


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
    """HYTREC_DEVICE, HYTREC_TOP_K, HYTREC_STATE_BUDGET_MIB, HYTREC_OUT_OF_ORDER_TOLERANCE_S,
    the disk tier's HYTREC_HOST_BUDGET_MIB and HYTREC_STATE_DIR, and the shop rules
    HYTREC_EXCLUDE_PAID_HOURS, HYTREC_EXPLORE_ONLY (1/0),
    HYTREC_MIN_EXPLORE_SHARE, and HYTREC_COMPILE_STEP (1/0); unset ones keep their
    defaults."""
    from hytrec.stream.engine import EngineConfig

    d = EngineConfig()
    return EngineConfig(
        top_k=int(env.get("HYTREC_TOP_K", d.top_k)),
        state_budget_bytes=int(float(env.get("HYTREC_STATE_BUDGET_MIB", 0)) * 2**20)
        or d.state_budget_bytes,
        device=env.get("HYTREC_DEVICE", d.device),
        out_of_order_tolerance_s=float(
            env.get("HYTREC_OUT_OF_ORDER_TOLERANCE_S", d.out_of_order_tolerance_s)
        ),
        exclude_paid_hours=float(env.get("HYTREC_EXCLUDE_PAID_HOURS", d.exclude_paid_hours)),
        explore_only=env.get("HYTREC_EXPLORE_ONLY", "0") not in ("", "0", "false"),
        min_explore_share=float(env.get("HYTREC_MIN_EXPLORE_SHARE", d.min_explore_share)),
        host_budget_bytes=int(float(env["HYTREC_HOST_BUDGET_MIB"]) * 2**20)
        if env.get("HYTREC_HOST_BUDGET_MIB")
        else None,
        state_dir=env.get("HYTREC_STATE_DIR") or None,
        compile_step=env.get("HYTREC_COMPILE_STEP", "0") not in ("", "0", "false"),
    )
