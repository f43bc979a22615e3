"""Replay a logged event file into `behaviors`: keyed by user id, in global time order.

Works against any Kafka bootstrap servers. Per-user order is what the model needs: one
producer, key = user id (so one partition per user), one request in flight per connection
(so a retried batch cannot overtake the next one). Idempotent producing would allow more in
flight but the embedded broker does not support it, so it is off.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.producer.future import RecordMetadata
from tqdm import tqdm

from hytrec.model.data import ColumnMap
from hytrec.model.events import Behavior, EventLog
from hytrec.model.synthetic import SyntheticConfig
from hytrec.stream.schemas import encode_behavior

log = logging.getLogger(__name__)

# the synthetic events of `hytrec replay synthetic` and the demo without the shared data
SYNTHETIC = SyntheticConfig(users=200, min_events=100, max_events=300)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    topic: str = "behaviors"
    speed: float | None = None  # None: as fast as possible; X: X times real (event) time
    limit: int | None = None  # publish at most this many events
    linger_ms: int = 5  # let the producer fill batches
    batch_bytes: int = 512 * 1024
    progress: bool = True  # a tqdm bar on stderr


@dataclass(frozen=True, slots=True)
class ReplayReport:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def log_events(events: EventLog) -> Iterator[dict[str, Any]]:
    """The log's events as message payloads, in global time order; ties keep the log's
    order, which is per-user time order, so every user's sequence stays in order."""
    order = np.argsort(events.ts, kind="stable")
    users = ["", *events.users.raw_ids()]
    items = ["", *events.items.raw_ids()]
    categories = ["", *events.categories.raw_ids()]  # index 0: unknown category -> ""
    behaviors = {int(b): b.name.lower() for b in Behavior}
    for i in order:
        yield {
            "user_id": users[events.user[i]],
            "item_id": items[events.item[i]],
            "category_id": categories[events.category[i]],
            "behavior": behaviors[int(events.behavior[i])],
            "ts": int(events.ts[i]),
        }


def publish_events(
    events: Iterable[Mapping[str, Any]],
    bootstrap: str,
    config: ReplayConfig = ReplayConfig(),
    total: int | None = None,
    on_delivery: Callable[[int, RecordMetadata], None] | None = None,
) -> ReplayReport:
    """Publish event payloads (dicts with at least user_id and ts) in the given order, keyed
    by user id; block until the broker confirmed all of them. `on_delivery(i, metadata)`
    learns where the i-th event landed (partition, offset, producer timestamp in ms)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="hytrec-replay",
        acks="all",
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        linger_ms=config.linger_ms,
        batch_size=config.batch_bytes,
    )
    if config.limit is not None:
        total = config.limit if total is None else min(total, config.limit)
    bar = tqdm(total=total, unit="ev", desc="replay", disable=not config.progress, smoothing=0.1)
    sent = 0
    errors: list[Exception] = []
    started = time.perf_counter()
    first_ts: int | None = None
    try:
        for event in events:
            if config.limit is not None and sent >= config.limit:
                break
            if config.speed:
                first_ts = event["ts"] if first_ts is None else first_ts
                ahead = (event["ts"] - first_ts) / config.speed - (time.perf_counter() - started)
                if ahead > 0:
                    producer.flush()  # what is due now should not wait in the buffer
                    time.sleep(ahead)
            future = producer.send(
                config.topic, key=str(event["user_id"]).encode(), value=encode_behavior(event)
            ).add_errback(errors.append)
            if on_delivery is not None:
                future.add_callback(functools.partial(on_delivery, sent))
            sent += 1
            if sent % 1024 == 0:
                bar.update(1024)
        producer.flush()
        bar.update(sent - bar.n)
        if errors:
            raise RuntimeError(
                f"{len(errors)} of {sent} events were not published; first: {errors[0]!r}"
            )
    finally:
        bar.close()
        producer.close()
    report = ReplayReport(events=sent, seconds=time.perf_counter() - started)
    log.info(
        "replayed %d events in %.2f s (%.0f events/s)", report.events, report.seconds, report.rate
    )
    return report


def replay(
    source: str | Path,
    bootstrap: str,
    config: ReplayConfig = ReplayConfig(),
    columns: ColumnMap | None = None,
) -> ReplayReport:
    """Load a dataset name, a saved EventLog or a file (a table through `columns`) with
    `load_named` (bad rows skipped and logged: the Taobao head file ends with a truncated
    row), or generate "synthetic" events (the demo's, so a machine without the shared data
    has something to replay), and publish them in time order."""
    from hytrec.model.data import load_named

    if str(source) == "synthetic":
        from hytrec.model.synthetic import generate

        events = generate(SYNTHETIC)
    else:
        events = load_named(source, columns=columns, progress=config.progress)
    return publish_events(log_events(events), bootstrap, config, total=len(events))
