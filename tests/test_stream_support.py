"""Shared pieces of the stream tests: a small test engine and a worker subprocess.

`LastItemsEngine` stands in for the model engine in plumbing tests: it recommends a user's
last items, rejects events older than the user's newest (`out_of_order`), skips replays by
(user, partition) offset like the real engine, and logs every applied event to the file
named by $HYTREC_TEST_ENGINE_LOG, so a test can check that every event was applied exactly
once by a worker running in another process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from hytrec.stream.broker import stop_process
from hytrec.stream.schemas import BehaviorEvent, EngineResult, Recommendation

TESTS = Path(__file__).resolve().parent
TS = 1511544000  # event times of the hand-made events: late November 2017, like Taobao
REPO = TESTS.parent


class LastItemsEngine:
    model_version = "last-items-1"

    def __init__(self, log_path: str | None = None, top: int = 3):
        self.top = top
        self.history: dict[str, list[str]] = {}
        self.applied: dict[tuple[str, int], int] = {}  # (user, partition) -> last offset
        self.newest_ts: dict[str, int] = {}
        self.log = open(log_path, "a") if log_path else None  # noqa: SIM115

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        newest: dict[str, BehaviorEvent] = {}
        rejected, skipped, applied = [], [], []
        for event in events:
            position = (event.user_id, event.partition)
            if event.offset <= self.applied.get(position, -1):
                skipped.append(event)
                continue
            if event.ts < self.newest_ts.get(event.user_id, event.ts):
                rejected.append((event, "out_of_order", f"ts {event.ts} is older"))
                continue
            self.applied[position] = event.offset
            self.newest_ts[event.user_id] = event.ts
            applied.append(event)
            self.history.setdefault(event.user_id, []).append(event.item_id)
            newest[event.user_id] = event
            if self.log:
                self.log.write(
                    f"{event.partition} {event.offset} {event.user_id} {event.item_id} {event.ts}\n"
                )
        if self.log:
            self.log.flush()
        now = time.time()
        recs = [
            Recommendation(
                user_id=user,
                items=self.history[user][-self.top :][::-1],
                scores=[1.0 / (i + 1) for i in range(len(self.history[user][-self.top :]))],
                model_version=self.model_version,
                source_partition=e.partition,
                source_offset=e.offset,
                event_ts=e.ts,
                received_at=e.received_at,
                produced_at=now,
            )
            for user, e in newest.items()
        ]
        return EngineResult(recs, rejected, skipped=skipped, applied=applied)

    def reset_offsets(self, users: Sequence[str], partition: int) -> int:
        """Keep the histories, forget the applied offsets (the worker found a new log)."""
        return sum(self.applied.pop((user, partition), None) is not None for user in users)


def make_engine() -> LastItemsEngine:
    """The worker's `--engine test_stream_support:make_engine`."""
    return LastItemsEngine(os.environ.get("HYTREC_TEST_ENGINE_LOG"))


def start_worker(
    bootstrap: str,
    tmp_path: Path,
    *,
    group: str = "test-worker",
    engine: str | None = "test_stream_support:make_engine",
    batch_size: int = 64,
    batch_wait_ms: float = 20.0,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen:
    """`hytrec worker` with the test engine (None: no --engine, give the model in
    `extra_args`) in a subprocess; its log in tmp_path/worker.log."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "HYTREC_TEST_ENGINE_LOG": str(tmp_path / "applied.txt"),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hytrec.cli",
            "worker",
            *(["--engine", engine] if engine else []),
            "--bootstrap",
            bootstrap,
            "--embedded-broker",
            "--group",
            group,
            "--batch-size",
            str(batch_size),
            "--batch-wait-ms",
            str(batch_wait_ms),
            "--data-dir",
            str(tmp_path / "faust"),
            "--log-every",
            "1",
            *extra_args,
        ],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def stop_worker(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    stop_process(process, timeout_s)


def applied_events(tmp_path: Path) -> list[tuple[int, int, str, str, int]]:
    """(partition, offset, user, item, ts) of every event the test engine applied."""
    path = tmp_path / "applied.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        partition, offset, user, item, ts = line.split()
        rows.append((int(partition), int(offset), user, item, int(ts)))
    return rows


def behavior_payload(user: str, i: int, **change) -> dict:
    """The i-th hand-made behaviour event of a test (item `item-i` at TS + i), changed."""
    return {
        "user_id": user,
        "item_id": f"item-{i}",
        "category_id": "c",
        "behavior": "pv",
        "ts": TS + i,
        **change,
    }


def check_applied_once_in_order(applied, sent_by_user):
    """Every event applied once (no position twice), each user's in the order sent."""
    positions = Counter((partition, offset) for partition, offset, *_ in applied)
    assert max(positions.values()) == 1, "an event was applied twice"
    by_user = defaultdict(list)
    for _, offset, user, item, ts in applied:
        by_user[user].append((offset, item, ts))
    for user, sent in sent_by_user.items():
        got = by_user[user]
        assert [o for o, *_ in got] == sorted(o for o, *_ in got)
        assert [(item, ts) for _, item, ts in got] == sent, f"user {user}"


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `condition()` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def behavior_event(user: str, offset: int, item: str = "i1") -> BehaviorEvent:
    """A valid event of partition 0 at `offset` (time 100 + offset), as the worker parses it."""
    return BehaviorEvent(
        user_id=user,
        item_id=item,
        category_id="c",
        behavior="pv",
        ts=100 + offset,
        partition=0,
        offset=offset,
        received_at=0.0,
    )


def test_last_items_engine_skips_replays_and_rejects_late_events():
    def event(offset, item, **change):
        return dataclasses.replace(behavior_event("u", offset, item), **change)

    engine = LastItemsEngine()
    first = engine.process([event(0, "a"), event(1, "b"), event(2, "late", ts=50)])
    assert [r.items for r in first.recommendations] == [["b", "a"]]
    assert [reason for _, reason, _ in first.rejected] == ["out_of_order"]
    assert [e.offset for e in first.applied] == [0, 1]
    again = engine.process([event(1, "b"), event(3, "c"), event(1, "x", partition=2, ts=200)])
    assert [e.offset for e in again.skipped] == [1]  # partition 2's offset 1 is new
    assert again.recommendations[0].items == ["x", "c", "b"]


class FailingEngine(LastItemsEngine):
    """Fails on the item "boom", as a bug in the engine would."""

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        if any(e.item_id == "boom" for e in events):
            raise RuntimeError("engine bug")
        return super().process(events)


def make_failing_engine() -> FailingEngine:
    return FailingEngine(os.environ.get("HYTREC_TEST_ENGINE_LOG"))


def make_recording_model_engine():
    """The model engine of $HYTREC_TEST_CHECKPOINT that also writes every user's latest
    vector to $HYTREC_TEST_VECTORS (JSON) after each batch, for pipeline parity tests."""
    import json

    from hytrec.stream.engine import EngineConfig, RecommendationEngine, build_engine

    class RecordingEngine(RecommendationEngine):
        vectors: dict[str, list[float]] = {}

        def _apply(self, users, runs):
            slots, vectors = super()._apply(users, runs)
            self.vectors.update(zip(users, vectors.tolist(), strict=True))
            return slots, vectors

        def process(self, events):
            result = super().process(events)
            path = Path(os.environ["HYTREC_TEST_VECTORS"])
            path.with_suffix(".tmp").write_text(json.dumps(self.vectors))
            path.with_suffix(".tmp").replace(path)  # readers never see half a file
            return result

    engine = build_engine(os.environ["HYTREC_TEST_CHECKPOINT"], config=EngineConfig(device="cpu"))
    engine.__class__ = RecordingEngine
    return engine


def make_logging_model_engine():
    """The model engine of $HYTREC_TEST_CHECKPOINT that logs every event it applies to
    $HYTREC_TEST_ENGINE_LOG like `LastItemsEngine` (so `applied_events` reads it)."""
    from hytrec.stream.engine import EngineConfig, RecommendationEngine, build_engine

    class LoggingEngine(RecommendationEngine):
        def process(self, events):
            result = super().process(events)
            if result.applied:
                self.log.write(
                    "".join(
                        f"{e.partition} {e.offset} {e.user_id} {e.item_id} {e.ts}\n"
                        for e in result.applied
                    )
                )
                self.log.flush()
            return result

    engine = build_engine(os.environ["HYTREC_TEST_CHECKPOINT"], config=EngineConfig(device="cpu"))
    engine.__class__ = LoggingEngine
    engine.log = open(os.environ["HYTREC_TEST_ENGINE_LOG"], "a")  # noqa: SIM115
    return engine


# ------------------------------------------------------------------ worker unit tests


async def no_publish(pending, result) -> None:
    """Stands in for `Publisher.publish` where there is no broker."""
    return None


class Acks:
    """Stands in for the Faust stream: counts acknowledgements."""

    acked = 0

    async def ack(self, event) -> None:
        self.acked += 1


def pending_event(user: str, offset: int, item: str = "i1"):
    """A consumed, valid event waiting in a worker's batch (no Faust message behind it)."""
    from hytrec.stream.worker import Pending

    return Pending(None, behavior_event(user, offset, item), None)
