"""Hot swap of model and index (issue 5): a models directory the worker watches, and the
atomic way to publish a checkpoint into it.

The directory. Each subdirectory is a checkpoint of a registered model as its `save` writes it
(`checkpoint.json`, `model.safetensors`, optionally a saved item index in `index/`). A
subdirectory counts once it is complete: its name does not start with "." (temporary
names do) and both files are there. Names sort in publish order: the newest checkpoint is
the one whose name sorts last, and `publish_model` names them `YYYYmmddTHHMMSSZ-VERSION`
(UTC), so publishing again, even an older checkpoint, makes it the newest (a roll back).

Publishing is atomic: the checkpoint is copied under a hidden temporary name in the same
directory, then renamed (one `os.rename`, atomic on a POSIX file system), so the watcher
never sees half a checkpoint. Writing into the directory by other means races the watcher.

Loading. `ModelWatcher.load_next` walks the complete checkpoints newest first, down to the
one serving: the first whose version (from its checkpoint.json) differs from the serving
model's is loaded (model, and its index built or read) by the caller's loader. One that
fails is logged with its path and reason, remembered and never tried again (publish a
fixed one under a new name), and the next older one is tried. `ModelSwaps` calls it off
the event loop and off the engine's thread, then swaps engines between batches.

The swap. Under the worker's flush lock, the old engine's waiting batch runs and its states
are checkpointed and acknowledged; then the engine reference changes. So a batch runs
wholly on one engine (asserted), no search is in flight (searches run inside batches), and
every event is applied by exactly one engine. User states of the old model mean nothing
under the new weights; what becomes of them is chosen when publishing (`publish.json`):

- `backfill` (`hytrec publish-model --backfill`, the default): the new model's states are
  rebuilt from the `behaviors` log, so no user starts again from nothing. While the old
  model serves, a shadow build on the loader thread applies, for the partitions this worker
  holds, every event the old engine has run through so far (`backfill.read_history` and
  `build_states`: long runs, the chunked form). Then, under the flush lock: the events the
  old engine ran since, the same way; the new states written to `user-state` under the new
  version and confirmed (a worker that dies now restores them: it serves the newest
  published model); then the swap. Each user's new state covers exactly the events its old
  state covered, so the next batch goes on from there: no event is applied twice or
  skipped, and every partition's recommendations change version once. A user whose new
  state counts fewer events than its old one was rebuilt from a partial history (the log's
  retention dropped its oldest events): counted (`users_rebuilt_partial`) and logged,
  never silent.
- `reset` (`--reset-states`, and checkpoints published before this existed): the states
  are reset (logged with their count); users start again from their next event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hytrec.stream.schemas import Engine
from hytrec.stream.tail import committed_offsets

if TYPE_CHECKING:
    from hytrec.stream.engine import EngineConfig
    from hytrec.stream.worker import BatchingWorker

log = logging.getLogger(__name__)

REQUIRED_FILES = ("checkpoint.json", "model.safetensors")
PUBLISH_FILE = "publish.json"  # written by publish_model: what a swap does with user states
STATES = ("backfill", "reset")


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    """An engine built from a checkpoint of the models directory, ready to serve."""

    engine: Engine
    path: Path
    load_seconds: float  # model load and index build
    states: str = "reset"  # what the swap does with user states (`STATES`)


def published_states(path: Path) -> str:
    """What a swap to this checkpoint does with user states: its `publish.json` says, and a
    checkpoint published without one resets them (as all did before)."""
    publish = path / PUBLISH_FILE
    if not publish.is_file():
        return "reset"
    states = json.loads(publish.read_text()).get("states", "reset")
    if states not in STATES:
        raise ValueError(f"{publish}: states {states!r}, expected one of {STATES}")
    return states


def checkpoint_version(path: Path) -> str | None:
    """The model version a checkpoint.json declares (None when it declares none)."""
    return json.loads((path / "checkpoint.json").read_text()).get("version")


class ModelWatcher:
    """The checkpoints of a models directory, newest first, and the ones that failed."""

    def __init__(self, models_dir: str | Path):
        self.models_dir = Path(models_dir)
        self.serving: str | None = None  # name of the checkpoint serving, if it came from here
        self.failed: dict[str, str] = {}  # name -> why it could not be loaded

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, newest (name sorting last) first."""
        if not self.models_dir.is_dir():
            return []
        found = [
            path
            for path in self.models_dir.iterdir()
            if not path.name.startswith(".")
            and path.is_dir()
            and all((path / name).is_file() for name in REQUIRED_FILES)
        ]
        return sorted(found, key=lambda path: path.name, reverse=True)

    def load_next(
        self, loader: Callable[[Path], Engine], serving_version: str | None
    ) -> LoadedEngine | None:
        """The engine of the newest checkpoint newer than the serving one whose version
        differs from `serving_version`, or None. Blocks while it loads: run it in a thread."""
        for path in self.complete():
            if path.name == self.serving:
                return None
            if path.name in self.failed:
                continue
            started = time.perf_counter()
            try:
                if serving_version is not None and checkpoint_version(path) == serving_version:
                    self.serving = path.name  # the same weights published again
                    return None
                states = published_states(path)
                engine = loader(path)
            except Exception as exc:  # noqa: BLE001 - any reason: logged, skipped, kept
                self.failed[path.name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "checkpoint %s cannot be loaded (%s); skipped, and not tried again "
                    "(publish a fixed one under a new name)",
                    path,
                    self.failed[path.name],
                )
                continue
            self.serving = path.name
            return LoadedEngine(engine, path, time.perf_counter() - started, states)
        return None


class ModelSwaps:
    """The worker's hot swap: watch the models directory, load in a thread, swap between
    batches."""

    def __init__(self, worker: BatchingWorker, watcher: ModelWatcher | None):
        self.worker = worker
        self.watcher = watcher
        self.loader_thread = ThreadPoolExecutor(1, thread_name_prefix="hytrec-model-load")

    async def watch(self) -> None:
        """Every `models_poll_s`: load the models directory's newest checkpoint when its
        version differs from the serving one (in a thread of its own: neither the event
        loop nor the engine's thread waits for it), then swap it in between batches."""
        worker = self.worker
        await worker.ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(worker.config.models_poll_s)
            try:
                loaded = await loop.run_in_executor(
                    self.loader_thread,
                    self.watcher.load_next,
                    worker.engine_loader,
                    worker.engine.model_version,
                )
            except OSError:  # the directory is unreadable now; the next poll tries again
                log.exception("cannot look at models directory %s", self.watcher.models_dir)
                continue
            if loaded is None:
                continue
            if loaded.states == "backfill" and worker.snapshots and hasattr(loaded.engine, "apply"):
                await self.swap_keeping_states(loaded)
            else:
                await self.swap(loaded)

    async def swap(self, loaded: LoadedEngine) -> None:
        """Serve `loaded.engine` from the next batch on (see the module's docstring)."""
        worker = self.worker
        started = time.perf_counter()
        async with worker.flush_lock:
            await worker.flush_locked(checkpoint=True)
            if worker.failed is not None:
                return  # stopping: nothing is swapped
            assert not worker.checkpoints.unacked, "the old engine's batches all checkpointed"
            old, worker.engine = worker.engine, loaded.engine
            swap_s = time.perf_counter() - started
        reset = len(getattr(old, "store", ()))
        await self._retire(old, loaded, swap_s)
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

    async def swap_keeping_states(self, loaded: LoadedEngine) -> None:
        """Serve `loaded.engine` with every user's state rebuilt under it from the log (see
        the module's docstring)."""
        worker = self.worker
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        rebuild = StateRebuild(worker, loaded.engine)
        # while the old model serves: every event it has run through so far
        built = await self._positions()
        ranges = {p: (0, end) for p, end in built.items()}
        await loop.run_in_executor(self.loader_thread, rebuild.apply, ranges)
        shadow_s = time.perf_counter() - started
        async with worker.flush_lock:
            held = time.perf_counter()
            await worker.flush_locked(checkpoint=True)
            if worker.failed is not None:
                return  # stopping: nothing is swapped
            assert not worker.checkpoints.unacked, "the old engine's batches all checkpointed"
            # the events the old engine ran since (partitions gained meanwhile: all of theirs)
            now = await self._positions()
            rebuild.drop_partitions(set(built) - set(now))
            ranges = {p: (built.get(p, 0), end) for p, end in now.items()}
            await loop.run_in_executor(self.loader_thread, rebuild.apply, ranges)
            partial = rebuild.partial_users(worker.engine)
            if not await worker.checkpoints.write_states(loaded.engine, rebuild.partition_of):
                # served all the same (the states are right); the next checkpoint writes them
                worker.checkpoints.dirty.update(rebuild.partition_of)
                log.error("the rebuilt states could not all be written: the next checkpoint does")
            worker.checkpoints.partition_of.update(rebuild.partition_of)
            old, worker.engine = worker.engine, loaded.engine
            swap_s = time.perf_counter() - held
        await self._retire(old, loaded, swap_s)
        stats = worker.stats
        stats.users_rebuilt += len(rebuild.partition_of)
        stats.users_rebuilt_partial += partial
        log.info(
            "model swapped %s -> %s (%s): %d user states rebuilt from %d events of the log "
            "(%.2f s while the old model served, then batches held %.3f s); load and index "
            "%.2f s",
            old.model_version,
            loaded.engine.model_version,
            loaded.path,
            len(rebuild.partition_of),
            rebuild.events,
            shadow_s,
            swap_s,
            loaded.load_seconds,
        )
        if partial:
            log.warning(
                "%d users were rebuilt from a partial history: the behaviors log no longer "
                "holds their oldest events (retention), so their new states count fewer "
                "events than their old ones",
                partial,
            )

    async def _retire(self, old: Engine, loaded: LoadedEngine, swap_s: float) -> None:
        """After a swap: the old engine's files released (its disk tier), the swap counted."""
        if hasattr(old, "close"):
            await self.worker.on_engine_thread(old.close)
        stats = self.worker.stats
        stats.model_swaps += 1
        stats.model_load_seconds += loaded.load_seconds
        stats.model_swap_seconds += swap_s

    async def _positions(self) -> dict[int, int]:
        """Partition -> the first offset the serving engine has not run through, for each
        partition this worker holds: past the last one a batch of it ran, else where the
        group's commits say earlier owners stopped (0 without a commit)."""
        worker = self.worker
        held = sorted(worker.checkpoints.assignment)
        unseen = [p for p in held if p not in worker.run_through]
        committed = {}
        if unseen:
            config = worker.config
            committed = await asyncio.get_running_loop().run_in_executor(
                None,
                committed_offsets,
                config.bootstrap,
                config.app_id,
                config.topics.behaviors,
                unseen,
            )
        return {
            p: worker.run_through[p] + 1 if p in worker.run_through else committed.get(p, 0)
            for p in held
        }


class StateRebuild:
    """A new model's user states built from the `behaviors` log while the old model serves
    (on the loader thread: the new engine is touched by nothing else until the swap)."""

    def __init__(self, worker: BatchingWorker, engine: Engine):
        self.worker, self.engine = worker, engine
        self.partition_of: dict[str, int] = {}  # user -> behaviours partition, as the worker
        self.events = 0

    def apply(self, ranges: dict[int, tuple[int, int]]) -> None:
        """Apply the events of partition p from offset start to end (exclusive), each p ->
        (start, end) of `ranges`, in long runs (`backfill.build_states`)."""
        from hytrec.stream.backfill import BackfillConfig, build_states, read_history

        ranges = {p: r for p, r in ranges.items() if r[1] > r[0]}
        if not ranges:
            return
        config = self.worker.config
        history = read_history(
            config.bootstrap,
            config.topics.behaviors,
            config.parse,
            progress=False,
            ranges=ranges,
        )
        for event in history.events:
            self.partition_of[event.user_id] = event.partition
        build_states(self.engine, history.events, BackfillConfig(progress=False))
        self.events += len(history.events)

    def drop_partitions(self, lost: set[int]) -> None:
        """Forget the users of partitions this worker no longer holds."""
        gone = [u for u, p in self.partition_of.items() if p in lost]
        self.engine.drop_users(gone)
        for user in gone:
            del self.partition_of[user]

    def partial_users(self, old: Engine) -> int:
        """Users whose rebuilt state counts fewer events than the old model's state of them:
        the log no longer holds their whole history."""
        old_store, new_store = getattr(old, "store", None), self.engine.store
        if old_store is None:
            return 0
        return sum(
            new_store.events_applied(user) < old_store.events_applied(user)
            for user in self.partition_of
        )


def checkpoint_loader(engine_config: EngineConfig | None = None) -> Callable[[Path], Engine]:
    """Checkpoint directory -> model engine; the item index is read from the checkpoint's
    `index/` when it has one, else built exact."""

    def load(path: Path) -> Engine:
        from hytrec.stream.engine import build_engine  # torch and FAISS load only here

        index = path / "index"
        return build_engine(path, index_dir=index if index.is_dir() else None, config=engine_config)

    return load


def publish_model(
    checkpoint: str | Path,
    models_dir: str | Path,
    name: str | None = None,
    states: str = "backfill",
) -> Path:
    """Copy a checkpoint into the models directory atomically (hidden temporary copy, then
    one rename), with `publish.json` saying what a swap to it does with user states
    (`STATES`); the published path. The checkpoint is loaded first, so a broken one is
    refused here rather than skipped by every worker."""
    from hytrec.model.base import CheckpointError  # torch only when publishing
    from hytrec.model.registry import load_model

    if states not in STATES:
        raise ValueError(f"states {states!r}: expected one of {STATES}")
    source, models_dir = Path(checkpoint), Path(models_dir)
    try:
        version = load_model(source).version
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own error for broken weights, and the like
        raise CheckpointError(f"{source} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    name = name or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{version}"
    if name.startswith(".") or "/" in name:
        raise ValueError(f"checkpoint name {name!r}: no leading '.', no '/'")
    target = models_dir / name
    if target.exists():
        raise FileExistsError(f"{target} exists already")
    models_dir.mkdir(parents=True, exist_ok=True)
    temporary = models_dir / f".{name}.tmp-{os.getpid()}"
    try:
        shutil.copytree(source, temporary)
        (temporary / PUBLISH_FILE).write_text(json.dumps({"states": states}))
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target
