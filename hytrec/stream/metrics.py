"""Prometheus metrics of the stream worker, and the reader behind `hytrec status`.

`StreamMetrics` owns a `CollectorRegistry` of its own (never the process-global one, so
several workers or tests in one process do not collide). Two kinds of series:

* histograms, fed once per flushed batch by `observe_batch` (the worker calls it right
  after its own counters, `BatchingWorker._count`);
* counters and gauges read at scrape time from the live objects: the worker's
  `WorkerStats`, the engine's `stats` and `store` when it has them (the model engine does,
  test engines may not) and the Faust consumer's offsets. Nothing is counted twice.

Series (all prefixed `hytrec_`):

| name | type | what |
|---|---|---|
| `events_in_total` | counter | behaviour messages consumed (events/s: `rate()` of it) |
| `events_applied_total` | counter | events applied to user states |
| `partition_events_total{partition,outcome}` | counter | outcome: `consumed`, `applied`, ... |
| `partition_events_in_flight{partition}` | gauge | consumed, not yet settled (in a batch) |
| `recommendations_out_total` | counter | recommendations published |
| `publish_failures_total`, `dlq_...` | counter | records refused for good (logged) |
| `batches_total` | counter | micro-batches flushed |
| `dlq_messages_total{reason}` | counter | dead letters by reason code (all, 0 included) |
| `duplicates_skipped_total` | counter | replayed events the engine skipped |
| `batch_size` | histogram | messages per flushed batch (valid and invalid) |
| `engine_step_seconds` | histogram | model step time per batch (engine's `step_seconds`) |
| `index_search_seconds` | histogram | index search time per batch (`search_seconds`) |
| `batch_engine_seconds` | histogram | the worker's wall time for `engine.process` per batch |
| `batch_publish_seconds` | histogram | publishing a batch until the broker confirmed it |
| `event_to_recommendation_seconds` | histogram | per recommendation, see below |
| `state_slots_used` / `state_slots_capacity` | gauge | user slots on the device |
| `state_users_offloaded` | gauge | users whose state waits in host memory |
| `state_evictions_total` | counter | slot evictions to host memory so far |
| `state_users_on_disk`, `state_disk_bytes` | gauge | the disk tier (`--state-dir`) |
| `state_disk_writes_total`, `..._reads_total` | counter | states moved to disk / read back |
| `consumer_lag{topic,partition}` | gauge | high watermark minus committed offset |
| `model_info{model_version}` | gauge | 1, labelled with the serving model version |
| `model_swaps_total` | counter | hot swaps of model and index (`--models-dir`) |
| `users_rebuilt_total` | counter | user states a swap rebuilt from the log (`--backfill`) |
| `users_rebuilt_partial_total` | counter | of those, from a partial history (retention) |
| `checkpoints_total` | counter | checkpoints: snapshots confirmed, then events acknowledged |
| `snapshots_written_total` / `snapshot_bytes_total` | counter | user-state snapshots written |
| `checkpoint_seconds_total` | counter | time spent in checkpoints |
| `users_restored_total` | counter | users restored from `user-state` on an assignment |
| `log_resets_total` | counter | behaviour partitions found to be a new log (broker lost its data) |
| `checkpoints_failed_total` | counter | checkpoints the broker refused, redone by the next |
| `snapshots_other_log_total` / `snapshots_corrupt_total` | counter | snapshots skipped on restore |

`partition_events_total` counts per `behaviors` partition where every consumed message
went: `consumed`, `applied`, `dead_lettered`, `replays_skipped` and `unaccounted`; with
`partition_events_in_flight`, consumed = applied + dead_lettered + replays_skipped + in
flight, and unaccounted stays 0 (`accounting.py`).

`event_to_recommendation_seconds` runs from the Recommendation's `received_at` (the worker
read the event) to its `produced_at` (the engine built the answer): batching wait plus engine
time; neither the producer's nor the broker's time (Kafka record timestamps are not used).

Consumer lag is approximate on the embedded broker: Tansu misreports a partition's end
offset (the base offset of its last record batch + 1 when that batch holds several records,
see docs/ARCHITECTURE.md), so lag there can read low, even 0 while records wait. On Apache Kafka
it is exact up to the consumer's last fetch.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from hytrec.stream.schemas import REASONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class StreamMetrics:
    """The worker's metrics. `source` is the worker (duck-typed): `.stats` (a `WorkerStats`),
    `.engine` (may be None, may lack `stats`/`store`) and `.app.consumer` (optional)."""

    def __init__(self, source: Any = None, registry: CollectorRegistry | None = None):
        self.source = source
        self.registry = registry if registry is not None else CollectorRegistry()
        h = {"registry": self.registry, "namespace": "hytrec"}
        self.batch_size = Histogram(
            "batch_size", "Messages per flushed micro-batch", buckets=BATCH_SIZE_BUCKETS, **h
        )
        self.engine_step = Histogram(
            "engine_step_seconds", "Model step time per batch", buckets=SECONDS_BUCKETS, **h
        )
        self.index_search = Histogram(
            "index_search_seconds", "Index search time per batch", buckets=SECONDS_BUCKETS, **h
        )
        self.batch_engine = Histogram(
            "batch_engine_seconds",
            "Worker wall time of engine.process per batch",
            buckets=SECONDS_BUCKETS,
            **h,
        )
        self.batch_publish = Histogram(
            "batch_publish_seconds",
            "Publishing a batch's records until the broker confirmed them",
            buckets=SECONDS_BUCKETS,
            **h,
        )
        self.latency = Histogram(
            "event_to_recommendation_seconds",
            "Per recommendation: received_at (worker read the event) to produced_at",
            buckets=SECONDS_BUCKETS,
            **h,
        )
        # the engine's cumulative (step, search) last seen, and that engine (a hot swap
        # brings a new one, whose figures start at zero)
        self._engine_seconds = (0.0, 0.0)
        self._engine_seen: Any = None
        self.registry.register(_LiveCollector(self))

    # ------------------------------------------------------------------ feeding

    def observe_batch(
        self,
        result: Any,
        batch_size: int | None = None,
        engine_s: float | None = None,
        publish_s: float | None = None,
        engine: Any = None,
    ) -> None:
        """One flushed batch: its `EngineResult`, message count and timings. The engine's
        step and search seconds are read as the change of its cumulative `stats`."""
        if batch_size is not None:
            self.batch_size.observe(batch_size)
        if engine_s is not None:
            self.batch_engine.observe(engine_s)
        if publish_s is not None:
            self.batch_publish.observe(publish_s)
        for rec in result.recommendations:
            self.latency.observe(max(0.0, rec.produced_at - rec.received_at))
        engine = engine if engine is not None else getattr(self.source, "engine", None)
        stats = getattr(engine, "stats", None)
        if stats is not None and hasattr(stats, "step_seconds"):
            now = (float(stats.step_seconds), float(getattr(stats, "search_seconds", 0.0)))
            before = self._engine_seconds if engine is self._engine_seen else (0.0, 0.0)
            self._engine_seen = engine
            if result.recommendations:  # the engine stepped and searched in this batch
                self.engine_step.observe(max(0.0, now[0] - before[0]))
                self.index_search.observe(max(0.0, now[1] - before[1]))
            self._engine_seconds = now

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class _LiveCollector:
    """Counters and gauges read from the worker, engine and consumer at scrape time."""

    def __init__(self, metrics: StreamMetrics):
        self.metrics = metrics

    def collect(self) -> Iterable:
        source = self.metrics.source
        stats = getattr(source, "stats", None)
        yield from _worker_families(stats)
        engine = getattr(source, "engine", None)
        yield from _engine_families(engine)
        yield _lag_family(getattr(source, "app", None))

    def describe(self) -> Iterable:
        return []  # no collision checks for these dynamic series


def _counter(name: str, doc: str, value: float | None) -> CounterMetricFamily:
    return CounterMetricFamily(f"hytrec_{name}", doc, value=value or 0)


# WorkerStats fields of the effectively-once machinery (issue 5), each a counter of that name
_DELIVERY_COUNTERS = (
    ("checkpoints", "Checkpoints: snapshots confirmed, then events acknowledged"),
    ("snapshots_written", "User-state snapshots written"),
    ("snapshot_bytes", "Bytes of user-state snapshots written"),
    ("checkpoint_seconds", "Time spent in checkpoints"),
    ("users_restored", "Users restored from snapshots on assignment"),
    ("log_resets", "Behaviour partitions found to be a new log"),
    ("checkpoints_failed", "Checkpoints the broker refused, redone by the next one"),
    ("snapshots_other_log", "Snapshots skipped on restore: offsets of a replaced log"),
    ("snapshots_corrupt", "User-state records that were not valid snapshots"),
    ("events_replayed_for_corrupt", "Events read back for users with a corrupt snapshot"),
    ("publish_failures", "Recommendations the broker refused for good"),
    ("dlq_publish_failures", "Dead letters the broker refused for good (logged)"),
    ("users_rebuilt", "User states rebuilt from the behaviors log by model swaps"),
    ("users_rebuilt_partial", "Of those, users the log no longer held whole (retention)"),
    ("events_not_held", "Events of a partition no longer assigned, left to its new owner"),
)
_OUTCOMES = (
    "consumed",
    "applied",
    "dead_lettered",
    "replays_skipped",
    "unaccounted",
    "never_delivered",  # offsets the consumer jumped over: not an outcome, an alarm
)


def _worker_families(stats: Any) -> Iterable:
    yield _counter("events_in", "Behaviour messages consumed", getattr(stats, "events_in", 0))
    yield _counter(
        "events_applied", "Events applied to user states", getattr(stats, "events_applied", 0)
    )
    accounting = getattr(stats, "accounting", None)
    outcomes = CounterMetricFamily(
        "hytrec_partition_events",
        "Consumed behaviour messages per partition by outcome (accounting.py)",
        labels=["partition", "outcome"],
    )
    in_flight = GaugeMetricFamily(
        "hytrec_partition_events_in_flight",
        "Consumed, not yet applied, dead-lettered or skipped",
        labels=["partition"],
    )
    for partition, account in sorted(getattr(accounting, "partitions", {}).items()):
        for outcome in _OUTCOMES:
            outcomes.add_metric([str(partition), outcome], getattr(account, outcome))
        in_flight.add_metric([str(partition)], account.in_flight)
    yield outcomes
    yield in_flight
    yield _counter(
        "recommendations_out",
        "Recommendations published",
        getattr(stats, "recommendations_out", 0),
    )
    yield _counter("batches", "Micro-batches flushed", getattr(stats, "batches", 0))
    yield _counter(
        "duplicates_skipped",
        "Replayed events the engine skipped",
        getattr(stats, "skipped_duplicates", 0),
    )
    yield _counter("model_swaps", "Hot swaps of model and index", getattr(stats, "model_swaps", 0))
    for name, doc in _DELIVERY_COUNTERS:
        yield _counter(name, doc, getattr(stats, name, 0))
    dlq = CounterMetricFamily(
        "hytrec_dlq_messages", "Dead letters published by reason code", labels=["reason"]
    )
    rejected = dict(getattr(stats, "rejected", {}) or {})
    for reason in sorted(set(REASONS) | set(rejected)):  # every reason, so a dashboard sees 0
        dlq.add_metric([str(reason)], rejected.get(reason, 0))
    yield dlq


def _engine_families(engine: Any) -> Iterable:
    version = getattr(engine, "model_version", None)
    info = GaugeMetricFamily(
        "hytrec_model_info", "The engine's model version", labels=["model_version"]
    )
    if version is not None:
        info.add_metric([str(version)], 1)
    yield info
    store = getattr(engine, "store", None)
    if store is None:
        return
    try:
        used = len(store.slot_of)
        capacity = int(store.num_slots)
        offloaded = len(getattr(store, "evicted", ()))
        evictions = int(getattr(store, "evictions", 0))
    except (AttributeError, TypeError):
        return
    yield GaugeMetricFamily("hytrec_state_slots_used", "User slots in use", value=used)
    yield GaugeMetricFamily("hytrec_state_slots_capacity", "User slots", value=capacity)
    yield GaugeMetricFamily(
        "hytrec_state_users_offloaded", "Users whose state is in host memory", value=offloaded
    )
    yield _counter("state_evictions", "Slot evictions to host memory", evictions)
    disk = getattr(store, "disk", None)
    if disk is not None:  # the disk tier (`--state-dir`)
        yield GaugeMetricFamily("hytrec_state_users_on_disk", "Users on disk", value=len(disk))
        yield GaugeMetricFamily(
            "hytrec_state_disk_bytes", "Bytes of the disk tier's pages", value=disk.bytes_on_disk
        )
        yield _counter("state_disk_writes", "User states written to disk", disk.writes)
        yield _counter("state_disk_reads", "User states read back from disk", disk.reads)


def consumer_lag(app: Any) -> dict[tuple[str, int], int]:
    """(topic, partition) -> high watermark minus committed offset (or the next offset to
    read when nothing is committed yet), for the partitions assigned to this worker.

    Approximate on the embedded broker (Tansu misreports end offsets) and reads Faust's
    consumer internals, so any failure gives {} rather than an error."""
    try:
        consumer = app.consumer
        assignment = consumer.assignment()
    except Exception:  # noqa: BLE001 - not started, no consumer: no lag series
        return {}
    out = {}
    for tp in sorted(assignment):
        try:
            high = consumer.highwater(tp)
            position = consumer._committed_offset.get(tp)
            if position is None:
                read = consumer._read_offset.get(tp)
                position = None if read is None else read + 1
        except Exception:  # noqa: BLE001
            continue
        if high is None or position is None:
            continue
        out[(tp.topic, tp.partition)] = max(0, int(high) - int(position))
    return out


def _lag_family(app: Any) -> GaugeMetricFamily:
    lag = GaugeMetricFamily(
        "hytrec_consumer_lag",
        "High watermark minus committed offset per assigned partition "
        "(approximate on the embedded Tansu broker, which misreports end offsets)",
        labels=["topic", "partition"],
    )
    if app is not None:
        for (topic, partition), value in consumer_lag(app).items():
            lag.add_metric([topic, str(partition)], value)
    return lag


# ---------------------------------------------------------------------- hytrec status


@dataclass
class Sample:
    """One scrape of a worker's /metrics, reduced to what `hytrec status` shows."""

    at: float
    events_in: float = 0.0
    recommendations_out: float = 0.0
    batches: float = 0.0
    duplicates_skipped: float = 0.0
    events_applied: float = 0.0
    # the counters of _DELIVERY_COUNTERS and model_swaps
    delivery: dict[str, float] = field(default_factory=dict)
    # partition -> outcome -> count, "in_flight" included (accounting.py)
    accounting: dict[str, dict[str, float]] = field(default_factory=dict)
    dlq: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None
    slots_used: float | None = None
    slots_capacity: float | None = None
    users_offloaded: float | None = None
    evictions: float | None = None
    lag: dict[str, float] = field(default_factory=dict)  # "topic/partition" -> lag
    histograms: dict[str, dict] = field(default_factory=dict)  # name -> count, sum, buckets


def parse_metrics(text: str, at: float | None = None) -> Sample:
    """Reduce a Prometheus text exposition (from `StreamMetrics`) to a `Sample`."""
    sample = Sample(at=time.time() if at is None else at)
    scalars = {
        "hytrec_events_in": "events_in",
        "hytrec_events_applied": "events_applied",
        "hytrec_recommendations_out": "recommendations_out",
        "hytrec_batches": "batches",
        "hytrec_duplicates_skipped": "duplicates_skipped",
        "hytrec_state_slots_used": "slots_used",
        "hytrec_state_slots_capacity": "slots_capacity",
        "hytrec_state_users_offloaded": "users_offloaded",
        "hytrec_state_evictions": "evictions",
    }
    delivery = {f"hytrec_{name}": name for name, _ in _DELIVERY_COUNTERS}
    delivery["hytrec_model_swaps"] = "model_swaps"
    for family in text_string_to_metric_families(text):
        name = family.name
        if family.type == "histogram":
            hist: dict[str, Any] = {"count": 0.0, "sum": 0.0, "buckets": []}
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    hist["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    hist["count"] = s.value
                elif s.name.endswith("_sum"):
                    hist["sum"] = s.value
            hist["buckets"].sort()
            sample.histograms[name.removeprefix("hytrec_")] = hist
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if name in scalars:
                setattr(sample, scalars[name], s.value)
            elif name in delivery:
                sample.delivery[delivery[name]] = s.value
            elif name == "hytrec_dlq_messages":
                if s.value:  # every reason is exposed; the status shows those that happened
                    sample.dlq[s.labels["reason"]] = s.value
            elif name == "hytrec_partition_events":
                partition = sample.accounting.setdefault(s.labels["partition"], {})
                partition[s.labels["outcome"]] = s.value
            elif name == "hytrec_partition_events_in_flight":
                sample.accounting.setdefault(s.labels["partition"], {})["in_flight"] = s.value
            elif name == "hytrec_consumer_lag":
                sample.lag[f"{s.labels['topic']}/{s.labels['partition']}"] = s.value
            elif name == "hytrec_model_info":
                sample.model_version = s.labels.get("model_version")
    return sample


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate of the q-quantile from cumulative (le, count) buckets: linear
    inside the bucket that holds it; the highest finite bound when it lies in +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def fetch_metrics(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
        return response.read().decode()


def summarize(sample: Sample, previous: Sample | None = None) -> dict[str, Any]:
    """The status as a dict (what `hytrec status --json` prints)."""
    out: dict[str, Any] = {
        "model_version": sample.model_version,
        "events_in": sample.events_in,
        "events_applied": sample.events_applied,
        "recommendations_out": sample.recommendations_out,
        "batches": sample.batches,
        "duplicates_skipped": sample.duplicates_skipped,
        "dlq": dict(sample.dlq),
        "dlq_total": sum(sample.dlq.values()),
        "delivery": dict(sample.delivery),
        "accounting": accounting_summary(sample.accounting),
    }
    if previous is not None and sample.at > previous.at:
        dt = sample.at - previous.at
        out["interval_s"] = round(dt, 3)
        out["events_per_s"] = (sample.events_in - previous.events_in) / dt
        out["recommendations_per_s"] = (
            sample.recommendations_out - previous.recommendations_out
        ) / dt
    if sample.batches:
        hist = sample.histograms.get("batch_size")
        if hist and hist["count"]:
            out["mean_batch_size"] = hist["sum"] / hist["count"]
    for key, name in (
        ("latency_s", "event_to_recommendation_seconds"),
        ("engine_step_s", "engine_step_seconds"),
        ("index_search_s", "index_search_seconds"),
        ("publish_s", "batch_publish_seconds"),
    ):
        hist = sample.histograms.get(name)
        if hist and hist["count"]:
            out[key] = {
                "p50": histogram_quantile(0.5, hist["buckets"]),
                "p99": histogram_quantile(0.99, hist["buckets"]),
                "mean": hist["sum"] / hist["count"],
                "count": hist["count"],
            }
    if sample.slots_capacity is not None:
        out["state"] = {
            "slots_used": sample.slots_used,
            "slots_capacity": sample.slots_capacity,
            "users_offloaded": sample.users_offloaded,
            "evictions": sample.evictions,
        }
    out["lag"] = dict(sample.lag)
    out["lag_total"] = sum(sample.lag.values())
    return out


def accounting_summary(partitions: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per partition and in total: consumed, applied, dead_lettered, replays_skipped,
    in_flight, unaccounted, and whether consumed == applied + dead_lettered +
    replays_skipped + in_flight with nothing unaccounted (`balanced`)."""
    names = (*_OUTCOMES, "in_flight")
    total = {name: sum(p.get(name, 0.0) for p in partitions.values()) for name in names}

    def balanced(c: Mapping[str, float]) -> bool:
        settled = sum(c.get(k, 0.0) for k in ("applied", "dead_lettered", "replays_skipped"))
        return c.get("consumed", 0.0) == settled + c.get("in_flight", 0.0) and not c.get(
            "unaccounted", 0.0
        )

    return {
        "partitions": {p: dict(c) for p, c in sorted(partitions.items(), key=lambda i: int(i[0]))},
        "total": total,
        "balanced": all(balanced(c) for c in partitions.values()),
    }


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def format_status(summary: Mapping[str, Any], url: str = "") -> str:
    """Human-readable lines of a `summarize` dict."""
    lines = [f"hytrec worker {url}".rstrip() + f"  (model {summary.get('model_version') or '?'})"]

    def rate(key: str) -> str:
        if key in summary:
            return f"  ({summary[key]:,.1f}/s over {summary['interval_s']:.1f} s)"
        return ""

    lines.append(f"  events in            {_n(summary['events_in'])}{rate('events_per_s')}")
    lines.append(
        f"  recommendations out  {_n(summary['recommendations_out'])}"
        f"{rate('recommendations_per_s')}"
    )
    batches = f"  batches              {_n(summary['batches'])}"
    if "mean_batch_size" in summary:
        batches += f"  (mean size {summary['mean_batch_size']:.1f})"
    lines.append(batches)
    lines.append(f"  duplicates skipped   {_n(summary['duplicates_skipped'])}")
    account = summary.get("accounting") or {}
    if account.get("partitions"):
        t = account["total"]
        lines.append(
            f"  accounting           consumed {_n(t['consumed'])} = applied {_n(t['applied'])}"
            f" + dead-lettered {_n(t['dead_lettered'])} + replays skipped"
            f" {_n(t['replays_skipped'])} + in flight {_n(t['in_flight'])};"
            f" unaccounted {_n(t['unaccounted'])}"
            + ("" if account["balanced"] else "  NOT BALANCED")
            + (
                f"  {_n(t['never_delivered'])} OFFSETS NEVER DELIVERED"
                if t.get("never_delivered")
                else ""
            )
        )
    dlq = ", ".join(f"{r} {_n(c)}" for r, c in sorted(summary["dlq"].items()))
    lines.append(
        f"  DLQ                  {_n(summary['dlq_total'])}" + (f"  ({dlq})" if dlq else "")
    )
    for key, label in (
        ("latency_s", "latency recv->rec"),
        ("engine_step_s", "engine step/batch"),
        ("index_search_s", "index search/batch"),
        ("publish_s", "publish/batch"),
    ):
        if key in summary:
            h = summary[key]
            lines.append(
                f"  {label:<20} p50 {_ms(h['p50'])}, p99 {_ms(h['p99'])} "
                f"(n {_n(h['count'])}; from histogram buckets)"
            )
    delivery = summary.get("delivery") or {}
    if delivery:
        lines.append(
            f"  checkpoints          {_n(delivery.get('checkpoints'))}"
            f"  ({_n(delivery.get('snapshots_written'))} snapshots,"
            f" {delivery.get('snapshot_bytes', 0) / 1e6:,.1f} MB,"
            f" {delivery.get('checkpoint_seconds', 0):,.1f} s);"
            f" users restored {_n(delivery.get('users_restored'))},"
            f" model swaps {_n(delivery.get('model_swaps'))},"
            f" new logs {_n(delivery.get('log_resets'))}"
        )
    state = summary.get("state")
    if state:
        lines.append(
            f"  state slots          {_n(state['slots_used'])} / {_n(state['slots_capacity'])}"
            f" used, {_n(state['users_offloaded'])} users in host memory,"
            f" {_n(state['evictions'])} evictions"
        )
    lag = summary.get("lag") or {}
    if lag:
        parts = ", ".join(f"{tp} {_n(v)}" for tp, v in sorted(lag.items()))
        lines.append(
            f"  consumer lag         {_n(summary['lag_total'])}  ({parts}; approximate on "
            "the embedded broker)"
        )
    else:
        lines.append("  consumer lag         - (no partitions assigned or offsets unknown)")
    return "\n".join(lines)


def status(url: str, interval_s: float = 1.0, as_json: bool = False) -> str:
    """Scrape `url` once, or twice `interval_s` apart for rates; the text to print."""
    previous = None
    if interval_s > 0:
        previous = parse_metrics(fetch_metrics(url), at=time.time())
        time.sleep(interval_s)
    sample = parse_metrics(fetch_metrics(url), at=time.time())
    summary = summarize(sample, previous)
    if as_json:
        return json.dumps({"url": url, **summary}, sort_keys=True)
    return format_status(summary, url)


__all__ = [
    "CONTENT_TYPE",
    "Sample",
    "StreamMetrics",
    "consumer_lag",
    "fetch_metrics",
    "format_status",
    "histogram_quantile",
    "parse_metrics",
    "status",
    "summarize",
]
