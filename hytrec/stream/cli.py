"""`hytrec` subcommands of the stream package: broker, worker, publish-model, replay,
backfill, tail, status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from hytrec.model.cli import DATASET_HELP, column_map, data_file_arguments

DEFAULT_PORT = 9092  # Kafka's: the broker listens there and every client looks there
DEFAULT_BOOTSTRAP = os.environ.get("HYTREC_BOOTSTRAP", f"127.0.0.1:{DEFAULT_PORT}")


def _add_topic_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--behaviors-partitions", type=int, default=4)
    parser.add_argument("--recommendations-partitions", type=int, default=4)
    parser.add_argument("--dlq-partitions", type=int, default=1)


def _add_admission_args(parser: argparse.ArgumentParser) -> None:
    """What decides whether an event is applied: the worker and the backfill must agree."""
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024,
        help="larger behaviour messages go to the DLQ (oversized)",
    )
    parser.add_argument(
        "--max-future-s",
        type=float,
        default=float(os.environ.get("HYTREC_MAX_FUTURE_S", 300.0)),
        help="how far ahead of the record's time an event's ts may be (default 300 s)",
    )
    parser.add_argument(
        "--future-policy",
        choices=("dead_letter", "clamp"),
        default=os.environ.get("HYTREC_FUTURE_POLICY", "dead_letter"),
        help="an event further ahead: to the DLQ (future_ts), or applied at the latest time "
        "allowed",
    )
    parser.add_argument(
        "--out-of-order-tolerance-s",
        type=float,
        default=float(os.environ.get("HYTREC_OUT_OF_ORDER_TOLERANCE_S", 300.0)),
        help="events up to this much older than the user's newest are applied at the newest "
        "time; older ones go to the DLQ (out_of_order); at least --max-future-s",
    )
    parser.add_argument(
        "--dlq-max-payload-bytes",
        type=int,
        default=16 * 1024,
        help="a dead letter keeps this much of the message (with its length and SHA-256)",
    )


def _parse_limits(args):
    from hytrec.stream.schemas import ParseLimits

    return ParseLimits(
        max_bytes=args.max_message_bytes,
        max_future_s=args.max_future_s,
        future_policy=args.future_policy,
    )


def _topics(args):
    from hytrec.stream.broker import TopicConfig

    return TopicConfig(
        behaviors_partitions=args.behaviors_partitions,
        recommendations_partitions=args.recommendations_partitions,
        dlq_partitions=args.dlq_partitions,
    )


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec` and `hytrec benchmark`."""
    broker = commands.add_parser(
        "broker",
        help="run the embedded Kafka-protocol broker (Tansu) with the topics",
        description="Start Tansu on loopback (in-memory storage: a restart loses every "
        "topic), create the topics, print the bootstrap address and run until interrupted.",
    )
    broker.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"default {DEFAULT_PORT}, where the other commands look; 0: a free port",
    )
    broker.add_argument("--host", default="127.0.0.1")
    _add_topic_args(broker)
    broker.set_defaults(func=_broker)

    worker = commands.add_parser(
        "worker",
        help="run the Faust worker: behaviors in, recommendations out",
        description="Consume `behaviors`, micro-batch, apply to user state, publish "
        "`recommendations`; bad input goes to `behaviors-dlq`.",
    )
    source = worker.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a checkpoint directory (any registered model)")
    source.add_argument(
        "--engine",
        help="an engine factory MODULE:CALLABLE instead, called with no arguments (--top-k, "
        "--device and --index apply to checkpoints only)",
    )
    worker.add_argument(
        "--models-dir",
        default=os.environ.get("HYTREC_MODELS_DIR"),
        help="hot swap: serve the newest checkpoint published here (`hytrec publish-model`) "
        "and swap in newer ones as they appear; --checkpoint serves only while it holds none "
        "(default $HYTREC_MODELS_DIR)",
    )
    worker.add_argument(
        "--models-poll",
        type=float,
        default=float(os.environ.get("HYTREC_MODELS_POLL_S", 10.0)),
        help="seconds between looks at --models-dir (default $HYTREC_MODELS_POLL_S or 10)",
    )
    worker.add_argument("--index", help="saved item index directory (default: built exact)")
    worker.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    worker.add_argument("--top-k", type=int, default=20, help="items per recommendation")
    worker.add_argument(
        "--state-budget-mib",
        type=float,
        default=256.0,
        help="device memory for user states; colder users move to host memory",
    )
    worker.add_argument(
        "--host-budget-mib",
        type=float,
        default=float(os.environ.get("HYTREC_HOST_BUDGET_MIB", 0)) or None,
        help="host memory for the states the device slots do not hold; beyond it, the "
        "coldest users go to disk in --state-dir (default $HYTREC_HOST_BUDGET_MIB; unset: "
        "host memory holds them all)",
    )
    worker.add_argument(
        "--state-dir",
        default=os.environ.get("HYTREC_STATE_DIR") or None,
        help="this worker's own directory for the disk tier (LMDB; emptied at start: the "
        "user-state topic is the durable copy); needs --host-budget-mib",
    )
    worker.add_argument(
        "--exclude-recent", type=int, default=0, help="leave out the user's last N items"
    )
    # shop rules: they read the repeat head's recent-items buffer (a model with the head)
    worker.add_argument(
        "--exclude-paid-hours",
        type=float,
        default=float(os.environ.get("HYTREC_EXCLUDE_PAID_HOURS", 0.0)),
        help="leave out items the user paid for within H hours before its newest event "
        "(default $HYTREC_EXCLUDE_PAID_HOURS or 0: off)",
    )
    worker.add_argument(
        "--explore-only",
        action="store_true",
        default=os.environ.get("HYTREC_EXPLORE_ONLY", "0") not in ("", "0", "false"),
        help="recommend only items new to the user (default $HYTREC_EXPLORE_ONLY=1: on)",
    )
    worker.add_argument(
        "--compile-step",
        action="store_true",
        default=os.environ.get("HYTREC_COMPILE_STEP", "0") not in ("", "0", "false"),
        help="one-event-per-user steps through torch.compile: about 3x cheaper per call on "
        "a CPU, after about a minute of compiling at start-up; falls back to the eager step, "
        "with a warning, where compiling fails (default $HYTREC_COMPILE_STEP=1: on)",
    )
    worker.add_argument(
        "--min-explore-share",
        type=float,
        default=float(os.environ.get("HYTREC_MIN_EXPLORE_SHARE", 0.0)),
        help="at least this share of each recommendation from the explore side (new items) "
        "(default $HYTREC_MIN_EXPLORE_SHARE or 0)",
    )
    worker.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    worker.add_argument("--group", default="hytrec-worker", help="consumer group / app id")
    worker.add_argument("--batch-size", type=int, default=512, help="B: events per batch")
    worker.add_argument(
        "--batch-wait-ms", type=float, default=50.0, help="W: longest wait for a batch to fill"
    )
    _add_admission_args(worker)
    worker.add_argument(
        "--embedded-broker",
        action="store_true",
        default=os.environ.get("HYTREC_EMBEDDED_BROKER", "0") == "1",
        help="short fetch wait and session timeout for the embedded broker (never on real Kafka)",
    )
    worker.add_argument("--web-port", type=int, help="Faust web server port (default: off)")
    worker.add_argument("--data-dir", default=".cache/hytrec/faust")
    worker.add_argument("--log-every", type=int, default=100, help="log a line per N batches")
    worker.add_argument(
        "--snapshot-interval",
        type=float,
        default=float(os.environ.get("HYTREC_SNAPSHOT_INTERVAL_S", 2.0)),
        help="seconds between checkpoints of changed user states to `user-state` (0: each "
        "batch; default $HYTREC_SNAPSHOT_INTERVAL_S or 2)",
    )
    worker.add_argument("--loglevel", default="info")
    _add_topic_args(worker)
    worker.set_defaults(func=_worker, parser=worker)

    publish = commands.add_parser(
        "publish-model",
        help="publish a checkpoint into a worker's models directory (atomically)",
        description="Check that the checkpoint loads, copy it into DIR under a hidden name, "
        "then rename it to NAME in one step, so a watching worker never sees half of it. "
        "The newest checkpoint is the one whose name sorts last.",
    )
    publish.add_argument("checkpoint", help="a checkpoint directory (as a model's save writes)")
    publish.add_argument("--models-dir", required=True, help="the workers' --models-dir")
    publish.add_argument(
        "--name", help="subdirectory name (default: UTC time and model version, sorts last)"
    )
    states = publish.add_mutually_exclusive_group()
    states.add_argument(
        "--backfill",
        dest="states",
        action="store_const",
        const="backfill",
        default="backfill",
        help="(default) the workers rebuild every user's state under the new model from the "
        "behaviors log while the old one serves, then swap: no user starts from nothing",
    )
    states.add_argument(
        "--reset-states",
        dest="states",
        action="store_const",
        const="reset",
        help="the workers swap at once and reset every user's state",
    )
    publish.set_defaults(func=_publish_model)

    replay = commands.add_parser(
        "replay",
        help="publish a logged event file to `behaviors` in time order",
        description="Keyed by user id, in global time order, as fast as possible or at "
        "--speed times real time.",
    )
    replay.add_argument("source", help=DATASET_HELP + ", or 'synthetic'")
    data_file_arguments(replay)
    replay.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    replay.add_argument("--topic", default="behaviors")
    replay.add_argument("--speed", type=float, help="X times real time (default: max speed)")
    replay.add_argument("--limit", type=int, help="publish at most N events")
    replay.add_argument("--no-progress", action="store_true")
    replay.set_defaults(func=_replay)

    backfill = commands.add_parser(
        "backfill",
        help="build every user's state from the behaviors log in long runs; a worker of "
        "the group restores them instead of replaying",
        description="Read `behaviors` from the beginning (up to its end as it stands), "
        "build each user's state with the model's chunked form, and write the states as "
        "snapshots into the group's user-state topic, tagged with the model version and the "
        "offsets they cover. Records the worker would refuse go to the DLQ. Resumable: users "
        "whose snapshot already covers their events are left alone.",
    )
    backfill.add_argument("--checkpoint", required=True, help="the model the group serves")
    backfill.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    backfill.add_argument(
        "--group", default="hytrec-worker", help="the consumer group of the workers"
    )
    backfill.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    backfill.add_argument("--users-per-step", type=int, default=512)
    backfill.add_argument(
        "--max-run", type=int, default=1024, help="events of one user per model step"
    )
    backfill.add_argument(
        "--tokens-per-step", type=int, default=32_768, help="users x longest run per step"
    )
    backfill.add_argument(
        "--timeout", type=float, default=120.0, help="seconds for the broker to answer"
    )
    backfill.add_argument(
        "--from-file",
        metavar="DATASET",
        help="the history before the behaviors topic instead of the topic: "
        + DATASET_HELP
        + "; each user's state is written without offsets, and a worker applies the topic "
        "on top",
    )
    data_file_arguments(backfill)
    backfill.add_argument("--no-progress", action="store_true")
    _add_admission_args(backfill)
    _add_topic_args(backfill)
    backfill.set_defaults(func=_backfill)

    tail = commands.add_parser("tail", help="print recommendations as they arrive")
    tail.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    tail.add_argument("--topic", default="recommendations")
    tail.add_argument("--json", action="store_true", help="JSON lines instead of text")
    tail.add_argument("--max", type=int, help="stop after N messages")
    tail.add_argument(
        "--timeout", type=float, default=30.0, help="stop after S seconds without a message"
    )
    tail.add_argument(
        "--latest", action="store_true", help="only new messages (default: from the beginning)"
    )
    tail.set_defaults(func=_tail)

    status = commands.add_parser(
        "status",
        help="a running worker's metrics, readably (from its /metrics)",
        description="Scrape a worker's Prometheus /metrics (served with `hytrec worker "
        "--web-port PORT`) and print events in, rates, recommendations out, dead letters by "
        "reason, latency percentiles, state slots and consumer lag.",
    )
    status.add_argument(
        "--url", default="http://127.0.0.1:6066/metrics", help="the worker's /metrics URL"
    )
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between two scrapes for rates (0: one scrape, no rates)",
    )
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.set_defaults(func=_status)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _broker(args) -> int:
    from hytrec.stream.broker import EmbeddedBroker

    configure_logging()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(port=args.port, host=args.host, topics=_topics(args))
    try:
        broker.start()
    except (RuntimeError, TimeoutError) as exc:
        print(
            f"hytrec broker: {exc} (another broker there? then use it, or pass --port 0 for "
            "a free port and give its address to the other commands with --bootstrap)",
            file=sys.stderr,
        )
        return 1
    with broker:
        print(
            f"broker ready at {broker.bootstrap} (pid {broker.pid}); topics "
            f"{broker.topics.partitions()}",
            flush=True,
        )
        print(
            f"  hytrec worker --bootstrap {broker.bootstrap} --embedded-broker --checkpoint DIR",
            flush=True,
        )
        while not stop.wait(1.0):
            if broker.process.poll() is not None:
                print(f"broker exited with {broker.process.returncode}", file=sys.stderr)
                return 1
    return 0


def _worker(args) -> int:
    from hytrec.stream.app import WorkerConfig, engine_sources, run_worker
    from hytrec.stream.batcher import BatchConfig
    from hytrec.stream.engine import EngineConfig

    config = WorkerConfig(
        bootstrap=args.bootstrap,
        app_id=args.group,
        topics=_topics(args),
        batch=BatchConfig(max_items=args.batch_size, max_wait_ms=args.batch_wait_ms),
        parse=_parse_limits(args),
        dlq_max_payload_bytes=args.dlq_max_payload_bytes,
        embedded_broker=args.embedded_broker,
        log_every_batches=args.log_every,
        web_port=args.web_port,
        data_dir=args.data_dir,
        snapshot_interval_s=args.snapshot_interval,
        models_dir=args.models_dir or None,
        models_poll_s=args.models_poll,
    )
    try:
        engine_config = EngineConfig(
            top_k=args.top_k,
            state_budget_bytes=int(args.state_budget_mib * 2**20),
            host_budget_bytes=int(args.host_budget_mib * 2**20) if args.host_budget_mib else None,
            state_dir=args.state_dir,
            exclude_recent=args.exclude_recent,
            device=args.device,
            out_of_order_tolerance_s=args.out_of_order_tolerance_s,
            exclude_paid_hours=args.exclude_paid_hours,
            explore_only=args.explore_only,
            min_explore_share=args.min_explore_share,
            compile_step=args.compile_step,
        )
    except ValueError as exc:  # a shop rule's value out of range, said plainly
        args.parser.error(str(exc))
    if not (args.checkpoint or args.engine or args.models_dir):
        args.parser.error("give --checkpoint, --engine or --models-dir")
    if args.engine and args.models_dir:
        args.parser.error("--models-dir serves model checkpoints: it does not take --engine")
    factory, loader = engine_sources(
        args.checkpoint, args.index, args.engine, engine_config, config.models_dir
    )
    return run_worker(config, factory, loglevel=args.loglevel, engine_loader=loader)


def _publish_model(args) -> int:
    from hytrec.stream.hotswap import publish_model

    try:
        path = publish_model(args.checkpoint, args.models_dir, args.name, args.states)
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
        print(f"not published: {exc}", file=sys.stderr)
        return 1
    print(path, flush=True)
    return 0


def _no_broker(bootstrap: str, command: str) -> bool:
    """Say so and return True when no broker answers at `bootstrap` (instead of a client
    waiting for it and ending in a traceback)."""
    from hytrec.stream.broker import reachable

    if reachable(bootstrap):
        return False
    print(
        f"hytrec {command}: no Kafka broker answers at {bootstrap} (start one with "
        "`hytrec broker`, or give its address with --bootstrap)",
        file=sys.stderr,
    )
    return True


def _replay(args) -> int:
    from hytrec.stream.replay import ReplayConfig, replay

    if _no_broker(args.bootstrap, "replay"):
        return 1
    configure_logging()
    report = replay(
        args.source,
        args.bootstrap,
        ReplayConfig(
            topic=args.topic, speed=args.speed, limit=args.limit, progress=not args.no_progress
        ),
        columns=column_map(args),
    )
    print(
        json.dumps(
            {
                "events": report.events,
                "seconds": round(report.seconds, 3),
                "events_per_s": round(report.rate, 1),
            }
        )
    )
    return 0


def _backfill(args) -> int:
    from dataclasses import asdict

    from hytrec.stream.backfill import BackfillConfig, backfill, backfill_file
    from hytrec.stream.engine import EngineConfig, build_engine

    if _no_broker(args.bootstrap, "backfill"):
        return 1
    configure_logging()
    config = BackfillConfig(
        group=args.group,
        topics=_topics(args),
        parse=_parse_limits(args),
        dlq_max_payload_bytes=args.dlq_max_payload_bytes,
        users_per_step=args.users_per_step,
        max_run=args.max_run,
        tokens_per_step=args.tokens_per_step,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )
    engine_config = EngineConfig(
        device=args.device, out_of_order_tolerance_s=args.out_of_order_tolerance_s
    )
    engine = build_engine(args.checkpoint, config=engine_config)
    if args.from_file:
        from hytrec.model.data import DataError, load_named

        try:
            events = load_named(args.from_file, columns=column_map(args), progress=config.progress)
        except (DataError, FileNotFoundError) as exc:
            print(f"hytrec backfill: {exc}", file=sys.stderr)
            return 2
        report = backfill_file(engine, args.bootstrap, events, config, source=args.from_file)
    else:
        report = backfill(engine, args.bootstrap, config)
    print(json.dumps({**asdict(report), "events_per_s": round(report.events_per_s, 1)}))
    return 0


def _status(args) -> int:
    from urllib.error import URLError

    from hytrec.stream.metrics import status

    try:
        print(status(args.url, interval_s=args.interval, as_json=args.json), flush=True)
    except (URLError, OSError) as exc:
        print(f"cannot read {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _tail(args) -> int:
    from hytrec.stream.schemas import Recommendation
    from hytrec.stream.tail import describe, read_topic

    if _no_broker(args.bootstrap, "tail"):
        return 1
    records = read_topic(
        args.bootstrap,
        args.topic,
        from_beginning=not args.latest,
        max_messages=args.max,
        idle_timeout_s=args.timeout,
    )
    try:
        for record in records:
            if args.topic != "recommendations":  # e.g. the DLQ: print as it is
                print(record.value.decode(errors="replace"), flush=True)
            elif args.json:
                print(Recommendation.from_json(record.value).to_json().decode(), flush=True)
            else:
                print(describe(Recommendation.from_json(record.value)), flush=True)
    except KeyboardInterrupt:
        pass
    return 0
