"""Hot swap of model and index (issue 5): the models directory watcher, atomic publishing,
the swap between batches, and the swap under load through a real broker and worker: no
event lost or applied twice across the two engines, and no recommendation from a
half-loaded model."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stream_pipeline import offline_vectors
from test_stream_support import (
    Acks,
    LastItemsEngine,
    no_publish,
    pending_event,
    start_worker,
    stop_worker,
    wait_for,
)

from hytrec.model.base import CheckpointError
from hytrec.model.data import load_dataset, select
from hytrec.model.events import Vocabulary
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.app import WorkerConfig
from hytrec.stream.hotswap import (
    LoadedEngine,
    ModelWatcher,
    checkpoint_loader,
    publish_model,
    published_states,
)
from hytrec.stream.worker import BatchingWorker

# ------------------------------------------------------------------ the watcher


def fake_checkpoint(models_dir: Path, name: str, version: str, complete: bool = True) -> Path:
    """A directory that looks like a checkpoint to the watcher (the loaders here are fakes)."""
    path = models_dir / name
    path.mkdir(parents=True)
    (path / "checkpoint.json").write_text(json.dumps({"version": version}))
    if complete:
        (path / "model.safetensors").write_bytes(b"")
    return path


class FakeLoader:
    """Checkpoint dir -> a test engine named after its version; fails on "broken" ones."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, path: Path) -> LastItemsEngine:
        self.calls.append(path.name)
        version = json.loads((path / "checkpoint.json").read_text())["version"]
        if version == "broken":
            raise CheckpointError(f"{path}/model.safetensors: truncated")
        engine = LastItemsEngine()
        engine.model_version = version
        return engine


def test_watcher_loads_the_newest_complete_checkpoint_and_ignores_the_rest(tmp_path):
    fake_checkpoint(tmp_path, "20261101T000000Z-a", "va")
    fake_checkpoint(tmp_path, "20261102T000000Z-b", "vb")
    fake_checkpoint(tmp_path, "20261103T000000Z-c", "vc", complete=False)  # weights missing
    fake_checkpoint(tmp_path, ".20261104T000000Z-d.tmp-1", "vd")  # a publish in progress
    watcher, loader = ModelWatcher(tmp_path), FakeLoader()

    loaded = watcher.load_next(loader, serving_version=None)
    assert loaded.engine.model_version == "vb" and loaded.path.name == "20261102T000000Z-b"
    assert watcher.load_next(loader, "vb") is None  # serving the newest: nothing to do
    assert loader.calls == ["20261102T000000Z-b"]

    (tmp_path / "20261103T000000Z-c" / "model.safetensors").write_bytes(b"")  # now complete
    assert watcher.load_next(loader, "vb").engine.model_version == "vc"
    fake_checkpoint(tmp_path, "20261105T000000Z-e", "vc")  # the same weights published again
    assert watcher.load_next(loader, "vc") is None
    assert watcher.serving == "20261105T000000Z-e"
    assert loader.calls == ["20261102T000000Z-b", "20261103T000000Z-c"]


def test_a_broken_checkpoint_is_logged_skipped_and_not_retried(tmp_path, caplog):
    fake_checkpoint(tmp_path, "1-good", "v1")
    broken = fake_checkpoint(tmp_path, "2-broken", "broken")
    watcher, loader = ModelWatcher(tmp_path), FakeLoader()
    with caplog.at_level(logging.ERROR, logger="hytrec.stream.hotswap"):
        first = watcher.load_next(loader, serving_version=None)  # falls back to the older one
        assert first.engine.model_version == "v1"
        for _ in range(3):  # later polls
            assert watcher.load_next(loader, "v1") is None
    assert loader.calls == ["2-broken", "1-good"]  # tried once
    (record,) = caplog.records
    assert str(broken) in record.getMessage() and "truncated" in record.getMessage()
    assert watcher.failed == {"2-broken": f"CheckpointError: {broken}/model.safetensors: truncated"}


def small_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    items = Vocabulary([f"i{n}" for n in range(49)])
    return HyTRec(HyTRecConfig(num_items=50, num_categories=5, d_model=32, dropout=0), items).save(
        path
    )


def test_publish_model_is_atomic_sorts_last_and_refuses_a_broken_checkpoint(tmp_path):
    models = tmp_path / "models"
    first = publish_model(small_checkpoint(tmp_path / "a", seed=0), models, name="1-a")
    second = publish_model(small_checkpoint(tmp_path / "b", seed=1), models)
    assert sorted(p.name for p in models.iterdir()) == ["1-a", second.name]  # no temporaries
    assert second.name.endswith(HyTRec.load(second).version)
    assert ModelWatcher(models).complete() == [second, first]
    engine = checkpoint_loader()(second)  # the real loader: model and exact index
    assert engine.model_version == HyTRec.load(second).version
    assert engine.index.model_version == engine.model_version

    # what a swap does with user states: rebuilt from the log unless published to reset
    assert published_states(second) == "backfill" and published_states(first) == "backfill"
    reset = publish_model(small_checkpoint(tmp_path / "r", seed=3), models, states="reset")
    assert published_states(reset) == "reset"
    (reset / "publish.json").unlink()  # published before publish.json existed
    assert published_states(reset) == "reset"
    with pytest.raises(ValueError, match="states 'keep'"):
        publish_model(tmp_path / "r", models, states="keep")
    shutil.rmtree(reset)

    broken = small_checkpoint(tmp_path / "c", seed=2)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="SafetensorError.*header"):
        publish_model(broken, models)
    with pytest.raises(FileExistsError):
        publish_model(tmp_path / "a", models, name="1-a")
    assert sorted(p.name for p in models.iterdir()) == ["1-a", second.name]


def test_a_worker_starts_on_the_newest_published_model_not_its_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, "1-old", "v1")
    fake_checkpoint(tmp_path, "2-new", "v2")
    config = WorkerConfig(models_dir=str(tmp_path))
    worker = BatchingWorker(None, config, LastItemsEngine, FakeLoader())
    assert worker.first_engine().model_version == "v2"
    empty = WorkerConfig(models_dir=str(tmp_path / "none-yet"))
    assert BatchingWorker(None, empty, LastItemsEngine, FakeLoader()).first_engine().model_version
    assert (tmp_path / "none-yet").is_dir()  # created for publishers
    with pytest.raises(RuntimeError, match="no loadable checkpoint"):
        BatchingWorker(None, empty, None, FakeLoader()).first_engine()


def test_swap_runs_the_waiting_batch_on_the_old_engine_then_serves_the_new(tmp_path, caplog):
    async def scenario():
        worker = BatchingWorker(None, WorkerConfig(), LastItemsEngine)
        worker.engine = LastItemsEngine()
        worker.publisher.publish = no_publish  # no broker here
        worker.stream = Acks()
        worker.batcher.add(pending_event("u", 0), 0.0)
        new = LastItemsEngine()
        new.model_version = "last-items-2"
        await worker.swaps.swap(LoadedEngine(new, tmp_path / "2-new", load_seconds=1.5))
        assert worker.engine is new and worker.stream.acked == 1 and not worker.checkpoints.unacked
        return worker

    with caplog.at_level(logging.INFO, logger="hytrec.stream.hotswap"):
        worker = asyncio.run(scenario())
    assert worker.stats.model_swaps == 1 and worker.stats.model_load_seconds == 1.5
    assert worker.stats.batches == 1  # the waiting batch ran, on the old engine
    assert "model swapped last-items-1 -> last-items-2" in caplog.text
    assert b"hytrec_model_swaps_total 1.0" in worker.metrics.exposition()
    assert b'hytrec_model_info{model_version="last-items-2"} 1.0' in worker.metrics.exposition()


# ------------------------------------------------------------------ under load, real broker


def check_saved_states_are_the_new_models(bootstrap, payloads, positions, tmp_path) -> None:
    """The states the worker saved (its graceful stop checkpoints them all) equal the new
    model's over each user's whole history, as an engine of it builds them from nothing."""
    from hytrec.bench.chaos import states_agree
    from hytrec.stream.broker import TopicConfig
    from hytrec.stream.engine import EngineConfig, build_engine
    from hytrec.stream.schemas import BehaviorEvent
    from hytrec.stream.snapshots import decode_snapshot, read_snapshots

    found = read_snapshots(bootstrap, TopicConfig().state_topic("test-worker"), list(range(4)))
    saved = {user: decode_snapshot(value) for user, (_, value) in found.latest.items()}
    offline = build_engine(tmp_path / "new", config=EngineConfig(device="cpu"))
    events = [
        BehaviorEvent(
            str(p["user_id"]),
            str(p["item_id"]),
            str(p["category_id"]),
            str(p["behavior"]),
            int(p["ts"]),
            partition=positions[i][0],
            offset=positions[i][1],
            received_at=0.0,
        )
        for i, p in sorted(enumerate(payloads), key=lambda ip: positions[ip[0]])
    ]
    offline.apply(events)
    expected = offline.store.export_users(list(saved))
    assert saved.keys() == {e.user_id for e in events}
    for user, snapshot in saved.items():
        assert snapshot.model_version == offline.model_version, user
        assert snapshot.applied == expected[user].applied, user
        same, worst = states_agree(snapshot.parts, expected[user].parts, 1e-4)
        assert same, (user, worst)


USERS = 30  # the head of the Taobao sample is sorted by user: about 3,000 events
CHUNK = 100  # events per publish while the stream runs


@pytest.mark.integration
@pytest.mark.parametrize("states", ["reset", "backfill"])
def test_hot_swap_under_load_loses_no_event_and_serves_no_half_loaded_model(
    shared_data, tmp_path, states
):
    """With `reset`, the new model starts every user from nothing at the swap; with
    `backfill`, it starts them from their whole history, rebuilt from the log: every answer
    equals its model's offline answer over exactly those events, and after the swap the
    saved states equal the new model's over each user's whole history."""
    from hytrec.stream.broker import EmbeddedBroker
    from hytrec.stream.replay import ReplayConfig, log_events, publish_events
    from hytrec.stream.schemas import Recommendation
    from hytrec.stream.tail import read_topic

    log = load_dataset(
        shared_data / "taobao" / "UserBehavior_head84k.csv.gz", on_bad_row="skip", progress=False
    )
    payloads = list(log_events(select(log, log.user <= USERS)))
    cfg = HyTRecConfig(
        num_items=len(log.items), num_categories=len(log.categories), d_model=32, dropout=0
    )
    models = {}
    for name, seed in (("old", 0), ("new", 1)):  # different weights, different versions
        torch.manual_seed(seed)
        models[name] = HyTRec(cfg, log.items, log.categories).eval()
        models[name].save(tmp_path / name)
    versions = {name: m.version for name, m in models.items()}
    models_dir = tmp_path / "models"
    publish_model(tmp_path / "old", models_dir, name="1-old")

    positions: dict[int, tuple[int, int]] = {}
    chunks = [range(i, min(i + CHUNK, len(payloads))) for i in range(0, len(payloads), CHUNK)]

    def publish(chunk: range) -> None:
        publish_events(
            [payloads[i] for i in chunk],
            broker.bootstrap,
            ReplayConfig(progress=False),
            on_delivery=lambda i, meta: positions.__setitem__(
                chunk[i], (meta.partition, meta.offset)
            ),
        )

    def worker_log() -> str:
        return (tmp_path / "worker" / "worker.log").read_text(errors="replace")

    def recommendations() -> list:
        return list(read_topic(broker.bootstrap, "recommendations", idle_timeout_s=0.5))

    args = ["--models-dir", str(models_dir), "--models-poll", "0.2", "--device", "cpu"]
    with EmbeddedBroker() as broker:
        worker = start_worker(
            broker.bootstrap, tmp_path / "worker", engine=None, batch_size=64, extra_args=args
        )
        try:
            for chunk in chunks[:5]:
                publish(chunk)
            wait_for(recommendations, 60, "the first recommendations")
            publish_model(tmp_path / "new", models_dir, name="2-new", states=states)
            rest = iter(chunks[5:-5])
            for chunk in rest:  # events keep coming while the new model loads and swaps in
                publish(chunk)
                if "model swapped" in worker_log():
                    break
            wait_for(lambda: "model swapped" in worker_log(), 60, "the swap")
            for chunk in [*rest, *chunks[-5:]]:
                publish(chunk)
            last = {p["user_id"]: positions[i] for i, p in enumerate(payloads)}

            def answered():
                records = recommendations()
                latest = {}
                for record in records:
                    rec = Recommendation.from_json(record.value)
                    latest[rec.user_id] = (rec.source_partition, rec.source_offset)
                return records if latest == last else None

            records = wait_for(answered, 90, "a recommendation answering every user's last event")
        finally:
            stop_worker(worker)
        assert worker.returncode == 0, worker_log()[-3000:]
        story = worker_log()
        if states == "backfill":
            check_saved_states_are_the_new_models(broker.bootstrap, payloads, positions, tmp_path)

        # restarted with the old --checkpoint, a worker serves the newest published model and
        # so restores the new model's snapshots rather than refusing them
        newest = {p["user_id"]: p for p in payloads}
        late = sorted(newest.values(), key=lambda p: p["ts"])[-3:]  # users served after the swap
        more = [dict(p, ts=p["ts"] + 1) for p in late]
        worker = start_worker(
            broker.bootstrap,
            tmp_path / "restarted",
            engine=None,
            extra_args=[*args, "--checkpoint", str(tmp_path / "old")],
        )
        try:
            publish_events(
                more,
                broker.bootstrap,
                ReplayConfig(progress=False),
                on_delivery=lambda i, meta: positions.__setitem__(
                    len(payloads) + i, (meta.partition, meta.offset)
                ),
            )
            wanted = {(p["user_id"], positions[len(payloads) + i]) for i, p in enumerate(more)}

            def answered_again():
                found = {}
                for record in recommendations():
                    rec = Recommendation.from_json(record.value)
                    if (rec.user_id, (rec.source_partition, rec.source_offset)) in wanted:
                        found[rec.user_id] = rec
                return list(found.values()) if len(found) == len(wanted) else None

            after_restart = wait_for(answered_again, 60, "answers of the restarted worker")
        finally:
            stop_worker(worker)
        restarted = (tmp_path / "restarted" / "worker.log").read_text(errors="replace")
        assert worker.returncode == 0, restarted[-3000:]
    payloads += more
    assert "2-new from the models directory" in restarted
    assert {r.model_version for r in after_restart} == {versions["new"]}

    assert f"model swapped {versions['old']} -> {versions['new']}" in story
    assert ("user states reset" if states == "reset" else "user states rebuilt") in story

    # versions: only the two, and per recommendations partition the old then the new only
    by_partition = defaultdict(list)
    by_user = defaultdict(list)
    for record in records:
        rec = Recommendation.from_json(record.value)
        by_partition[record.partition].append(rec.model_version)
        by_user[rec.user_id].append(rec)
    for rec in after_restart:
        by_user[rec.user_id].append(rec)
    seen = [v for vs in by_partition.values() for v in vs]
    assert set(seen) == set(versions.values())
    for vs in by_partition.values():
        switched = vs.index(versions["new"]) if versions["new"] in vs else len(vs)
        assert set(vs[switched:]) <= {versions["new"]}, "an old-model answer after the swap"

    # every recommendation equals the offline model of its version over exactly the events
    # its engine applied: the old one from the start, the new one from the reset on
    item_vectors = {name: m.item_vectors() for name, m in models.items()}
    events_of = defaultdict(list)  # user -> [(partition, offset, payload)] in order
    for i, p in enumerate(payloads):
        events_of[p["user_id"]].append((*positions[i], p))
    swapped_users = 0
    for user, recs in by_user.items():
        old_offsets = [r.source_offset for r in recs if r.model_version == versions["old"]]
        reset_at = max(old_offsets, default=-1)
        swapped_users += any(r.model_version == versions["new"] for r in recs)
        for rec in recs:
            name = "old" if rec.model_version == versions["old"] else "new"
            first = -1 if name == "old" or states == "backfill" else reset_at
            applied = [p for _, o, p in events_of[user] if first < o <= rec.source_offset]
            vector = offline_vectors(models[name], applied)[user]
            scores = item_vectors[name] @ vector
            ids = [models[name].items.get(item) for item in rec.items]
            np.testing.assert_allclose(rec.scores, scores[np.array(ids) - 1], atol=1e-3)
            assert abs(rec.scores[0] - scores.max()) < 1e-3, "not the top item"
    assert swapped_users >= USERS // 2, "the swap happened after most users' events"
